"""TensorRT: profile rules and the FP16 layer rule (everywhere), engine build and parity (GPU hosts only).

The engine tests need the ``tensorrt`` package and a CUDA device; elsewhere they are skipped with the
reason. They build FP32 engines without TF32 from the same tiny graphs as test_export_onnx.py and compare
the engine with onnxruntime on CPU (same detections, finished-mask IoU >= 0.99).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import build_metadata, export_onnx
from export.parity import compare_outputs
from export.runtimes import OnnxRuntime
from export.tensorrt_build import Profile, default_profile, parse_shape, runs_in_fp16
from tests.test_export_onnx import CHECKPOINT_METADATA, flat_image, noise_images, tiny_detector

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
GPU_REASON = "needs the tensorrt package and a CUDA device (TensorRT engines run on NVIDIA GPUs only)"
needs_gpu = pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()), reason=GPU_REASON)
PROFILE = Profile(min=(1, 3, 64, 64), opt=(2, 3, 128, 192), max=(3, 3, 192, 256))


@pytest.fixture(scope="module")
def meinst_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, cfg = tiny_detector("meinst")
    path = tmp_path_factory.mktemp("trt") / "meinst.onnx"
    export_onnx(model, cfg, CHECKPOINT_METADATA, path)
    return path


def test_shapes_parse_and_profiles_are_validated() -> None:
    assert parse_shape("4x3x800x1344") == (4, 3, 800, 1344) == parse_shape("4,3,800,1344")
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        parse_shape("3x800x1344")
    with pytest.raises(ValueError, match="multiples of 32"):
        Profile(min=(1, 3, 64, 64), opt=(1, 3, 100, 128), max=(2, 3, 128, 128))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile(min=(1, 3, 64, 64), opt=(4, 3, 128, 128), max=(2, 3, 128, 128))


def test_default_profile_covers_the_resize_rule() -> None:
    metadata = build_metadata(tiny_detector("meinst")[1], CHECKPOINT_METADATA)  # min_size 128, max_size 192
    profile = default_profile(metadata, max_batch=8)
    assert profile == Profile(min=(1, 3, 64, 64), opt=(4, 3, 128, 192), max=(8, 3, 192, 192))


def test_fp16_rule_keeps_post_processing_in_fp32(meinst_onnx: Path) -> None:
    """TensorRT names layers after ONNX nodes: convolutions of the trunks may run in FP16; NMS, its
    coordinate offsets, top-k, scatter and the mask decode stay FP32."""
    nodes = onnx.load(str(meinst_onnx)).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    assert convs and all(runs_in_fp16(name) for name in convs)
    assert any(name.startswith("/model/mask_method/mask_tower/") for name in convs)
    post = [
        n.name for n in nodes if n.op_type in ("NonMaxSuppression", "TopK", "ScatterND", "CumSum", "NonZero", "MatMul")
    ]
    assert post and not any(runs_in_fp16(name) for name in post)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where TensorRT is absent")
def test_missing_tensorrt_is_a_clear_error(meinst_onnx: Path, tmp_path: Path) -> None:
    from export.tensorrt_build import build_engine

    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        build_engine(meinst_onnx, tmp_path / "model.plan", PROFILE)


def test_cached_engine_is_rebuilt_when_its_build_changes(
    meinst_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine cache (inference.runtime.build_engine_cached), with the build itself faked: an engine is
    reused only while the profile, precision, TensorRT version and GPU it was built for hold."""
    import export.tensorrt_build as trt_build
    from export.metadata import read_onnx_metadata, write_engine_sidecar
    from inference.runtime import build_engine_cached

    machine = {"tensorrt_version": "10.16.1", "device": "NVIDIA H100 sm_90"}
    builds: list[dict] = []

    def identity(profile: Profile, *, fp16: bool, tf32: bool = True) -> dict:
        return {**machine, "fp16": fp16, "tf32": tf32, "profile": {"max": list(profile.max)}}

    def fake_build(onnx_path: Path, engine_path: Path, profile: Profile, *, fp16: bool = False) -> Path:
        info = identity(profile, fp16=fp16)
        builds.append(info)
        Path(engine_path).write_bytes(b"engine")
        write_engine_sidecar(engine_path, read_onnx_metadata(onnx_path), info)
        return Path(engine_path)

    monkeypatch.setattr(trt_build, "build_identity", identity)
    monkeypatch.setattr(trt_build, "build_engine", fake_build)
    target = tmp_path / "cache" / "meinst.plan"

    def serve(max_batch_size: int, fp16: bool = False) -> None:
        assert build_engine_cached(meinst_onnx, target, [(128, 192)], max_batch_size, fp16) == target

    serve(max_batch_size=4)
    serve(max_batch_size=4)
    assert len(builds) == 1 and builds[0]["profile"]["max"] == [4, 3, 192, 192]
    serve(max_batch_size=8)
    serve(max_batch_size=8, fp16=True)
    machine["device"] = "NVIDIA L4 sm_89"
    serve(max_batch_size=8, fp16=True)
    machine["tensorrt_version"] = "10.17.0"
    serve(max_batch_size=8, fp16=True)
    serve(max_batch_size=8, fp16=True)
    assert [(b["profile"]["max"][0], b["fp16"], b["device"], b["tensorrt_version"]) for b in builds] == [
        (4, False, "NVIDIA H100 sm_90", "10.16.1"),
        (8, False, "NVIDIA H100 sm_90", "10.16.1"),
        (8, True, "NVIDIA H100 sm_90", "10.16.1"),
        (8, True, "NVIDIA L4 sm_89", "10.16.1"),
        (8, True, "NVIDIA L4 sm_89", "10.17.0"),
    ]
    later = meinst_onnx.stat().st_mtime + 10  # a newer graph (a new export) is always rebuilt
    os.utime(meinst_onnx, (later, later))
    serve(max_batch_size=8, fp16=True)
    assert len(builds) == 6


