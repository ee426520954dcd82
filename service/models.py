"""The served models: each configured path becomes a warmed-up runtime with its metadata and shape buckets.

A training checkpoint is exported to ONNX into the cache directory first (again only when the checkpoint
is newer than the cached graph); with ``runtime=tensorrt`` the graph is then built into a TensorRT engine
the same way, and with ``runtime=openvino`` OpenVINO compiles one batch-1 engine per bucket (its model
cache under ``cache_dir/openvino`` makes restarts fast). A model counts as ready only after every
inference stream ran on every shape bucket at batch 1 and at the largest batch, so that no request pays
for first-run allocation or engine setup.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from export import tensorrt_build
from export.metadata import GraphMetadata, read_engine_sidecar, read_onnx_metadata
from export.runtimes import OnnxRuntime, TensorRTRuntime, default_providers
from model.input_contract import InputContract
from model.runtime_protocol import Runtime
from model.tiling import check_overlap
from service.imaging import auto_buckets
from service.settings import REPO, ModelSpec, Settings, parse_bucket
from service.streams import RuntimeStreams

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".plan", ".engine")
CHECKPOINT_SUFFIX = ".pt"
RuntimeName = Literal["onnxruntime", "openvino", "tensorrt", "torch"]
# The platform name Triton's model metadata gives each runtime's models.
TRITON_PLATFORMS: dict[str, str] = {
    "onnxruntime": "onnxruntime_onnx",
    "openvino": "openvino_onnx",
    "tensorrt": "tensorrt_plan",
    "torch": "pytorch_libtorch",
}
State = Literal["loading", "ready", "failed"]


@dataclass
class LoadedModel:
    name: str
    version: str  # first 12 hex digits of the served graph's sha256
    graph_path: Path
    runtime: Runtime
    runtime_name: RuntimeName
    providers: list[str]
    streams: int  # batches the runtime runs at once
    metadata: GraphMetadata
    rule: InputContract  # metadata.input
    buckets: list[tuple[int, int]]


@dataclass
class ModelEntry:
    spec: ModelSpec
    state: State = "loading"
    error: str | None = None
    model: LoadedModel | None = None


def _newer(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime >= source.stat().st_mtime


def _atomic_output(target: Path) -> Path:
    """A temporary path beside ``target`` (same filesystem, so ``os.replace`` onto it is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def cached_name(spec: ModelSpec, suffix: str) -> str:
    """One cache file per (model name, source file): two checkpoints of one name never share it."""
    digest = hashlib.sha1(str(spec.path.resolve()).encode()).hexdigest()[:10]
    return f"{spec.name}-{digest}{suffix}"


def export_checkpoint(checkpoint: Path, target: Path) -> Path:
    """Export ``checkpoint`` to ONNX at ``target`` unless a cached graph at least as new is there.

    The export runs in a child process (``python -m export``): torch is loaded there and its memory goes
    back when the child exits, so the serving process never imports torch (about 600 MB resident).
    """
    if _newer(target, checkpoint):
        log.info("using cached graph %s for %s", target, checkpoint)
        return target
    log.info("exporting %s to %s", checkpoint, target)
    tmp = _atomic_output(target)
    command = [
        sys.executable,
        "-m",
        "export",
        "--checkpoint",
        str(checkpoint),
        "--format",
        "onnx",
        "--output",
        str(tmp),
    ]
    command.append("--skip-check")  # as the in-process export did: the graph is checked by the export tests
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"exporting {checkpoint} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def build_engine_cached(
    onnx_path: Path, target: Path, metadata: GraphMetadata, buckets: list[tuple[int, int]], settings: Settings
) -> Path:
    """Build a TensorRT engine whose profile covers every bucket up to ``max_batch_size``, unless the cached
    one is newer than the graph and was built the same way (profile, precision, TensorRT version, GPU)."""
    default = tensorrt_build.default_profile(metadata, settings.max_batch_size)
    largest = (
        settings.max_batch_size,
        3,
        max(max(b[0] for b in buckets), default.max[2]),
        max(max(b[1] for b in buckets), default.max[3]),
    )
    profile = tensorrt_build.Profile(min=default.min, opt=default.opt, max=largest)
    if _newer(target, onnx_path):
        wanted = tensorrt_build.build_identity(profile, fp16=settings.tensorrt_fp16)
        try:
            built = read_engine_sidecar(target)[1]
        except (FileNotFoundError, ValueError, KeyError):
            built = {}
        changed = sorted(key for key, value in wanted.items() if built.get(key) != value)
        if not changed:
            return target
        log.info("rebuilding TensorRT engine %s: %s changed", target, ", ".join(changed))
    log.info("building TensorRT engine %s from %s (max shape %s)", target, onnx_path, largest)
    tmp = _atomic_output(target)
    try:
        tensorrt_build.build_engine(onnx_path, tmp, profile, fp16=settings.tensorrt_fp16)
        os.replace(tmp, target)
        os.replace(f"{tmp}.json", f"{target}.json")
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.json").unlink(missing_ok=True)
    return target


