"""What one replica costs: resident memory when idle and time from start to ready, cold and warm.

    python -m bench.replica [--repeats 2] [--idle-s 5] [--inference-streams N] [--models JSON]
        [--output bench/results/replica.json]

Starts ``python -m service`` with both bundled models (``models/*/model.pt``; ``--models`` takes others, the
service's JSON) on the CPU path (onnxruntime, ``CPUExecutionProvider``), as a replica would: **cold**, on an
empty cache directory, so that the start exports every checkpoint to ONNX (in a child process, which exits
before the server is ready), and **warm**,
on the cache the cold start left (the graphs are reused, nothing is exported). For each start it reports the
seconds from ``Popen`` to the first 200 of ``/v2/health/ready``, and the server's resident set size
(``VmRSS``, and its peak ``VmHWM``) after ``--idle-s`` seconds of idling once ready; and whether the server
process mapped any torch library (``/proc/PID/maps``), which it should not on this path. Each kind of start
runs ``--repeats`` times in turn (cold, warm, cold, warm, ...). Prints a table and writes the JSON with the
machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.serve import machine
from service.launcher import ServiceProcess
from service.settings import ModelSpec, bundled_models

RESULTS = Path(__file__).resolve().parent / "results"
CPU = ["--runtime.engine", "onnxruntime", "--runtime.providers", '["CPUExecutionProvider"]']
GOAL_RSS_MB = 500


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0])
    return fields


def torch_mapped(pid: int) -> bool:
    """Whether the process has any of torch's shared libraries mapped (i.e. imported torch)."""
    return any(
        "libtorch" in line or "/torch/lib/" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
    )


def start(cache_dir: Path, log_path: Path, idle_s: float, flags: list[str]) -> dict[str, Any]:
    """One start of the service with ``flags`` on ``cache_dir``: seconds to ready, memory after ``idle_s``
    idle, whether torch was mapped, and how many graphs it exported or found cached (from its log)."""
    started = time.perf_counter()
    server = ServiceProcess(["--cache-dir", str(cache_dir), *CPU, *flags], log_path)
    try:
        server.wait_ready(timeout=900)
        ready_s = time.perf_counter() - started
        time.sleep(idle_s)
        status = proc_status(server.process.pid)
        mapped = torch_mapped(server.process.pid)
    finally:
        server.terminate()
    log = log_path.read_text(errors="replace")
    return {
        "start_to_ready_s": round(ready_s, 2),
        "idle_rss_mb": round(status["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(status["VmHWM"] / 1024, 1),
        "torch_loaded": mapped,
        "exported": log.count("exporting "),
        "cached_graphs_used": log.count("using cached graph"),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: {
            "median": statistics.median(r[key] for r in runs),
            "min": min(r[key] for r in runs),
            "max": max(r[key] for r in runs),
        }
        for key in ("start_to_ready_s", "idle_rss_mb", "peak_rss_mb")
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replica", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "replica.json")
    parser.add_argument(
        "--inference-streams", type=int, default=None, help="the service's inference streams (default: its own)"
    )
    parser.add_argument("--models", help='JSON [{"name", "path"}] of checkpoints (default: the bundled models/)')
    args = parser.parse_args(argv)
    specs = [ModelSpec.model_validate(m) for m in json.loads(args.models)] if args.models else bundled_models()
    flags = ["--models", json.dumps([spec.model_dump(mode="json") for spec in specs])]
    flags += [] if args.inference_streams is None else ["--runtime.streams", str(args.inference_streams)]

    info = machine()
    runs: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="onestage-replica-") as tmp:
        work = Path(tmp)
        for repeat in range(args.repeats):
            cache = work / f"cache{repeat}"
            for kind in ("cold", "warm"):
                if kind == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                run = start(cache, work / f"{kind}{repeat}.log", args.idle_s, flags)
                assert run["exported"] == (len(specs) if kind == "cold" else 0), (
                    kind,
                    run,
                    (work / f"{kind}{repeat}.log").read_text(),
                )
                runs[kind].append(run)
                print(f"{kind} start {repeat + 1}: {run}", flush=True)

    result: dict[str, Any] = {
        "machine": info,
        "models": [str(spec.path) for spec in specs],
        "settings": {
            "runtime": "onnxruntime",
            "providers": ["CPUExecutionProvider"],
            "inference_streams": args.inference_streams or "default",
            "idle_s": args.idle_s,
        },
        "goal_idle_rss_mb": GOAL_RSS_MB,
        "runs": runs,
        "summary": {kind: summary(kind_runs) for kind, kind_runs in runs.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| start | start -> ready (s) | idle RSS (MB) | peak RSS (MB) | torch loaded |\n|---|---|---|---|---|")
    for kind, kind_runs in runs.items():
        s = result["summary"][kind]
        loaded = any(r["torch_loaded"] for r in kind_runs)
        row = [kind, f"{s['start_to_ready_s']['median']:.1f}", f"{s['idle_rss_mb']['median']:.0f}"]
        row += [f"{s['peak_rss_mb']['median']:.0f}", "yes" if loaded else "no"]
        print("| " + " | ".join(row) + " |")
    print(f"(median of {args.repeats}; goal idle RSS <= {GOAL_RSS_MB} MB) -> {args.output}")


if __name__ == "__main__":
    main()
