"""The fused ONNX graph against eager PyTorch (onnxruntime on CPU), for MEInst and EmbedMask.

Tiny random-init detectors; the head is re-initialised so that images of noise give many detections with
distinct scores and real boxes, while a flat image (every pixel the padding value, so every GroupNorm sees
a constant map and the class logits equal their bias) gives none. One graph per method serves every
batch size and input size below.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from export.metadata import GraphMetadata, read_onnx_metadata
from export.onnx_export import export_onnx
from export.parity import compare_outputs
from export.runtimes import OnnxRuntime
from model.config import HeadConfig
from model.inference import LevelPredictions, select_detections
from model.runtime import TorchRuntime
from tests.service_models import CATEGORY_IDS, CLASS_NAMES, tiny_detector

CHECKPOINT_METADATA = {"class_names": CLASS_NAMES, "category_ids": CATEGORY_IDS}
PAD_VALUE = (124, 116, 104)


def noise_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 3, height, width), dtype=np.uint8)


def flat_image(height: int, width: int) -> np.ndarray:
    return np.broadcast_to(np.array(PAD_VALUE, dtype=np.uint8)[None, :, None, None], (1, 3, height, width)).copy()


class Exported:
    def __init__(self, method: str, folder: Path) -> None:
        self.model, self.cfg = tiny_detector(method)
        self.path = folder / f"{method}.onnx"
        self.metadata = export_onnx(self.model, self.cfg, CHECKPOINT_METADATA, self.path)
        self.eager = TorchRuntime(self.model)
        self.graph = OnnxRuntime(self.path, providers=["CPUExecutionProvider"])

    def compare(self, images: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
        reference = self.eager.infer(images)
        candidate = self.graph.infer(images)
        for name, value in reference.items():
            assert candidate[name].shape == value.shape and candidate[name].dtype == value.dtype, name
        size = images.shape[2:]
        # Originals 1.5x the input, so that finishing resamples the masks.
        original = (size[0] * 3 // 2, size[1] * 3 // 2)
        return reference, compare_outputs(reference, candidate, self.metadata, input_size=size, image_size=original)


@pytest.fixture(scope="module", params=["meinst", "embedmask"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(request.param, tmp_path_factory.mktemp("onnx"))


def test_graph_is_one_standard_onnx_graph_with_dynamic_batch_and_size(exported: Exported) -> None:
    graph = onnx.load(str(exported.path))
    onnx.checker.check_model(graph, full_check=True)
    ops = {(node.domain or "ai.onnx", node.op_type) for node in graph.graph.node}
    assert {domain for domain, _ in ops} == {"ai.onnx"}  # no custom ops
    assert ("ai.onnx", "NonMaxSuppression") in ops and ("ai.onnx", "MatMul") in ops
    assert not {op for _, op in ops} & {"If", "Loop"}  # no control flow (TensorRT needs equal If branches)
    (images,) = graph.graph.input
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    k = exported.cfg.model.head.max_detections
    assert shapes["num_dets"] == ["batch"] and shapes["boxes"] == ["batch", k, 4] and shapes["classes"] == ["batch", k]
    assert shapes["masks"] == (
        ["batch", k, 28, 28] if exported.cfg.model.method == "meinst" else ["batch", k, "height_4", "width_4"]
    )


def test_metadata_record_reads_back(exported: Exported) -> None:
    metadata = read_onnx_metadata(exported.path)
    assert metadata == exported.metadata == exported.graph.metadata
    assert metadata.class_names == ["cell", "nucleus", "debris"] and metadata.category_ids == [3, 5, 9]
    assert (
        metadata.input.min_size == 128
        and metadata.input.max_size == 192
        and metadata.input.pad_value == list(PAD_VALUE)
    )
    assert metadata.max_detections == 100 and metadata.score_threshold == 0.05
    if exported.cfg.model.method == "meinst":
        assert (metadata.mask_kind, metadata.mask_threshold, metadata.mask_size) == ("box28", 0.5, 28)
    else:
        assert (metadata.mask_kind, metadata.mask_threshold, metadata.box_padding) == ("logprob_s4", 0.53, 2)
    assert GraphMetadata.from_json(metadata.to_json()) == metadata


@pytest.mark.parametrize("batch, height, width", [(1, 96, 128), (3, 128, 192)])
def test_graph_matches_eager(exported: Exported, batch: int, height: int, width: int) -> None:
    reference, problems = exported.compare(noise_images(batch, height, width))
    assert problems == []
    assert (reference["num_dets"] > 10).all()


def test_an_image_without_objects_in_a_batch(exported: Exported) -> None:
    images = np.concatenate([noise_images(1, 96, 128, seed=1), flat_image(96, 128), noise_images(1, 96, 128, seed=2)])
    reference, problems = exported.compare(images)
    assert problems == []
    assert reference["num_dets"][1] == 0 and reference["num_dets"][[0, 2]].min() > 0


def test_a_batch_without_any_object(exported: Exported) -> None:
    images = flat_image(64, 96)
    outputs = exported.graph.infer(images)
    assert outputs["num_dets"].tolist() == [0]
    assert not outputs["boxes"].any() and not outputs["scores"].any() and outputs["masks"].shape[:2] == (1, 100)
    assert exported.compare(images)[1] == []


def test_runtime_rejects_inputs_outside_the_contract(exported: Exported) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        exported.graph.infer(noise_images(1, 100, 128))
    with pytest.raises(ValueError, match="uint8"):
        exported.graph.infer(noise_images(1, 96, 128).astype(np.float32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a host without a usable CUDA device")
def test_unusable_accelerator_falls_back_to_cpu(exported: Exported) -> None:
    runtime = OnnxRuntime(exported.path, providers=["CUDAExecutionProvider"])
    assert runtime.providers == ["CPUExecutionProvider"] and not runtime.accelerated
    assert runtime.infer(flat_image(64, 64))["num_dets"].tolist() == [0]


def test_parity_check_reports_each_kind_of_difference(exported: Exported) -> None:
    """The comparison above is only as good as its checker: boxes, counts and masks must all be caught."""
    outputs = exported.graph.infer(noise_images(1, 96, 128))

    def problems(**changes: np.ndarray) -> list[str]:
        return compare_outputs(
            outputs, {**outputs, **changes}, exported.metadata, input_size=(96, 128), image_size=(96, 128)
        )

    assert problems() == []
    boxes = outputs["boxes"].copy()
    boxes[0, 3] += 0.5
    assert [p.split(":")[0] for p in problems(boxes=boxes)] == ["image 0 slot 3"]
    assert problems(num_dets=outputs["num_dets"] - 1) == ["image 0: 100 detections vs 99"]
    masks = outputs["masks"].copy()
    masks[0, 5] = masks[0, 5] * 0.5 if exported.cfg.model.method == "meinst" else masks[0, 5] - 1.0  # shrink one mask
    assert [p.split(":")[0] for p in problems(masks=masks)] == ["image 0 slot 5"]


class _Selection(torch.nn.Module):
    """``select_detections`` over one level, as a traceable module: logits [B,1,H,W] (0 = certain) in."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, _, height, width = logits.shape
        regression = torch.ones(batch, 4, height, width)
        extras = logits.expand(-1, 3, -1, -1) * torch.arange(3.0)[None, :, None, None]
        level = LevelPredictions(logits, regression, torch.zeros_like(logits) + 5.0, extras, stride=8)
        found = select_detections([level], self.cfg, "sqrt")
        return found.num_dets, found.boxes, found.scores, found.extras


def test_graph_traced_on_a_single_detection_serves_many(tmp_path: Path) -> None:
    """The graph must not depend on how many detections the tracing sample kept: traced on a sample that
    keeps exactly one (as a well-trained model can on the exporter's random sample), it must still give
    eager PyTorch's outputs on inputs that keep many, at other sizes and batch sizes."""
    cfg = HeadConfig(max_detections=10)
    module = _Selection(cfg).eval()
    sample = torch.full((1, 1, 4, 4), -20.0)
    sample[0, 0, 1, 1] = 0.0  # the only location above the score threshold
    path = tmp_path / "selection.onnx"
    with torch.no_grad():
        assert int(module(sample)[0]) == 1
        torch.onnx.export(
            module,
            (sample,),
            str(path),
            dynamo=False,
            input_names=["logits"],
            output_names=["num_dets", "boxes", "scores", "extras"],
            dynamic_axes={"logits": {0: "B", 2: "H", 3: "W"}},
        )
    generator = torch.Generator().manual_seed(0)
    many = torch.rand((3, 1, 6, 8), generator=generator) * 4.0 - 2.0  # most locations pass
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"logits": many.numpy()})
    with torch.no_grad():
        expected = module(many)
    assert (expected[0] > 1).all()
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
