"""The PyTorch serving runtime (``--runtime torch``) against the fused ONNX graph, on the CPU and, where
torch sees a CUDA device, on the GPU (tests marked ``cuda``; ``bench/gpu_check.py`` runs them there).

The parity bar is the export's: same detections (class, box and score within 1e-3) and finished masks
with IoU >= 0.99. Reduced precisions (bf16, fp16) cannot meet it on near-tied low scores, so they are held
to what a user sees: the confident detections (score >= 0.3) keep their boxes and masks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from export.metadata import GraphMetadata
from export.onnx_export import build_metadata, export_onnx
from export.parity import compare_outputs, mask_ious
from export.runtimes import OnnxRuntime
from inference.runtime import RuntimeOptions
from model.checkpoint import load_detector
from model.intensity import decode_rgb8
from model.runtime import Precision, TorchRuntime
from service.launcher import ServiceProcess
from service.models import load_model
from service.settings import REPO, ModelSpec, Settings
from tests.service_models import (
    CATEGORY_IDS,
    CLASS_NAMES,
    tiny_checkpoint,
    tiny_detector,
)
from tests.test_service import nucleus_tile, offline, post

CHECKPOINT_METADATA = {"class_names": CLASS_NAMES, "category_ids": CATEGORY_IDS}
BUNDLED = {
    "meinst": REPO / "models" / "meinst_nucleus" / "model.pt",
    "embedmask": REPO / "models" / "embedmask_nucleus" / "model.pt",
}
METHODS = ("meinst", "embedmask")
CONFIDENT = 0.3
TILE_SIZE = (128, 128)  # the nucleus fixture's tiles, run at native size as the bundled models' contract says
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_check.py on a GPU)"
)


def noise_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 3, height, width), dtype=np.uint8)


def tile_batch(nucleus_root: Path, count: int) -> np.ndarray:
    """``count`` HeLa validation tiles (128 pixels) at the bundled models' test size, 256x256."""
    paths = sorted((nucleus_root / "val").glob("*.png"))[:count]
    return np.stack([decode_rgb8(p.read_bytes(), "percentile").transpose(2, 0, 1) for p in paths])


def confident_agreement(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], metadata: GraphMetadata, size: tuple[int, int]
) -> tuple[float, float]:
    """(share of the reference's confident detections that the candidate has too, with box IoU >= 0.9 and
    the same class; the smallest finished-mask IoU of those pairs)."""
    found, total, worst = 0, 0, 1.0
    for image in range(len(reference["num_dets"])):
        ref_slots = np.flatnonzero(reference["scores"][image, : reference["num_dets"][image]] >= CONFIDENT)
        cand_count = int(candidate["num_dets"][image])
        pairs = []
        for slot in ref_slots:
            box = reference["boxes"][image, slot]
            boxes = candidate["boxes"][image, :cand_count]
            lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
            inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
            union = np.prod(box[2:] - box[:2]) + np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) - inter
            iou = np.where(
                candidate["classes"][image, :cand_count] == reference["classes"][image, slot], inter / union, 0.0
            )
            if len(iou) and iou.max() >= 0.9:
                pairs.append((int(slot), int(iou.argmax())))
        total += len(ref_slots)
        found += len(pairs)
        if pairs:
            worst = min(worst, *mask_ious(reference, candidate, image, pairs, metadata, size, size))
    assert total > 0, "the reference has no confident detection to compare"
    return found / total, worst


class Bundled:
    """A bundled checkpoint, its exported graph (onnxruntime, CPU) and metadata."""

    def __init__(self, method: str, folder: Path) -> None:
        self.method = method
        model, cfg, checkpoint_metadata = load_detector(BUNDLED[method])
        self.path = folder / f"{method}.onnx"
        self.metadata = export_onnx(model, cfg, checkpoint_metadata, self.path)
        self.graph = OnnxRuntime(self.path, providers=["CPUExecutionProvider"])

    def torch_runtime(self, device: str = "cpu", **options: object) -> TorchRuntime:
        return TorchRuntime(load_detector(BUNDLED[self.method])[0], device, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=METHODS)
def bundled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Bundled:
    return Bundled(request.param, tmp_path_factory.mktemp("bundled"))


