"""OpenVINO against onnxruntime on the same fused graphs, and the service's OpenVINO setting.

fp32 (forced, as on a CPU without bf16) must reproduce onnxruntime as tightly as the export parity
checks eager PyTorch: tiny random-weight detectors, images of noise, every detection, masks IoU >= 0.99.

bf16 is checked on the bundled trained models and real HeLa tiles instead: random weights give a dense
carpet of near-equal scores, so bf16 rounding reorders the 100-detection cut and flips detections at the
score threshold, and their EmbedMask spatial embeddings (position scale 20) lose the RBF coupling to
cancellation; neither says anything about a trained model. What a user sees must agree: every detection
scoring >= 0.3 on one side is on the other (same class, box within 2 px, score within 0.02), and the
finished masks of the pairs overlap with median IoU >= 0.97, each >= 0.9 (nuclei are ~20 px wide, so one
pixel of boundary is ~5% IoU).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from export.metadata import read_onnx_metadata
from export.onnx_export import export_onnx
from export.openvino_runtime import (
    CONVOLUTIONS,
    DEFAULT_CPU_PRECISION,
    OpenVinoRuntime,
    cpu_has_bf16,
    fp32_operations,
    resolve_precision,
)
from export.parity import compare_outputs, mask_ious, match_image
from export.runtimes import OnnxRuntime
from inference.runtime import RuntimeOptions, export_checkpoint, open_runtime
from model.checkpoint import load_checkpoint, save_checkpoint
from model.intensity import decode_rgb8
from service.models import load_model
from service.settings import ModelSpec, Settings
from tests.service_models import CATEGORY_IDS, CLASS_NAMES, tiny_checkpoint, tiny_detector

REPO = Path(__file__).resolve().parents[1]
CONFIDENT = 0.3
BF16_SCORE_TOLERANCE = 0.03  # how far bf16 may move a detection's score (asserted below)


def noise_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 3, height, width), dtype=np.uint8)


@pytest.fixture(scope="module", params=["meinst", "embedmask"])
def tiny_graph(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, cfg = tiny_detector(request.param)
    path = tmp_path_factory.mktemp("openvino") / f"{request.param}.onnx"
    export_onnx(model, cfg, {"class_names": CLASS_NAMES, "category_ids": CATEGORY_IDS}, path)
    return path


def test_fp32_matches_onnxruntime_on_every_detection(tiny_graph: Path) -> None:
    reference_runtime = OnnxRuntime(tiny_graph, providers=["CPUExecutionProvider"])
    runtime = OpenVinoRuntime(tiny_graph, precision="fp32", threads=1)
    assert runtime.metadata == reference_runtime.metadata and runtime.output_names == reference_runtime.output_names
    # A batch of 3 runs image by image on the one batch-1 engine: the outputs must line up with the images.
    images = noise_images(3, 128, 192)
    reference, candidate = reference_runtime.infer(images), runtime.infer(images)
    for name, value in reference.items():
        assert candidate[name].dtype == value.dtype and candidate[name].shape == value.shape, name
    assert (reference["num_dets"] > 10).all()
    problems = compare_outputs(reference, candidate, runtime.metadata, input_size=(128, 192), image_size=(192, 288))
    assert problems == []
    assert runtime.shapes == [(128, 192)]
    single = runtime.infer(images[1:2])  # an image's outputs do not depend on the batch it came in
    assert all(np.array_equal(single[name], candidate[name][1:2]) for name in single)


def test_runtime_rejects_inputs_outside_the_contract(tiny_graph: Path) -> None:
    runtime = OpenVinoRuntime(tiny_graph, precision="fp32", threads=1)
    with pytest.raises(ValueError, match="multiples of 32"):
        runtime.infer(noise_images(1, 100, 128))
    with pytest.raises(ValueError, match="uint8"):
        runtime.infer(noise_images(1, 96, 128).astype(np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        runtime.infer(noise_images(0, 96, 128))


def test_auto_precision_follows_the_cpu_and_the_models_measured_choice(tiny_graph: Path) -> None:
    """auto: fp32 without bf16; with it, the precision the graph records (chosen on its validation split) or
    the default, bf16 with the mask decode in fp32."""
    metadata = read_onnx_metadata(tiny_graph)
    assert metadata.cpu_precision is None
    measured = metadata.model_copy(update={"cpu_precision": "bf16"})
    if cpu_has_bf16():
        assert resolve_precision("auto", metadata) == DEFAULT_CPU_PRECISION == "bf16+fp32_mask_decode"
        assert resolve_precision("auto", measured) == "bf16"
    else:
        assert resolve_precision("auto", metadata) == resolve_precision("auto", measured) == "fp32"
        for forced in ("bf16", "bf16+fp32_mask_decode"):
            with pytest.raises(ValueError, match="lacks bf16"):
                resolve_precision(forced)
    assert resolve_precision("fp32", measured) == "fp32"


def test_the_mask_decode_and_branch_are_found_by_the_graphs_structure(tiny_graph: Path) -> None:
    """The mask branch: what only the masks output needs; its decode: the part after the last convolution
    (EmbedMask's embeddings and coupling, MEInst's codec). The detections' operations are never in either."""
    model = ov.Core().read_model(str(tiny_graph))
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    branch = fp32_operations(model, "bf16+fp32_mask_branch")
    decode = fp32_operations(model, "bf16+fp32_mask_decode")
    assert decode and decode < branch
    assert any(types[name] in CONVOLUTIONS for name in branch)  # the mask head's convolutions
    assert not any(types[name] in CONVOLUTIONS for name in decode)
    assert any(types[name] == "MatMul" for name in decode)  # EmbedMask's coupling, MEInst's codec
    detections = {op.get_friendly_name() for op in model.get_ordered_ops() if "NonMaxSuppression" in op.get_type_name()}
    assert detections and not detections & branch
    assert fp32_operations(model, "bf16") == fp32_operations(model, "fp32") == set()


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16: everything runs in fp32")
def test_openvino_keeps_the_marked_operations_in_fp32(tiny_graph: Path, tmp_path: Path) -> None:
    """The mark survives OpenVINO's IR and its CPU plugin (which ignores it when set from Python): under
    bf16+fp32_mask_decode EmbedMask's coupling MatMul runs in f32 while the convolutions run in bf16; under
    bf16 it runs in bf16 too. The marked IR is cached, so a second runtime on the cache writes none."""
    if tiny_graph.stem != "embedmask":
        pytest.skip(
            "MEInst's codec MatMul has constant weights: the plugin makes it a FullyConnected and drops the mark"
        )
    model = ov.Core().read_model(str(tiny_graph))
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    matmuls = {name for name in fp32_operations(model, "bf16+fp32_mask_decode") if types[name] == "MatMul"}

    def precisions(runtime: OpenVinoRuntime) -> dict[str, set[str]]:
        """Runtime precisions of the convolutions and of what the decode's MatMuls became."""
        found: dict[str, set[str]] = {"convolutions": set(), "matmuls": set()}
        for op in runtime.engine(128, 160).compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            precision = info["runtimePrecision"].astype(str)
            if info["layerType"].astype(str) == "Convolution":
                found["convolutions"].add(precision)
            if matmuls & set(info["originalLayersNames"].astype(str).split(",")):
                found["matmuls"].add(precision)
        return found

    mixed = precisions(OpenVinoRuntime(tiny_graph, precision="bf16+fp32_mask_decode", cache_dir=tmp_path))
    plain = precisions(OpenVinoRuntime(tiny_graph, precision="bf16"))
    assert mixed["convolutions"] == plain["convolutions"] == {"bf16"}
    assert mixed["matmuls"] == {"f32"} and plain["matmuls"] == {"bf16"}
    (written,) = (tmp_path / "ir").glob("*.xml")
    OpenVinoRuntime(tiny_graph, precision="bf16+fp32_mask_decode", cache_dir=tmp_path)
    assert list((tmp_path / "ir").glob("*.xml")) == [written]


