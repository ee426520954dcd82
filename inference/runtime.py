"""One runtime factory: a model file and its runtime options in, a runtime with the graph's metadata out.

``open_runtime(path, options, cache_dir)`` is how every entry point gets a runtime: the service (per model,
with that model's options), ``inference.Predictor`` (so evaluation, the predict CLI and the benchmarks), and
``python -m service.prepare``. A training checkpoint (``.pt``) is first exported to ONNX into the cache
directory (only when the checkpoint is newer than the cached graph; in a child process, ``python -m
export``, so that the calling process never imports torch), and with the TensorRT engine the graph is built
into a cached engine the same way. The torch engine runs the checkpoint itself (torch is imported only then).

Engines: ``onnxruntime`` (CPU, or CUDA through its providers; ``streams`` sessions side by side), ``openvino``
(CPU; one batch-1 engine per shape, bf16 where the CPU has it; its own streams), ``tensorrt`` (CUDA engines),
``torch`` (eager, for checkpoints), or ``auto`` (``choose_engine``).
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from export import tensorrt_build
from export.metadata import CPU_PRECISIONS, GraphMetadata, read_engine_sidecar, read_onnx_metadata
from export.runtimes import OnnxRuntime, TensorRTRuntime, default_providers, file_version
from inference.sizing import Bucket, default_buckets
from model.runtime_protocol import Runtime

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ENGINE_SUFFIXES = (".plan", ".engine")
CHECKPOINT_SUFFIX = ".pt"
Engine = Literal["onnxruntime", "openvino", "tensorrt", "torch"]
EngineChoice = Literal["auto", "onnxruntime", "openvino", "tensorrt", "torch"]
PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16", "bf16+fp32_mask_decode", "bf16+fp32_mask_branch"]
# The precisions each engine can run (the first is what ``auto`` means where the engine does not decide itself:
# OpenVINO's auto is the model's measured choice where the CPU has bf16, ``export.openvino_runtime``).
ENGINE_PRECISIONS: dict[Engine, tuple[str, ...]] = {
    "onnxruntime": ("fp32",),
    "openvino": ("auto", *CPU_PRECISIONS),
    "tensorrt": ("fp32", "fp16"),
    "torch": ("fp32", "fp16", "bf16"),
}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads_per_stream() -> int:
    """Inference threads per stream: 1 up to 7 usable cores, then a quarter of them (see ``default_streams``)."""
    return max(usable_cores() // 4, 1)


def default_streams() -> int:
    """Parallel inference streams: the usable cores divided by the threads per stream (2 x 1 on 2 cores,
    4 x 2 on 8, 4 x 4 on 16). On few cores a second batch in flight uses a core better than a second
    thread inside one batch (a second onnxruntime thread made the 2-core service slower); beyond 4 streams
    the per-stream threads grow instead, so that a lone request still gets a quarter of the machine.
    Request decoding and mask finishing share the cores with the streams (~15-25% of a request's CPU time).
    """
    return max(usable_cores() // default_threads_per_stream(), 1)


# OpenVINO engines kept per model: the warm bucket and two more (bounded memory under traffic of many shapes).
DEFAULT_MAX_ENGINES = 3


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onestage"


class RuntimeOptions(BaseModel):
    """How one model runs: the engine and its knobs. The service takes one set for all models and a partial
    override per model (``ModelSpec.runtime``); the command-line tools take one set."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineChoice = Field(
        "auto",
        description="auto: TensorRT for engine files; else onnxruntime with configured providers or where CUDA is "
        "usable; else OpenVINO on a CPU with bf16 when installed; else onnxruntime. torch: a checkpoint in PyTorch "
        "(CUDA when available, else CPU; .pt files only)",
    )
    precision: PrecisionChoice = Field(
        "auto",
        description="openvino: auto (where the CPU has bf16, the model's measured choice, else bf16 with the mask "
        "decode in fp32; fp32 elsewhere), bf16, bf16+fp32_mask_decode, bf16+fp32_mask_branch or fp32; tensorrt: "
        "fp32 or fp16 (FP16 convolution trunks); torch: fp32, fp16 or bf16 autocast of the network part; "
        "onnxruntime: fp32",
    )
    streams: int = Field(
        default_factory=default_streams,
        ge=1,
        le=64,
        description="batches in flight at once on the CPU engines (OpenVINO streams, or onnxruntime sessions); "
        "default: the cores divided by threads",
    )
    threads: int = Field(
        default_factory=default_threads_per_stream,
        ge=1,
        description="threads of each stream (onnxruntime intra-op threads, OpenVINO INFERENCE_NUM_THREADS / streams); "
        "default 1 up to 7 cores, then a quarter of the cores",
    )
    providers: list[str] | None = Field(
        None, description="onnxruntime execution providers, in order (default: CUDA if usable, then CPU)"
    )
    cpu_arena: bool = Field(
        False,
        description="onnxruntime: keep the CPU memory arena (activations stay reserved for the largest shape seen, "
        "about 0.4 GB per bundled model once warm); off, they return to the system after each batch",
    )
    channels_last: bool | None = Field(
        None, description="torch: NHWC weights and inputs (default: on CUDA only; on the CPU it was 2x slower)"
    )
    cuda_graphs: bool = Field(
        False, description="torch on CUDA: capture the network part per input shape (warm-up captures every batch)"
    )
    compile: bool = Field(False, description="torch: torch.compile the network part (compiles during warm-up)")
    max_engines: int | None = Field(
        DEFAULT_MAX_ENGINES,
        ge=1,
        description="openvino: compiled shapes kept at once (each holds its own copy of the graph per stream, "
        "~100 MB with two); beyond it the least recently used is released and compiled again (from the model "
        "cache, ~0.5 s) when next needed; null: keep every shape",
    )


