"""The prepared GPU check, as its CPU dry run: the same script end to end, with tiny sizes and counts.

A GPU is lent rarely and briefly, so the one run there must not fail on a typo: every part must run here,
write its JSON and say what it skipped for lack of CUDA.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.gpu_check import PARTS
from service.settings import REPO


def test_dry_run_runs_every_part_and_says_what_it_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [str(REPO / "bench" / "gpu_check.sh"), str(out), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and "finished" in summary
    assert {name: part["status"] for name, part in summary["parts"].items()} == dict.fromkeys(PARTS, "done")
    assert all(part["errors"] == [] for part in summary["parts"].values()), summary["parts"]
    assert any("CUDA" in s["what"] for s in summary["parts"]["tests"]["skipped"])
    assert any("CUDA graphs" in s["what"] for s in summary["parts"]["graphs"]["skipped"])
    assert "not_measured" in summary and (out / "gpu_check.log").stat().st_size > 0

    rows = {name: json.loads((out / f"{name}.json").read_text())["rows"] for name in PARTS}
    assert {(r["backbone"], r["model"]) for r in rows["latency"]} == {
        (b, m) for b in ("mnv2", "r50") for m in ("meinst", "embedmask")
    }
    assert all(r["infer_ms"] > 0 and r["detections_per_image"] > 0 for r in rows["latency"])
    assert {(r["backbone"], r["model"]) for r in rows["training"]} == {
        (b, m) for b in ("mnv2", "r50") for m in ("maskrcnn", "meinst", "embedmask")
    }
    assert all(r["seconds_per_image"] > 0 and r["speed_vs_maskrcnn"] > 0 for r in rows["training"])
    torch_rows = [r for r in rows["parity"] if r["runtime"] == "torch-cpu"]
    assert len(torch_rows) == 2 and all(r["within_bar"] for r in torch_rows)  # eager and graph on one CPU agree
    assert {(r["model"], r["batching"]) for r in rows["serve"]} == {
        (m, b) for m in ("meinst", "embedmask") for b in (True, False)
    }
    assert all(r["errors"] == 0 and r["inference_ms"] > 0 for r in rows["serve"])
    assert {r["test"].rsplit("::", 1)[1] for r in rows["tests"] if r["outcome"] == "skipped"} >= {
        "test_cuda_matches_the_cpu_graph[meinst]"
    }