def test_a_checkpoints_measured_precision_reaches_the_runtime(tmp_path: Path) -> None:
    """``cpu_precision`` in a checkpoint (``training.precision`` writes it) travels into the exported graph's
    metadata, and ``auto`` runs it where the CPU has bf16."""
    checkpoint = tiny_checkpoint("embedmask", tmp_path / "tiny.pt")
    saved = load_checkpoint(checkpoint)
    saved["cpu_precision"] = "bf16+fp32_mask_branch"
    save_checkpoint(saved, checkpoint)
    opened = open_runtime(checkpoint, RuntimeOptions(engine="openvino"), tmp_path / "cache")
    assert opened.metadata.cpu_precision == "bf16+fp32_mask_branch"
    assert opened.precision == ("bf16+fp32_mask_branch" if cpu_has_bf16() else "fp32")
    assert opened.max_batch_size == 1  # batch-1 engines: the service forms no larger batches


def test_engines_beyond_max_engines_are_released_and_compiled_again(tiny_graph: Path) -> None:
    """At most ``max_engines`` shapes stay compiled, the least recently used released first; a released
    shape compiles again on its next use with the same outputs."""
    runtime = OpenVinoRuntime(tiny_graph, precision="fp32", threads=1, max_engines=2)
    first = runtime.infer(noise_images(1, 96, 128, seed=1))
    runtime.infer(noise_images(1, 128, 128))
    runtime.infer(noise_images(1, 96, 128, seed=2))  # 96x128 is now the most recently used
    runtime.infer(noise_images(1, 128, 160))
    assert runtime.shapes == [(96, 128), (128, 160)]
    runtime.infer(noise_images(1, 128, 128))
    assert runtime.shapes == [(128, 128), (128, 160)]
    again = runtime.infer(noise_images(1, 96, 128, seed=1))
    assert all(np.array_equal(first[name], again[name]) for name in first)