def file_version(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def model_buckets(spec: ModelSpec, settings: Settings, rule: InputContract) -> list[tuple[int, int]]:
    texts = spec.buckets if spec.buckets is not None else settings.buckets
    buckets = sorted({parse_bucket(t) for t in texts}) if texts else auto_buckets(rule)
    bad = [b for b in buckets if b[0] % rule.size_divisibility or b[1] % rule.size_divisibility]
    if bad:
        raise ValueError(f"model {spec.name}: buckets {bad} are not multiples of {rule.size_divisibility}")
    return buckets


def choose_runtime(settings: Settings, graph_suffix: str) -> RuntimeName:
    """The runtime for a graph file: the configured one, or for ``auto`` TensorRT for engines; onnxruntime
    when onnxruntime ``providers`` are configured, or on CUDA where it can use a device; OpenVINO on a CPU
    that computes in bf16, where the package is installed; else onnxruntime.

    Why bf16 only: OpenVINO's bf16 engines were 1.5-1.8x faster per image than onnxruntime on this
    project's CPU, its fp32 ones no faster, and either holds about 3.5x onnxruntime's memory (1.75 GB
    against 0.50 GB for the two bundled models warm: ``bench/results/openvino_memory_service.json``)."""
    if settings.runtime != "auto":
        return settings.runtime
    if graph_suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    if settings.providers or "CUDAExecutionProvider" in default_providers() or not openvino_installed():
        return "onnxruntime"
    from export.openvino_runtime import cpu_has_bf16

    return "openvino" if cpu_has_bf16() else "onnxruntime"


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (found without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def prepare_graph(spec: ModelSpec, settings: Settings) -> Path:
    """The graph file the runtime loads for ``spec``: a given ``.onnx`` or engine as it is, a checkpoint's
    cached export (exported first when missing or older than the checkpoint), built into a cached TensorRT
    engine when ``runtime=tensorrt``. Blocking; also run ahead of serving by ``python -m service.prepare``."""
    path = spec.path
    if not path.is_file():
        raise FileNotFoundError(f"model {spec.name}: {path} not found")
    if settings.runtime == "torch":
        return _finish_loading(spec, settings, path, *open_torch_runtime(spec, settings))
    cache = settings.cache_dir
    if path.suffix in ENGINE_SUFFIXES:
        if settings.runtime in ("onnxruntime", "openvino"):
            raise ValueError(f"model {spec.name}: {path} is a TensorRT engine but runtime={settings.runtime}")
        graph_path = path
    elif path.suffix == ".onnx":
        graph_path = path
    else:
        graph_path = export_checkpoint(path, cache / cached_name(spec, ".onnx"))

    if graph_path.suffix == ".onnx" and settings.runtime == "tensorrt":
        metadata = read_onnx_metadata(graph_path)
        buckets = model_buckets(spec, settings, metadata.input)
        graph_path = build_engine_cached(graph_path, cache / cached_name(spec, ".plan"), metadata, buckets, settings)
    return graph_path


def load_model(spec: ModelSpec, settings: Settings) -> LoadedModel:
    """Prepare the graph (export, engine build) if needed, open the runtime, and warm it up (blocking; run it
    off the event loop). ``runtime=torch`` serves the checkpoint itself, in PyTorch."""
    if settings.runtime == "torch":
        if not spec.path.is_file():
            raise FileNotFoundError(f"model {spec.name}: {spec.path} not found")
        return _finish_loading(spec, settings, spec.path, *open_torch_runtime(spec, settings), streams=1)
    graph_path = prepare_graph(spec, settings)
    cache = settings.cache_dir
    runtime: Runtime
    runtime_name = choose_runtime(settings, graph_path.suffix)
    streams = 1
    if runtime_name == "tensorrt":
        runtime = TensorRTRuntime(graph_path)
        providers = ["TensorRT"]
    elif runtime_name == "openvino":
        from export.openvino_runtime import OpenVinoRuntime

        streams = settings.inference_streams
        runtime = OpenVinoRuntime(
            graph_path,
            precision=settings.openvino_precision,
            threads=settings.inference_threads,
            streams=streams,
            cache_dir=cache / "openvino",
        )
        providers = list(runtime.providers)
    else:

        def session() -> OnnxRuntime:
            return OnnxRuntime(
                graph_path,
                providers=settings.providers,
                threads=settings.inference_threads,
                cpu_arena=settings.ort_cpu_arena,
            )

        first = session()
        # Streams are for the CPU: one CUDA session already overlaps the host work of consecutive batches.
        streams = 1 if first.accelerated else settings.inference_streams
        runtime = RuntimeStreams([first, *(session() for _ in range(streams - 1))])
        providers = list(first.providers)
    return _finish_loading(spec, settings, graph_path, runtime, runtime.metadata, runtime_name, providers, streams)


def open_torch_runtime(spec: ModelSpec, settings: Settings) -> tuple[Runtime, GraphMetadata, RuntimeName, list[str]]:
    """The checkpoint's detector in PyTorch (``runtime=torch``; torch is imported only here) and the
    metadata record its export would carry."""
    if spec.path.suffix != CHECKPOINT_SUFFIX:
        raise ValueError(f"model {spec.name}: runtime=torch serves training checkpoints (.pt), got {spec.path}")
    from export.onnx_export import build_metadata
    from model.checkpoint import load_detector
    from model.runtime import TorchRuntime, default_device

    device = default_device()
    model, cfg, checkpoint_metadata = load_detector(spec.path)
    runtime = TorchRuntime(
        model,
        device,
        precision=settings.torch_precision,
        channels_last=device.type == "cuda" if settings.torch_channels_last is None else settings.torch_channels_last,
        cuda_graphs=settings.torch_cuda_graphs and device.type == "cuda",
        compile=settings.torch_compile,
    )
    if settings.torch_cuda_graphs and device.type != "cuda":
        log.warning("model %s: torch_cuda_graphs needs a CUDA device; running without", spec.name)
    providers = [str(device), settings.torch_precision]
    providers += [*(["cuda_graphs"] if runtime.cuda_graphs else []), *(["compile"] if settings.torch_compile else [])]
    return runtime, build_metadata(cfg, checkpoint_metadata), "torch", providers


def _finish_loading(
    spec: ModelSpec,
    settings: Settings,
    graph_path: Path,
    runtime: Runtime,
    metadata: GraphMetadata,
    runtime_name: RuntimeName,
    providers: list[str],
    streams: int,
) -> LoadedModel:
    """The loaded model around an open runtime (``graph_path``: the file served; ``streams``: batches it runs
    at once), warmed up unless disabled."""
    if metadata.mask_kind is None:
        raise ValueError(
            f"model {spec.name}: {graph_path} is a boxes-only ({metadata.method}) graph; the service serves masks"
        )
    loaded = LoadedModel(
        name=spec.name,
        version=file_version(graph_path),
        graph_path=graph_path,
        runtime=runtime,
        runtime_name=runtime_name,
        providers=providers,
        streams=streams,
        metadata=metadata,
        rule=metadata.input,
        buckets=model_buckets(spec, settings, metadata.input),
    )
    check_overlap(loaded.buckets, settings.tile_overlap)
    if settings.warmup:
        # A CUDA graph serves one exact shape: capture every batch size the batcher may form.
        every_batch_size = settings.runtime == "torch" and settings.torch_cuda_graphs
        warm_up(loaded, settings.max_batch_size, every_batch_size=every_batch_size)
    return loaded


def warm_up(model: LoadedModel, max_batch_size: int, every_batch_size: bool = False) -> None:
    """Run every bucket at batch 1 and at ``max_batch_size`` (or at every batch size up to it) on a flat
    image of the padding value, once per stream (the streams take turns in order, so each one sees every
    shape)."""
    started = time.perf_counter()
    for bucket in model.buckets:
        for batch in range(1, max_batch_size + 1) if every_batch_size else sorted({1, max_batch_size}):
            flat = np.empty((batch, 3, *bucket), dtype=np.uint8)
            flat[...] = np.asarray(model.rule.pad_value, dtype=np.uint8)[None, :, None, None]
            for _ in range(model.streams):
                model.runtime.infer(flat)
    log.info(
        "model %s warmed up on %d buckets in %.1f s", model.name, len(model.buckets), time.perf_counter() - started
    )


@dataclass
class ModelRegistry:
    """Every configured model and its state; ``ready`` once all of them are loaded, warmed up and
    marked ready by the app (which starts their batchers first)."""

    settings: Settings
    entries: dict[str, ModelEntry] = field(init=False)

    def __post_init__(self) -> None:
        self.entries = {spec.name: ModelEntry(spec) for spec in self.settings.models}

    @property
    def ready(self) -> bool:
        return all(entry.state == "ready" for entry in self.entries.values())

    def load(self, name: str) -> LoadedModel | None:
        """Load one model (blocking); on failure record the error and return None. The state stays
        "loading" until ``mark_ready``."""
        entry = self.entries[name]
        started = time.perf_counter()
        try:
            entry.model = load_model(entry.spec, self.settings)
        except Exception as error:
            log.exception("model %s failed to load", name)
            entry.state, entry.error = "failed", f"{type(error).__name__}: {error}"
            return None
        log.info(
            "model %s loaded (%s, %s) in %.1f s",
            name,
            entry.model.runtime_name,
            entry.model.version,
            time.perf_counter() - started,
        )
        return entry.model

    def mark_ready(self, name: str) -> None:
        self.entries[name].state = "ready"
