"""AP and speed of every CPU precision a model can run in, against fp32 onnxruntime (issue #26: exact by default).

    python -m bench.precision [--models JSON] [--data data/nucleus] [--splits val_fields test_fields test]
        [--repeats 15] [--cache-dir DIR] [--output bench/results/precision.json]

For each model (default: the bundled checkpoints) and each candidate -- onnxruntime fp32 (the reference),
OpenVINO in bf16, bf16 with the mask decode in fp32, bf16 with the mask branch in fp32, and fp32
(``export.metadata.CpuPrecision``) -- the COCO AP of every split, each image segmented as the service segments
it (``inference.Predictor``, one stream of every core, every detection kept; AP is deterministic, so it may be
measured under load), and the graph's latency at the model's largest bucket, batch 1, one thread (a service
stream's), on a real image of the first split: medians of ``--repeats`` rounds in which every candidate runs
once, in turn (interleaved, so a change in load touches all alike). It also says what ``training.precision``
would choose from the first split (a validation split) with its default tolerance. Prints a table and writes
the JSON with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.serve import machine
from export.metadata import CPU_PRECISIONS
from inference.predictor import Predictor, in_process_options
from inference.runtime import default_cache_dir
from inference.sizing import pad_batch
from service.settings import ModelSpec, bundled_models
from training.evaluate import evaluate, load_coco
from training.precision import DEFAULT_TOLERANCE

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = ("onnxruntime", "fp32")
CANDIDATES = [REFERENCE, *(("openvino", precision) for precision in CPU_PRECISIONS)]


def label(engine: str, precision: str) -> str:
    return f"{engine}-{precision}"


def accuracy(spec: ModelSpec, splits: list[str], data: Path, cache_dir: Path) -> dict[str, Any]:
    """segm and bbox AP of every candidate on every split."""
    table: dict[str, Any] = {}
    for engine, precision in CANDIDATES:
        predictor = Predictor.open(
            spec.path, in_process_options(engine=engine, precision=precision), cache_dir=cache_dir
        )
        row: dict[str, Any] = {}
        for split in splits:
            started = time.perf_counter()
            metrics = evaluate(predictor, load_coco(data / f"{split}.json"), data / split)
            row[split] = {
                "segm_AP": metrics["segm"]["AP"],
                "bbox_AP": metrics["bbox"]["AP"],
                "seconds": round(time.perf_counter() - started, 1),
            }
        table[label(engine, precision)] = row
        print(f"  {spec.name:10s} {label(engine, precision):32s} {json.dumps(row)}", flush=True)
    return table


def latency(spec: ModelSpec, image: Path, repeats: int, cache_dir: Path) -> dict[str, Any]:
    """Median and fastest ms of one batch-1 inference at the model's largest bucket, per candidate, interleaved."""
    runtimes = {}
    batch = None
    for engine, precision in CANDIDATES:
        options = in_process_options(engine=engine, precision=precision, threads=1)
        predictor = Predictor.open(spec.path, options, cache_dir=cache_dir)
        pipeline = predictor.pipeline
        if batch is None:
            bucket = max(pipeline.buckets, key=lambda hw: hw[0] * hw[1])
            rgb = pipeline.decode(image.read_bytes()).rgb
            resized = pipeline.contract.resize_image(rgb)[:, : bucket[0], : bucket[1]]
            batch = pad_batch([resized], bucket, pipeline.contract.pad_value)
        predictor.runtime.infer(batch)  # first run: compile, allocation
        runtimes[label(engine, precision)] = predictor.runtime
    assert batch is not None
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(repeats):
        for name, runtime in runtimes.items():
            started = time.perf_counter()
            runtime.infer(batch)
            times[name].append(time.perf_counter() - started)
    bf16 = statistics.median(times[label("openvino", "bf16")])
    return {
        "shape": list(batch.shape),
        "median_ms": {name: round(1e3 * statistics.median(t), 2) for name, t in times.items()},
        "min_ms": {name: round(1e3 * min(t), 2) for name, t in times.items()},
        "median_vs_bf16": {name: round(statistics.median(t) / bf16, 3) for name, t in times.items()},
    }


def would_choose(table: dict[str, Any], split: str) -> str:
    """``training.precision``'s rule on ``split``: the fastest OpenVINO precision within the default tolerance
    of the reference's segm AP."""
    reference = table[label(*REFERENCE)][split]["segm_AP"]
    for precision in CPU_PRECISIONS:
        if table[label("openvino", precision)][split]["segm_AP"] >= reference - DEFAULT_TOLERANCE:
            return precision
    return "fp32"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.precision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", help='JSON [{"name", "path"}] (default: the bundled models/)')
    parser.add_argument("--data", type=Path, default=Path("data/nucleus"), help="the nucleus builder's output")
    parser.add_argument("--splits", nargs="+", default=["val_fields", "test_fields", "test"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--output", type=Path, default=RESULTS / "precision.json")
    args = parser.parse_args(argv)
    specs = [ModelSpec.model_validate(m) for m in json.loads(args.models)] if args.models else bundled_models()
    info = machine()
    image = next(iter(sorted((args.data / args.splits[0]).iterdir())))
    report: dict[str, Any] = {"machine": info, "splits": args.splits, "image": str(image), "models": {}}
    for spec in specs:
        table = accuracy(spec, args.splits, args.data, args.cache_dir)
        report["models"][spec.name] = {
            "ap": table,
            "latency": latency(spec, image, args.repeats, args.cache_dir),
            "training_precision_would_choose": would_choose(table, args.splits[0]),
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n| model | candidate | {' | '.join(f'{s} segm / bbox AP' for s in args.splits)} | ms (median) | vs bf16 |")
    print("|---|---|" + "---|" * (len(args.splits) + 2))
    for name, result in report["models"].items():
        for candidate, row in result["ap"].items():
            cells = [f"{row[s]['segm_AP']:.1f} / {row[s]['bbox_AP']:.1f}" for s in args.splits]
            ms = result["latency"]["median_ms"][candidate]
            ratio = result["latency"]["median_vs_bf16"][candidate]
            print(f"| {name} | {candidate} | {' | '.join(cells)} | {ms:.1f} | {ratio:.2f}x |")
        print(f"({name}: training.precision would choose {result['training_precision_would_choose']})")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
