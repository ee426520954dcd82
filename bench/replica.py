"""What one replica costs: resident memory when idle and time from start to ready, cold and warm.

    python -m bench.replica [--configs JSON] [--repeats 2] [--idle-s 5] [--models JSON]
        [--output bench/results/replica.json]

Starts ``python -m service`` with both bundled models (``models/*/model.pt``; ``--models`` takes others, the
service's JSON) in each named configuration, as a replica would: **cold**, on an empty cache directory, so
that the start exports every checkpoint to ONNX (in child processes, which exit before the server is ready)
and compiles its engines, and **warm**, on the cache the cold start left (graphs and OpenVINO's compiled
engines reused, nothing exported). For each start it reports the seconds from ``Popen`` to the first 200 of
``/v2/health/ready``, the resident set size of the server's whole process tree after ``--idle-s`` seconds of
idling once ready (``VmRSS`` summed over the server and its descendants, and the server's own peak
``VmHWM``), and whether the server mapped any torch library (``/proc/PID/maps``), which it should not.

``--configs`` (default: the service's defaults) is JSON ``{"name": [service flags]}`` or ``{"name": {"args":
[flags], "source": DIR, "env": {...}}}``: ``source`` runs another checkout's ``python -m service`` (the code
before a change, say, from ``git archive``), on a cache of its own. The configurations take turns, start by
start (per repeat: each one cold, then each one warm), so that a change in the machine's load touches all of
them alike; start times are load-sensitive, memory is not. Numba's kernel cache lives in each source tree,
not in the service's cache: warm it once per tree (a first start does) so that cold starts compare the
service's own work. Prints a table and writes the JSON with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.serve import ServiceConfig, machine, parse_configs
from service.launcher import ServiceProcess
from service.settings import ModelSpec, bundled_models

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RSS_MB = 600
GOAL_COLD_S = 30.0
GOAL_WARM_S = 10.0


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0])
    return fields


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack += children.get(current, [])
    return tree


def tree_rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, kB (processes that exit meanwhile count as none)."""
    total = 0
    for member in process_tree(pid):
        try:
            total += proc_status(member)["VmRSS"]
        except (OSError, KeyError):
            continue
    return total


def torch_mapped(pid: int) -> bool:
    """Whether the process has any of torch's shared libraries mapped (i.e. imported torch)."""
    return any(
        "libtorch" in line or "/torch/lib/" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
    )


def start(config: ServiceConfig, cache_dir: Path, log_path: Path, idle_s: float, flags: list[str]) -> dict[str, Any]:
    """One start of ``config`` on ``cache_dir``: seconds to ready, the process tree's memory after ``idle_s``
    idle, whether torch was mapped, and how many graphs it exported or found cached (from its log)."""
    started = time.perf_counter()
    server = ServiceProcess(
        ["--cache-dir", str(cache_dir), *flags, *config.args], log_path, env=config.env, source=config.source
    )
    try:
        server.wait_ready(timeout=900)
        ready_s = time.perf_counter() - started
        time.sleep(idle_s)
        pid = server.process.pid
        tree_kb, status, mapped = tree_rss_kb(pid), proc_status(pid), torch_mapped(pid)
    finally:
        server.terminate()
    log = log_path.read_text(errors="replace")
    return {
        "start_to_ready_s": round(ready_s, 2),
        "idle_rss_mb": round(tree_kb / 1024, 1),
        "server_rss_mb": round(status["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(status["VmHWM"] / 1024, 1),
        "torch_loaded": mapped,
        "exported": log.count("exporting "),
        "loadavg_1min": os.getloadavg()[0],
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
    parser.add_argument("--configs", default='{"default": []}', help="JSON {name: [flags] or {args, source, env}}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "replica.json")
    parser.add_argument("--models", help='JSON [{"name", "path"}] of checkpoints (default: the bundled models/)')
    args = parser.parse_args(argv)
    specs = [ModelSpec.model_validate(m) for m in json.loads(args.models)] if args.models else bundled_models()
    flags = ["--models", json.dumps([spec.model_dump(mode="json") for spec in specs])]
    configs = parse_configs(args.configs)

    info = machine()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c.name: {"cold": [], "warm": []} for c in configs}
    with tempfile.TemporaryDirectory(prefix="onestage-replica-") as tmp:
        work = Path(tmp)
        for repeat in range(args.repeats):
            for kind in ("cold", "warm"):
                for config in configs:
                    cache = work / f"{config.name}-cache{repeat}"
                    if kind == "cold":
                        shutil.rmtree(cache, ignore_errors=True)
                    log_path = work / f"{config.name}-{kind}{repeat}.log"
                    run = start(config, cache, log_path, args.idle_s, flags)
                    expected = len(specs) if kind == "cold" else 0
                    assert run["exported"] == expected, (config.name, kind, run, log_path.read_text())
                    runs[config.name][kind].append(run)
                    print(f"{config.name} {kind} start {repeat + 1}: {run}", flush=True)

    result: dict[str, Any] = {
        "machine": info,
        "models": [str(spec.path) for spec in specs],
        "configs": {c.name: {"args": c.args, "source": str(c.source), "env": c.env} for c in configs},
        "settings": {"idle_s": args.idle_s, "repeats": args.repeats},
        "goals": {"idle_rss_mb": GOAL_RSS_MB, "cold_start_s": GOAL_COLD_S, "warm_start_s": GOAL_WARM_S},
        "runs": runs,
        "summary": {name: {kind: summary(r) for kind, r in kinds.items()} for name, kinds in runs.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        "\n| configuration | start | start -> ready (s) | idle RSS, process tree (MB) | peak RSS (MB) | torch loaded |"
        "\n|---|---|---|---|---|---|"
    )
    for name, kinds in runs.items():
        for kind, kind_runs in kinds.items():
            s = result["summary"][name][kind]
            loaded = any(r["torch_loaded"] for r in kind_runs)
            row = [name, kind, f"{s['start_to_ready_s']['median']:.1f}", f"{s['idle_rss_mb']['median']:.0f}"]
            row += [f"{s['peak_rss_mb']['median']:.0f}", "yes" if loaded else "no"]
            print("| " + " | ".join(row) + " |")
    print(
        f"(median of {args.repeats}; goals: idle <= {GOAL_RSS_MB} MB, cold <= {GOAL_COLD_S:.0f} s, "
        f"warm <= {GOAL_WARM_S:.0f} s) -> {args.output}"
    )


if __name__ == "__main__":
    main()
