"""What ``scale=auto`` costs: the wall time of an auto request against a request at a fixed scale, same image.

    python -m bench.auto_cost [--checkpoints models/meinst_nucleus/model.pt models/embedmask_nucleus/model.pt]
        [--sets data/val_shifted/sets.json] [--only x0.33 x1 x3] [--images 5] [--repeats 3] [--engine auto]
        [--output bench/results/auto_cost.json]

Per model, set and image: one request (bytes in, finished instances with RLE masks out, ``inference.Predictor``
on ``--engine``, the service's default unless told) with ``scale=auto``, one at the model's own scale and one
at the scale auto chose, in turn, ``--repeats`` rounds interleaved so that load on a shared machine hits all
three alike; each takes its median. Rows: the median over images of auto's time divided by each fixed one's
(the estimate's overhead over a user who knew the scale), and the scales auto chose. Prints a markdown table and
saves JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from inference.pipeline import OWN_SCALE, SegmentOptions
from inference.predictor import Predictor, in_process_options

RESULTS = Path(__file__).resolve().parent / "results"


def auto_cost(predictor: Predictor, payloads: list[bytes], repeats: int) -> dict[str, Any]:
    """Medians over ``payloads`` of auto's request time divided by the own scale's and the chosen scale's."""
    chosen = [predictor(data, SegmentOptions(scale="auto")).scale for data in payloads]  # warms each shape too
    for data, scale in zip(payloads, chosen, strict=True):
        predictor(data, SegmentOptions(scale=scale))
        predictor(data, SegmentOptions(scale=OWN_SCALE))
    settings = {"auto": "auto", "own": OWN_SCALE}
    times: list[dict[str, list[float]]] = [{"auto": [], "own": [], "chosen": []} for _ in payloads]
    for _ in range(repeats):
        for data, scale, record in zip(payloads, chosen, times, strict=True):
            for name, option in (*settings.items(), ("chosen", scale)):
                started = time.perf_counter()
                predictor(data, SegmentOptions(scale=option))
                record[name].append(time.perf_counter() - started)
    medians = [{name: statistics.median(values) for name, values in record.items()} for record in times]
    return {
        "images": len(payloads),
        "chosen_scales": [round(scale, 3) for scale in chosen],
        "auto_ms": [round(1e3 * m["auto"], 1) for m in medians],
        "own_ms": [round(1e3 * m["own"], 1) for m in medians],
        "auto_vs_own": statistics.median(m["auto"] / m["own"] for m in medians),
        "auto_vs_chosen": statistics.median(m["auto"] / m["chosen"] for m in medians),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoints", nargs="+", default=["models/meinst_nucleus/model.pt", "models/embedmask_nucleus/model.pt"]
    )
    parser.add_argument("--sets", default="data/val_shifted/sets.json", help="training.shifted's sets index")
    parser.add_argument("--only", nargs="+", default=["x0.33", "x1", "x3"], help="the sets timed")
    parser.add_argument("--images", type=int, default=5, help="images per set")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per image")
    parser.add_argument("--engine", default="auto", help="the runtime engine (default: the service's, auto)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where a .pt is exported (default: the service's)")
    parser.add_argument("--output", default=str(RESULTS / "auto_cost.json"))
    args = parser.parse_args(argv)

    root = Path(args.sets).parent
    rows = []
    for checkpoint in args.checkpoints:
        predictor = Predictor.open(checkpoint, in_process_options(engine=args.engine), cache_dir=args.cache_dir)
        for name in args.only:
            listed = json.loads((root / f"{name}.json").read_text())["images"][: args.images]
            payloads = [(root / name / info["file_name"]).read_bytes() for info in listed]
            rows.append(
                {"model": Path(checkpoint).parent.name, "set": name, **auto_cost(predictor, payloads, args.repeats)}
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| model | set | auto / own scale (median per image) | auto / the scale it chose | scales chosen |")
    print("|---|---|--:|--:|---|")
    for row in rows:
        scales = ", ".join(f"{scale:g}" for scale in row["chosen_scales"])
        print(
            f"| {row['model']} | {row['set']} | {row['auto_vs_own']:.2f}x | {row['auto_vs_chosen']:.2f}x | {scales} |"
        )
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_end": list(os.getloadavg())}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    print(f"saved {output}")


if __name__ == "__main__":
    main()