@pytest.fixture(scope="module", params=["meinst", "embedmask"])
def engines(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not (HAS_TENSORRT and torch.cuda.is_available()):
        pytest.skip(GPU_REASON)
    from export.tensorrt_build import build_engine

    folder = tmp_path_factory.mktemp("engines")
    model, cfg = tiny_detector(request.param)
    onnx_path = folder / "model.onnx"
    export_onnx(model, cfg, CHECKPOINT_METADATA, onnx_path)
    build_engine(onnx_path, folder / "fp32.plan", PROFILE, tf32=False, workspace_gib=1.0)
    build_engine(onnx_path, folder / "fp16.plan", PROFILE, fp16=True, workspace_gib=1.0)
    return onnx_path, folder


@needs_gpu
@pytest.mark.parametrize("batch, height, width", [(1, 96, 128), (3, 128, 192)])
def test_engine_matches_onnxruntime(engines: tuple[Path, Path], batch: int, height: int, width: int) -> None:
    from export.runtimes import TensorRTRuntime

    onnx_path, folder = engines
    reference_runtime = OnnxRuntime(onnx_path, providers=["CPUExecutionProvider"])
    engine = TensorRTRuntime(folder / "fp32.plan")
    assert engine.metadata == reference_runtime.metadata and engine.build_info["fp16"] is False
    images = (
        np.concatenate([noise_images(batch - 1, height, width), flat_image(height, width)])
        if batch > 1
        else noise_images(1, height, width)
    )
    reference, candidate = reference_runtime.infer(images), engine.infer(images)
    for name, value in reference.items():
        assert candidate[name].shape == value.shape and candidate[name].dtype == value.dtype, name
    problems = compare_outputs(
        reference,
        candidate,
        engine.metadata,
        input_size=(height, width),
        image_size=(height, width),
        rtol=1e-3,
        atol=1e-2,
    )
    assert problems == []
    assert reference["num_dets"][0] > 0 and (batch == 1 or reference["num_dets"][-1] == 0)


@needs_gpu
def test_fp16_engine_runs_and_keeps_the_contract(engines: tuple[Path, Path]) -> None:
    from export.runtimes import TensorRTRuntime

    _, folder = engines
    engine = TensorRTRuntime(folder / "fp16.plan")
    outputs = engine.infer(noise_images(2, 128, 192))
    assert engine.build_info["fp16"] is True
    assert outputs["boxes"].dtype == np.float32 and outputs["classes"].dtype == np.int64
    count = int(outputs["num_dets"][0])
    assert 0 < count <= 100 and np.isfinite(outputs["boxes"][0, :count]).all()
    assert (outputs["scores"][0, :count] > 0.05).all() and (np.diff(outputs["scores"][0, :count]) <= 1e-3).all()


@needs_gpu
def test_engine_rejects_shapes_outside_its_profile(engines: tuple[Path, Path]) -> None:
    from export.runtimes import TensorRTRuntime

    engine = TensorRTRuntime(engines[1] / "fp32.plan")
    with pytest.raises(ValueError, match="outside the engine's profile"):
        engine.infer(noise_images(4, 64, 64))


@needs_gpu
def test_engine_tensors_match_the_onnx_graph(engines: tuple[Path, Path]) -> None:
    from export.tensorrt_build import engine_tensor_specs
    from export.triton_repo import onnx_tensor_specs

    onnx_path, folder = engines

    def summary(specs):  # names, Triton types and ranks (TensorRT may resolve some dims differently)
        return [[(s.name, s.data_type, len(s.shape)) for s in group] for group in specs]

    assert summary(engine_tensor_specs(folder / "fp32.plan")) == summary(onnx_tensor_specs(onnx_path))
