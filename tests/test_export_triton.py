"""`python -m export --format triton` from a checkpoint: config.pbtxt parsed with Triton's own schema
(tritonclient's model_config_pb2) and checked against the ONNX graph it ships."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.__main__ import main as export_main
from export.metadata import GraphMetadata, read_onnx_metadata
from export.onnx_export import build_metadata
from export.runtimes import OnnxRuntime
from export.triton_repo import TensorSpec, render_config, write_repository
from model.checkpoint import save_checkpoint
from tests.test_export_onnx import CHECKPOINT_METADATA, noise_images, tiny_detector

ONNX_TO_TRITON = {
    onnx.TensorProto.UINT8: model_config_pb2.TYPE_UINT8,
    onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
}


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Triton repository exported by the command line from a saved EmbedMask checkpoint."""
    folder = tmp_path_factory.mktemp("triton")
    model, cfg = tiny_detector("embedmask")
    checkpoint = folder / "tiny_embedmask.pth"
    save_checkpoint(
        {"model": model.state_dict(), "config": cfg.model_dump(), "iteration": 0, "metrics": {}, **CHECKPOINT_METADATA},
        checkpoint,
    )
    export_main(
        [
            "--checkpoint",
            str(checkpoint),
            "--format",
            "triton",
            "--output",
            str(folder / "repo"),
            "--max-batch",
            "4",
            "--max-queue-delay-us",
            "500",
            "--max-queue-size",
            "16",
        ]
    )
    return folder / "repo"


def test_repository_layout(repository: Path) -> None:
    assert sorted(p.relative_to(repository).as_posix() for p in repository.rglob("*")) == [
        "tiny_embedmask",
        "tiny_embedmask/1",
        "tiny_embedmask/1/model.onnx",
        "tiny_embedmask/config.pbtxt",
    ]


def test_config_parses_with_tritons_schema_and_sets_batching(repository: Path) -> None:
    config = parse_config(repository / "tiny_embedmask" / "config.pbtxt")
    assert config.name == "tiny_embedmask" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 16


def test_config_tensors_match_the_onnx_graph(repository: Path) -> None:
    config = parse_config(repository / "tiny_embedmask" / "config.pbtxt")
    graph = onnx.load(str(repository / "tiny_embedmask" / "1" / "model.onnx")).graph
    declared = {t.name: t for t in [*config.input, *config.output]}
    graph_tensors = [*graph.input, *graph.output]
    assert sorted(declared) == sorted(v.name for v in graph_tensors)
    assert [t.name for t in config.input] == ["images"]
    for value in graph_tensors:
        entry = declared[value.name]
        tensor = value.type.tensor_type
        assert entry.data_type == ONNX_TO_TRITON[tensor.elem_type], value.name
        dims = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
        onnx_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        assert onnx_dims[0] == -1, value.name  # the batch axis, left to max_batch_size
        assert [1 + len(dims), dims] == [len(onnx_dims), onnx_dims[1:]], value.name
    assert list(declared["masks"].dims) == [100, -1, -1] and list(declared["boxes"].dims) == [100, 4]


def test_config_carries_the_metadata_record(repository: Path) -> None:
    config = parse_config(repository / "tiny_embedmask" / "config.pbtxt")
    record = GraphMetadata.from_json(config.parameters["onestage"].string_value)
    assert record == read_onnx_metadata(repository / "tiny_embedmask" / "1" / "model.onnx")
    assert record.class_names == CHECKPOINT_METADATA["class_names"] and record.mask_kind == "logprob_s4"


def test_repository_graph_runs(repository: Path) -> None:
    outputs = OnnxRuntime(repository / "tiny_embedmask" / "1" / "model.onnx", providers=["CPUExecutionProvider"]).infer(
        noise_images(2, 64, 96)
    )
    assert outputs["num_dets"].shape == (2,) and outputs["masks"].shape == (2, 100, 16, 24)


def test_metadata_strings_survive_the_text_format() -> None:
    """Quotes, backslashes, newlines and non-ASCII in class names round-trip through config.pbtxt."""
    _, cfg = tiny_detector("meinst")
    names = ['say "hi"', "back\\slash", "Zellkern-\u00e4\n"]
    metadata = build_metadata(cfg, {"class_names": names, "category_ids": [1, 2, 3]})
    spec = TensorSpec("images", "TYPE_UINT8", (-1, 3, -1, -1))
    text = render_config(
        "m", "onnxruntime", [spec], [], metadata, max_batch_size=2, max_queue_delay_us=0, max_queue_size=1
    )
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert GraphMetadata.from_json(config.parameters["onestage"].string_value).class_names == names


def test_model_names_are_checked(tmp_path: Path) -> None:
    _, cfg = tiny_detector("meinst")
    with pytest.raises(ValueError, match="model name"):
        write_repository(
            tmp_path,
            "bad name/..",
            tmp_path / "model.onnx",
            "onnxruntime",
            [],
            [],
            build_metadata(cfg, CHECKPOINT_METADATA),
        )
    assert list(tmp_path.iterdir()) == []