def test_model_cache_makes_a_second_start_fast(tiny_graph: Path, tmp_path: Path) -> None:
    images = noise_images(1, 160, 224, seed=3)
    started = time.perf_counter()
    first = OpenVinoRuntime(tiny_graph, precision="fp32", threads=1, cache_dir=tmp_path).infer(images)
    cold = time.perf_counter() - started
    assert any(tmp_path.iterdir()), "OpenVINO wrote no model cache"
    started = time.perf_counter()
    second = OpenVinoRuntime(tiny_graph, precision="fp32", threads=1, cache_dir=tmp_path).infer(images)
    warm = time.perf_counter() - started
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert warm < cold


def clear_cut(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], image: int) -> float:
    """The lowest score cut from CONFIDENT up that no detection of either output lies within
    BF16_SCORE_TOLERANCE of: a detection whose score bf16 moves by less than that cannot cross it, so the
    two outputs' confident sets must agree one by one (at a fixed cut, a 0.297 that bf16 makes 0.307 did not)."""
    scores = np.concatenate([o["scores"][image, : int(o["num_dets"][image])] for o in (reference, candidate)])
    for cut in np.arange(CONFIDENT, 0.7, 0.005):
        if np.all(np.abs(scores - cut) > BF16_SCORE_TOLERANCE):
            return float(cut)
    raise AssertionError(f"image {image}: no score cut in [{CONFIDENT}, 0.7) clear of every detection")


def confident(outputs: dict[str, np.ndarray], image: int, cut: float = CONFIDENT) -> dict[str, np.ndarray]:
    """One image's detections scoring >= ``cut``, as a batch of one in the graph's layout."""
    keep = np.flatnonzero(outputs["scores"][image, : int(outputs["num_dets"][image])] >= cut)
    return {
        "num_dets": np.array([len(keep)]),
        **{k: outputs[k][image : image + 1, keep] for k in ("boxes", "scores", "classes", "masks")},
    }