# ---------------------------------------------------------------- CPU
@pytest.mark.parametrize("method", METHODS)
def test_serving_options_match_the_graph_on_noise(method: str, tmp_path: Path) -> None:
    model, cfg = tiny_detector(method)
    metadata = export_onnx(model, cfg, CHECKPOINT_METADATA, tmp_path / "graph.onnx")
    graph = OnnxRuntime(tmp_path / "graph.onnx", providers=["CPUExecutionProvider"])
    runtime = TorchRuntime(tiny_detector(method)[0], channels_last=True)
    flat = np.broadcast_to(np.array(metadata.input.pad_value, dtype=np.uint8)[None, :, None, None], (1, 3, 128, 192))
    images = np.concatenate([noise_images(2, 128, 192), flat])
    reference, candidate = runtime.infer(images), graph.infer(images)
    assert {k: (v.shape, v.dtype) for k, v in reference.items()} == {
        k: (v.shape, v.dtype) for k, v in candidate.items()
    }
    assert compare_outputs(reference, candidate, metadata, input_size=(128, 192), image_size=(192, 288)) == []
    assert reference["num_dets"][:2].min() > 10 and reference["num_dets"][2] == 0


def test_bundled_models_match_their_graph_on_nucleus_tiles(bundled: Bundled, nucleus_root: Path) -> None:
    images = tile_batch(nucleus_root, 4)
    reference = bundled.torch_runtime(channels_last=True).infer(images)
    assert (
        compare_outputs(
            reference, bundled.graph.infer(images), bundled.metadata, input_size=TILE_SIZE, image_size=TILE_SIZE
        )
        == []
    )
    assert (reference["scores"] >= CONFIDENT).sum() >= 4


def test_bf16_autocast_keeps_the_confident_detections(bundled: Bundled, nucleus_root: Path) -> None:
    images = tile_batch(nucleus_root, 4)
    reduced = bundled.torch_runtime(precision="bf16", channels_last=True).infer(images)
    assert {k: v.dtype for k, v in reduced.items()} == {k: v.dtype for k, v in bundled.graph.infer(images).items()}
    share, worst_mask_iou = confident_agreement(bundled.graph.infer(images), reduced, bundled.metadata, TILE_SIZE)
    assert share >= 0.9 and worst_mask_iou >= 0.8


def test_runtime_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TorchRuntime(tiny_detector("meinst")[0], "cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="precision"):
        TorchRuntime(tiny_detector("meinst")[0], precision="int8")  # type: ignore[arg-type]
    model, cfg = tiny_detector("meinst")
    export_onnx(model, cfg, CHECKPOINT_METADATA, tmp_path / "graph.onnx")
    with pytest.raises(ValueError, match=r"the torch engine runs training checkpoints \(.pt\)"):
        settings = Settings(runtime=RuntimeOptions(engine="torch"), warmup=False)
        load_model(ModelSpec(name="m", path=tmp_path / "graph.onnx"), settings)


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, dict[str, Path]]]:
    workdir = tmp_path_factory.mktemp("torch_service")
    checkpoints = {method: tiny_checkpoint(method, workdir / f"{method}.pt") for method in METHODS}
    models = [{"name": method, "path": str(path)} for method, path in checkpoints.items()]
    process = ServiceProcess(
        [
            "--models",
            json.dumps(models),
            "--cache-dir",
            str(workdir / "cache"),
            "--runtime.engine",
            "torch",
            "--max-batch-size",
            "2",
        ],
        workdir / "server.log",
    )
    try:
        process.wait_ready()
        yield process, checkpoints
    finally:
        process.terminate()


@pytest.mark.parametrize("method", METHODS)
def test_service_with_the_torch_runtime_answers_as_offline_inference(
    torch_server: tuple[ServiceProcess, dict[str, Path]], nucleus_root: Path, method: str
) -> None:
    server, checkpoints = torch_server
    meta = httpx.get(f"{server.url}/v2/models/{method}").json()
    assert (meta["runtime"], meta["platform"], meta["providers"]) == ("torch", "pytorch_libtorch", ["cpu", "fp32"])
    tile = nucleus_tile(nucleus_root)
    response = post(server.url, tile, "image/png", model=method)
    assert response.status_code == 200, response.text
    model, cfg, checkpoint_metadata = load_detector(checkpoints[method])
    # offline() reads the export metadata off its runtime, as OnnxRuntime carries it.
    runtime = SimpleNamespace(infer=TorchRuntime(model).infer, metadata=build_metadata(cfg, checkpoint_metadata))
    expected = offline(runtime, method, meta["versions"][0], tile, meta["buckets"])  # type: ignore[arg-type]
    body, expected = response.json(), json.loads(json.dumps(expected))
    # Equal up to float rounding: the server's torch may run on another thread count than this process's.
    assert body.keys() == expected.keys() and all(body[k] == expected[k] for k in body if k != "instances")
    assert len(body["instances"]) == len(expected["instances"]) > 0
    for served, offline_instance in zip(body["instances"], expected["instances"]):
        assert served["category_id"] == offline_instance["category_id"]
        assert served["bbox"] == pytest.approx(offline_instance["bbox"], abs=1e-3)
        assert served["score"] == pytest.approx(offline_instance["score"], abs=1e-4)
        rles = [
            {**i["segmentation"], "counts": i["segmentation"]["counts"].encode()} for i in (served, offline_instance)
        ]
        assert mask_utils.iou(rles[:1], rles[1:], [0])[0, 0] >= 0.99