@dataclass
class OpenedModel:
    """A model file opened for inference: its runtime and everything needed to read the runtime's outputs."""

    path: Path  # the file asked for (checkpoint, graph or engine)
    graph_path: Path  # the file the runtime runs (the checkpoint itself for the torch engine)
    version: str  # first 12 hex digits of the graph file's sha256
    runtime: Runtime
    engine: Engine
    precision: str  # what the engine computes in
    providers: list[str]
    streams: int  # batches the runtime runs at once
    metadata: GraphMetadata
    # The largest batch worth forming for the engine: 1 on OpenVINO, whose batch-1 engines run a batch image by
    # image (``OpenVinoRuntime.BEST_BATCH_SIZE``); None: any (the service's ``max_batch_size``).
    max_batch_size: int | None = None


def _newer(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime >= source.stat().st_mtime


def _atomic_output(target: Path) -> Path:
    """A temporary path beside ``target`` (same filesystem, so ``os.replace`` onto it is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def cached_name(path: Path, suffix: str) -> str:
    """One cache file per source file: ``<stem>-<digest of its resolved path><suffix>`` (two checkpoints
    called ``model.pt`` in different folders never share it)."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    stem = path.parent.name if path.stem == "model" else path.stem
    return f"{stem}-{digest}{suffix}"


def export_checkpoint(checkpoint: Path, target: Path) -> Path:
    """Export ``checkpoint`` to ONNX at ``target`` unless a cached graph at least as new is there
    (``export_checkpoints``)."""
    export_checkpoints([(checkpoint, target)])
    return target


def export_checkpoints(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Export each ``(checkpoint, target)`` to ONNX at ``target`` unless a cached graph at least as new is there.

    The exports run in one child process (``python -m export``): torch is loaded there, once for all of them
    (the import is most of an export's time), and its memory goes back when the child exits, so the calling
    process never imports torch (about 600 MB resident). Each graph is written beside its target and renamed
    into place; when the child fails, none is.
    """
    stale = []
    for checkpoint, target in pairs:
        if _newer(target, checkpoint):
            log.info("using cached graph %s for %s", target, checkpoint)
        else:
            log.info("exporting %s to %s", checkpoint, target)
            stale.append((checkpoint, target, _atomic_output(target)))
    if not stale:
        return
    # --skip-check: the graph's parity with PyTorch is what the export tests check, not every start.
    command = [sys.executable, "-m", "export", "--format", "onnx", "--skip-check"]
    for checkpoint, _, tmp in stale:
        command += ["--checkpoint", str(checkpoint), "--output", str(tmp)]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            names = ", ".join(str(checkpoint) for checkpoint, _, _ in stale)
            raise RuntimeError(f"exporting {names} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        for _, target, tmp in stale:
            os.replace(tmp, target)
    finally:
        for _, _, tmp in stale:
            tmp.unlink(missing_ok=True)


def build_engine_cached(
    onnx_path: Path, target: Path, buckets: Sequence[Bucket], max_batch_size: int, fp16: bool
) -> Path:
    """A TensorRT engine whose profile covers every bucket up to ``max_batch_size``, unless the cached one is
    newer than the graph and was built the same way (profile, precision, TensorRT version, GPU)."""
    metadata = read_onnx_metadata(onnx_path)
    default = tensorrt_build.default_profile(metadata, max_batch_size)
    largest = (
        max_batch_size,
        3,
        max(max(b[0] for b in buckets), default.max[2]),
        max(max(b[1] for b in buckets), default.max[3]),
    )
    profile = tensorrt_build.Profile(min=default.min, opt=default.opt, max=largest)
    if _newer(target, onnx_path):
        wanted = tensorrt_build.build_identity(profile, fp16=fp16)
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
        tensorrt_build.build_engine(onnx_path, tmp, profile, fp16=fp16)
        os.replace(tmp, target)
        os.replace(f"{tmp}.json", f"{target}.json")
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.json").unlink(missing_ok=True)
    return target


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (found without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def choose_engine(options: RuntimeOptions, suffix: str) -> Engine:
    """The engine for a model file: the configured one, or for ``auto`` TensorRT for engine files;
    onnxruntime when onnxruntime ``providers`` are configured, or on CUDA where it can use a device; OpenVINO
    on a CPU that computes in bf16, where the package is installed; else onnxruntime.

    Why bf16 only: OpenVINO's bf16 engines were 1.5-1.8x faster per image than onnxruntime on this
    project's CPU, its fp32 ones no faster (``bench/results/openvino_memory_service.json``)."""
    if options.engine != "auto":
        return options.engine
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    if options.providers or "CUDAExecutionProvider" in default_providers() or not openvino_installed():
        return "onnxruntime"
    from export.openvino_runtime import cpu_has_bf16

    return "openvino" if cpu_has_bf16() else "onnxruntime"


def check_precision(engine: Engine, precision: PrecisionChoice) -> str:
    """The precision ``engine`` runs for the asked one (``auto``: the engine's own choice), or a ValueError
    naming those it can run."""
    allowed = ENGINE_PRECISIONS[engine]
    if precision == "auto":
        return allowed[0]
    if precision not in allowed:
        raise ValueError(f"the {engine} engine runs {', '.join(p for p in allowed if p != 'auto')}, not {precision}")
    return precision


def export_ahead(models: Sequence[tuple[Path, RuntimeOptions]], cache_dir: Path) -> None:
    """Export every checkpoint of ``models`` (path and runtime options) to the ONNX graph ``prepare_graph`` will
    want for it, unless cached, in one child process (``export_checkpoints``), before the models open one by
    one; graphs, engines and checkpoints the torch engine runs need none."""
    export_checkpoints(
        [
            (path, cache_dir / cached_name(path, ".onnx"))
            for path, options in models
            if path.suffix == CHECKPOINT_SUFFIX and path.is_file() and choose_engine(options, path.suffix) != "torch"
        ]
    )


def prepare_graph(
    path: Path,
    options: RuntimeOptions,
    cache_dir: Path,
    *,
    max_batch_size: int = 1,
    buckets: list[Bucket] | None = None,
) -> Path:
    """The graph file the engine loads for ``path``: a given ``.onnx`` or TensorRT engine as it is, a
    checkpoint's cached export (exported first when missing or older than the checkpoint), built into a
    cached TensorRT engine for the tensorrt engine (its profile covers ``buckets``, default the graph's own,
    up to ``max_batch_size``). The torch engine needs none: the checkpoint itself. Blocking; also run ahead
    of serving by ``python -m service.prepare``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    engine = choose_engine(options, path.suffix)
    if engine == "torch":
        if path.suffix != CHECKPOINT_SUFFIX:
            raise ValueError(f"the torch engine runs training checkpoints (.pt), got {path}")
        return path
    if path.suffix in ENGINE_SUFFIXES:
        if engine != "tensorrt":
            raise ValueError(f"{path} is a TensorRT engine but the engine asked for is {engine}")
        return path
    graph_path = path if path.suffix == ".onnx" else export_checkpoint(path, cache_dir / cached_name(path, ".onnx"))
    if engine == "tensorrt":
        fp16 = check_precision(engine, options.precision) == "fp16"
        chosen = buckets or default_buckets(read_onnx_metadata(graph_path).input)
        target = cache_dir / cached_name(path, ".plan")
        graph_path = build_engine_cached(graph_path, target, chosen, max_batch_size, fp16)
    return graph_path


def open_runtime(
    path: Path,
    options: RuntimeOptions,
    cache_dir: Path,
    *,
    max_batch_size: int = 1,
    buckets: list[Bucket] | None = None,
) -> OpenedModel:
    """Prepare the graph (export, engine build) if needed and open the engine on it (blocking). Boxes-only
    graphs are refused: every entry point answers masks. ``max_batch_size`` and ``buckets`` size a TensorRT
    profile."""
    graph_path = prepare_graph(path, options, cache_dir, max_batch_size=max_batch_size, buckets=buckets)
    engine = choose_engine(options, graph_path.suffix)
    precision = check_precision(engine, options.precision)
    runtime: Runtime
    streams, best_batch = 1, None
    if engine == "torch":
        runtime, metadata, providers = _open_torch(path, options, precision)
    elif engine == "tensorrt":
        trt = TensorRTRuntime(graph_path)
        runtime, metadata, providers = trt, trt.metadata, ["TensorRT"]
    elif engine == "openvino":
        from export.openvino_runtime import OpenVinoRuntime

        streams = options.streams
        openvino = OpenVinoRuntime(
            graph_path,
            precision=precision,  # type: ignore[arg-type]  # auto or a CpuPrecision: check_precision allowed it
            threads=options.threads,
            streams=streams,
            cache_dir=cache_dir / "openvino",
            max_engines=options.max_engines,
        )
        runtime, metadata, providers, precision = (
            openvino,
            openvino.metadata,
            list(openvino.providers),
            openvino.precision,
        )
        best_batch = OpenVinoRuntime.BEST_BATCH_SIZE
    else:
        runtime, metadata, providers, streams = _open_onnxruntime(graph_path, options)
    if metadata.mask_kind is None:
        raise ValueError(f"{graph_path} is a boxes-only ({metadata.method}) graph; OneStage answers masks")
    return OpenedModel(
        path=path,
        graph_path=graph_path,
        version=file_version(graph_path),
        runtime=runtime,
        engine=engine,
        precision=precision,
        providers=providers,
        streams=streams,
        metadata=metadata,
        max_batch_size=best_batch,
    )


def _open_onnxruntime(graph_path: Path, options: RuntimeOptions) -> tuple[Runtime, GraphMetadata, list[str], int]:
    """onnxruntime sessions: ``streams`` of them side by side on the CPU, one on CUDA (one CUDA session
    already overlaps the host work of consecutive batches)."""
    from inference.streams import RuntimeStreams

    def session() -> OnnxRuntime:
        return OnnxRuntime(
            graph_path, providers=options.providers, threads=options.threads, cpu_arena=options.cpu_arena
        )

    first = session()
    streams = 1 if first.accelerated else options.streams
    return (
        RuntimeStreams([first, *(session() for _ in range(streams - 1))]),
        first.metadata,
        list(first.providers),
        streams,
    )


def _open_torch(path: Path, options: RuntimeOptions, precision: str) -> tuple[Runtime, GraphMetadata, list[str]]:
    """The checkpoint's detector in PyTorch (torch is imported only here) and the metadata record its export
    would carry."""
    from export.onnx_export import build_metadata
    from model.checkpoint import load_detector
    from model.runtime import TorchRuntime, default_device

    device = default_device()
    model, cfg, checkpoint_metadata = load_detector(path)
    if options.cuda_graphs and device.type != "cuda":
        log.warning("%s: cuda_graphs needs a CUDA device; running without", path)
    runtime = TorchRuntime(
        model,
        device,
        precision=precision,  # type: ignore[arg-type]
        channels_last=device.type == "cuda" if options.channels_last is None else options.channels_last,
        cuda_graphs=options.cuda_graphs and device.type == "cuda",
        compile=options.compile,
    )
    providers = [str(device), precision, *(["cuda_graphs"] if runtime.cuda_graphs else [])]
    providers += ["compile"] if options.compile else []
    return runtime, build_metadata(cfg, checkpoint_metadata), providers


def served_batch_size(model: OpenedModel, max_batch_size: int) -> int:
    """The largest batch to form for ``model``: ``max_batch_size``, capped by what its engine runs best."""
    return min(max_batch_size, model.max_batch_size or max_batch_size)


def warm_buckets(model: OpenedModel, buckets: Sequence[Bucket]) -> list[Bucket]:
    """The buckets warmed before a model is ready, of its ``buckets``: every one, but on OpenVINO (an engine
    compiled and held per shape) only the largest, where tiles and the bundled microscopy models' images run;
    other shapes compile on first use (from the model cache after the first start)."""
    if model.engine != "openvino":
        return list(buckets)
    return [max(buckets, key=lambda hw: (hw[0] * hw[1], hw))]


def warm_up(model: OpenedModel, buckets: Sequence[Bucket], max_batch_size: int, every_batch_size: bool = False) -> None:
    """Run every bucket at batch 1 and at the largest batch served (``served_batch_size``; or at every batch size
    up to it: a CUDA graph serves one exact shape) on a flat image of the padding value, once per stream (the
    streams take turns in order, so each one sees every shape): no request then pays for first-run allocation
    or an engine compile on these buckets."""
    started = time.perf_counter()
    largest = served_batch_size(model, max_batch_size)
    pad_value = np.asarray(model.metadata.input.pad_value, dtype=np.uint8)[None, :, None, None]
    for bucket in buckets:
        for batch in range(1, largest + 1) if every_batch_size else sorted({1, largest}):
            flat = np.empty((batch, 3, *bucket), dtype=np.uint8)
            flat[...] = pad_value
            for _ in range(model.streams):
                model.runtime.infer(flat)
    log.info("%s warmed up on %d buckets in %.1f s", model.path, len(buckets), time.perf_counter() - started)