@pytest.fixture(scope="module")
def hela_tiles(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Three 256x256 HeLa nucleus tiles (raw 16-bit, read by the bundled models' percentile rule) as
    ``[H, W, 3]`` uint8 images; the train band is the one tall enough for 256-pixel tiles."""
    from training.nucleus import build

    root = tmp_path_factory.mktemp("hela")
    build(str(root), tile=256, frames=1)
    tiles = sorted((root / "train").glob("*.png"))[:3]
    return np.stack([decode_rgb8(t.read_bytes(), "percentile") for t in tiles])


@pytest.mark.skipif(
    not cpu_has_bf16(),
    reason="this CPU has no bf16 (no BF16 in OpenVINO's OPTIMIZATION_CAPABILITIES); fp32 is tested above",
)
@pytest.mark.parametrize("method", ["meinst", "embedmask"])
def test_the_default_precision_keeps_what_users_see_on_a_trained_model(
    method: str, hela_tiles: np.ndarray, tmp_path: Path
) -> None:
    """What a bf16 CPU serves by default (the model's measured precision: bf16, with EmbedMask's mask branch in
    fp32) against onnxruntime's fp32, detection by detection."""
    graph = export_checkpoint(REPO / "models" / f"{method}_nucleus" / "model.pt", tmp_path / f"{method}.onnx")
    reference_runtime = OnnxRuntime(graph, providers=["CPUExecutionProvider"])
    contract = reference_runtime.metadata.input
    batch = np.stack([contract.resize_image(tile) for tile in hela_tiles])  # at the model's own scale
    input_size = batch.shape[2:]
    reference = reference_runtime.infer(batch)
    runtime = OpenVinoRuntime(graph, precision="auto", threads=1)
    assert runtime.precision == (runtime.metadata.cpu_precision or DEFAULT_CPU_PRECISION) != "fp32"
    candidate = runtime.infer(batch)
    ious: list[float] = []
    for image in range(len(hela_tiles)):
        cut = clear_cut(reference, candidate, image)
        ours, theirs = confident(reference, image, cut), confident(candidate, image, cut)
        # same class, box corners within 2 pixels of the image (4 input pixels at the models' 1.75-2x scales)
        pairs, problems = match_image(ours, theirs, 0, rtol=0.0, atol=4.0)
        assert problems == []
        scores = np.array([[ours["scores"][0, a], theirs["scores"][0, b]] for a, b in pairs])
        assert (
            np.abs(scores[:, 0] - scores[:, 1]).max() <= BF16_SCORE_TOLERANCE
        )  # bf16 convolutions: up to 0.023 seen on the bundled models
        ious += mask_ious(ours, theirs, 0, pairs, runtime.metadata, input_size=input_size, image_size=input_size)
    assert len(ious) >= 15
    # bf16 convolutions move a mask's border by a pixel here and there: the median instance keeps IoU 0.99
    # with the bundled models at their own scale, the worst (a small nucleus in MEInst's 28x28 grid) 0.898.
    assert np.median(ious) >= 0.98 and min(ious) >= 0.85, sorted(ious)[:5]


def test_service_serves_through_openvino(tmp_path: Path) -> None:
    """``--runtime.engine openvino``: one batch-1 engine per bucket, the largest compiled at warm-up into the cache
    directory and the others on first use, and a batch of 3 answered image by image as onnxruntime answers it."""
    spec = ModelSpec(name="tiny", path=tiny_checkpoint("meinst", tmp_path / "tiny.pt"), buckets=["128x128", "128x192"])
    settings = Settings(
        models=[spec],
        cache_dir=tmp_path / "cache",
        runtime=RuntimeOptions(engine="openvino", precision="fp32", streams=2, threads=1),
        max_batch_size=2,
    )
    model, _ = load_model(spec, settings)
    assert (model.engine, model.streams, model.precision) == ("openvino", 2, "fp32")
    assert isinstance(model.runtime, OpenVinoRuntime)
    assert model.runtime.shapes == [(128, 192)]
    assert any((tmp_path / "cache" / "openvino").iterdir())
    model.runtime.infer(noise_images(1, 128, 128))
    assert model.runtime.shapes == [(128, 128), (128, 192)]
    images = noise_images(3, 128, 192, seed=5)
    reference = OnnxRuntime(model.graph_path, providers=["CPUExecutionProvider"]).infer(images)
    assert (
        compare_outputs(
            reference, model.runtime.infer(images), model.metadata, input_size=(128, 192), image_size=(128, 192)
        )
        == []
    )


def test_evaluation_runs_the_checkpoints_graph_through_openvino(tmp_path: Path) -> None:
    """``training.evaluate --runtime openvino --precision fp32`` evaluates the same exported graph as
    ``--runtime onnxruntime`` (one factory opens both), with the same outputs."""
    checkpoint = tiny_checkpoint("embedmask", tmp_path / "tiny.pt")
    opened = open_runtime(checkpoint, RuntimeOptions(engine="openvino", precision="fp32"), tmp_path)
    reference = open_runtime(checkpoint, RuntimeOptions(engine="onnxruntime"), tmp_path)
    assert opened.graph_path == reference.graph_path and opened.precision == "fp32"
    assert isinstance(opened.runtime, OpenVinoRuntime) and opened.runtime.precision == "fp32"
    images = noise_images(2, 128, 160, seed=7)
    expected = reference.runtime.infer(images)
    assert (
        compare_outputs(
            expected, opened.runtime.infer(images), opened.metadata, input_size=(128, 160), image_size=(128, 160)
        )
        == []
    )
    assert expected["num_dets"].min() > 0 and reference.metadata.mask_kind == opened.metadata.mask_kind


def test_auto_picks_openvino_only_on_a_bf16_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine=auto``: OpenVINO where it is installed and the CPU computes in bf16 (its only speed-up over
    onnxruntime here, bought with memory), onnxruntime on CUDA, on CPUs without bf16, without the package or
    when onnxruntime providers are configured, TensorRT for engines, and a configured engine as it is."""
    import export.openvino_runtime as openvino_runtime
    import inference.runtime as runtime

    monkeypatch.setattr(runtime, "default_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "openvino_installed", lambda: True)
    monkeypatch.setattr(openvino_runtime, "cpu_has_bf16", lambda: True)
    auto = RuntimeOptions(engine="auto")
    assert runtime.choose_engine(auto, ".onnx") == "openvino"
    assert runtime.choose_engine(auto, ".plan") == "tensorrt"
    assert runtime.choose_engine(RuntimeOptions(engine="onnxruntime"), ".onnx") == "onnxruntime"
    assert runtime.choose_engine(RuntimeOptions(providers=["CPUExecutionProvider"]), ".onnx") == "onnxruntime"
    monkeypatch.setattr(openvino_runtime, "cpu_has_bf16", lambda: False)
    assert runtime.choose_engine(auto, ".onnx") == "onnxruntime"
    monkeypatch.setattr(openvino_runtime, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(runtime, "default_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.choose_engine(auto, ".onnx") == "onnxruntime"
    monkeypatch.setattr(runtime, "default_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "openvino_installed", lambda: False)
    assert runtime.choose_engine(auto, ".onnx") == "onnxruntime"


def test_service_takes_runtime_options_per_model(tmp_path: Path) -> None:
    """One service, two models, two engines: the service's options hold unless a model's entry overrides them,
    key by key; an unknown option or engine is refused before anything loads."""
    settings = Settings(
        models=[
            ModelSpec(name="a", path=tmp_path / "a.onnx"),
            ModelSpec(name="b", path=tmp_path / "b.onnx", runtime={"engine": "onnxruntime", "threads": 3}),
        ],
        runtime=RuntimeOptions(engine="openvino", precision="fp32", streams=2, threads=1),
    )
    a, b = (settings.runtime_options(spec) for spec in settings.models)
    assert (a.engine, a.precision, a.streams, a.threads) == ("openvino", "fp32", 2, 1)
    assert (b.engine, b.precision, b.streams, b.threads) == ("onnxruntime", "fp32", 2, 3)
    for bad in ({"engnie": "onnxruntime"}, {"engine": "tensorflow"}, {"streams": 0}):
        with pytest.raises(ValueError):
            ModelSpec(name="c", path=tmp_path / "c.onnx", runtime=bad)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16: training.precision has nothing to choose")
def test_precision_check_stores_the_fastest_precision_within_tolerance(tmp_path: Path) -> None:
    """``python -m training.precision`` on a validation split: fp32 onnxruntime is the reference and the fastest
    OpenVINO precision within the tolerance is written into the checkpoint, whose next export carries it. (A
    random-weight model scores about nothing in every precision, so bf16 itself is within any tolerance.)"""
    from training.nucleus import build
    from training.precision import main

    build(str(tmp_path / "nucleus"), tile=256, frames=1)
    extra = ("data.resize=scale", "data.scale_test=1.0", "data.intensity=percentile", "model.num_classes=1")
    checkpoint = tiny_checkpoint("embedmask", tmp_path / "tiny.pt", extra=extra)
    saved = load_checkpoint(checkpoint)
    saved.update(class_names=["nucleus"], category_ids=[1])
    save_checkpoint(saved, checkpoint)
    args = ["--checkpoint", str(checkpoint), "--annotations", str(tmp_path / "nucleus" / "val_fields.json")]
    main([*args, "--images", str(tmp_path / "nucleus" / "val_fields"), "--cache-dir", str(tmp_path / "cache")])
    assert load_checkpoint(checkpoint)["cpu_precision"] == "bf16"
    opened = open_runtime(checkpoint, RuntimeOptions(engine="openvino"), tmp_path / "cache")
    assert opened.metadata.cpu_precision == opened.precision == "bf16"