# ---------------------------------------------------------------- CUDA
@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """Plain float32 convolutions and matmuls (torch lets cuDNN use TF32 by default, ~1e-3 relative)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_the_cpu_graph(method: str, tmp_path: Path, exact_fp32: None) -> None:
    model, cfg = tiny_detector(method)
    metadata = export_onnx(model, cfg, CHECKPOINT_METADATA, tmp_path / "graph.onnx")
    graph = OnnxRuntime(tmp_path / "graph.onnx", providers=["CPUExecutionProvider"])
    images = noise_images(3, 128, 192)
    for options in ({}, {"channels_last": True}, {"channels_last": True, "cuda_graphs": True}):
        runtime = TorchRuntime(tiny_detector(method)[0], "cuda", **options)
        assert (
            compare_outputs(
                runtime.infer(images), graph.infer(images), metadata, input_size=(128, 192), image_size=(128, 192)
            )
            == []
        ), options


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_graph_replays_follow_their_input(method: str, exact_fp32: None) -> None:
    eager = TorchRuntime(tiny_detector(method)[0], "cuda", channels_last=True)
    captured = TorchRuntime(tiny_detector(method)[0], "cuda", channels_last=True, cuda_graphs=True)
    metadata = build_metadata(tiny_detector(method)[1], CHECKPOINT_METADATA)
    # New images into an already captured shape, a second shape, then the first again.
    for seed, shape in enumerate([(2, 128, 192), (2, 128, 192), (1, 128, 192), (2, 128, 192)]):
        images = noise_images(*shape, seed=seed)
        problems = compare_outputs(
            eager.infer(images),
            captured.infer(images),
            metadata,
            input_size=(128, 192),
            image_size=(128, 192),
            rtol=1e-5,
            atol=1e-4,
        )
        assert problems == []
    assert captured.captured_shapes == [(1, 3, 128, 192), (2, 3, 128, 192)]


@pytest.mark.cuda
@needs_cuda
def test_compiled_network_matches_eager(exact_fp32: None) -> None:
    model, cfg = tiny_detector("embedmask")
    metadata = build_metadata(cfg, CHECKPOINT_METADATA)
    eager = TorchRuntime(model, "cuda", channels_last=True)
    compiled = TorchRuntime(tiny_detector("embedmask")[0], "cuda", channels_last=True, compile=True)
    images = noise_images(2, 128, 192)
    assert (
        compare_outputs(
            eager.infer(images), compiled.infer(images), metadata, input_size=(128, 192), image_size=(128, 192)
        )
        == []
    )


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_keep_the_confident_detections(
    bundled: Bundled, nucleus_root: Path, precision: Precision
) -> None:
    images = tile_batch(nucleus_root, 4)
    reduced = bundled.torch_runtime("cuda", precision=precision, channels_last=True).infer(images)
    share, worst_mask_iou = confident_agreement(bundled.graph.infer(images), reduced, bundled.metadata, TILE_SIZE)
    assert share >= 0.9 and worst_mask_iou >= 0.8


@pytest.mark.cuda
@needs_cuda
def test_service_warm_up_captures_every_batch_size(tmp_path: Path) -> None:
    spec = ModelSpec(name="embedmask", path=tiny_checkpoint("embedmask", tmp_path / "embedmask.pt"))
    settings = Settings(
        models=[spec],
        runtime=RuntimeOptions(engine="torch", cuda_graphs=True),
        max_batch_size=3,
        buckets=["128x128", "128x192"],
    )
    loaded, _ = load_model(spec, settings)
    assert loaded.providers[:3] == ["cuda:0", "fp32", "cuda_graphs"]
    assert loaded.runtime.captured_shapes == [(b, 3, h, w) for b in (1, 2, 3) for h, w in ((128, 128), (128, 192))]


def test_prepare_leaves_a_checkpoint_for_the_torch_engine_as_it_is(tmp_path: Path) -> None:
    """``python -m service.prepare --runtime.engine torch`` has nothing to export (the engine runs the checkpoint)
    and says so instead of failing; the default engine exports the graph into the cache."""
    checkpoint = tiny_checkpoint("meinst", tmp_path / "m.pt")
    models = json.dumps([{"name": "m", "path": str(checkpoint)}])
    for engine, exported in (("torch", False), ("onnxruntime", True)):
        cache = tmp_path / f"cache-{engine}"
        done = subprocess.run(
            [sys.executable, "-m", "service.prepare", "--models", models, "--cache-dir", str(cache)]
            + ["--runtime.engine", engine],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert any(cache.glob("*.onnx")) == exported
