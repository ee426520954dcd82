"""Every benchmark in its smallest mode, so that none can rot: tiny random-weight models, tiny images, one repeat.

Each test runs ``python -m bench.<name>`` as a user does (so its command line is checked too), writes the JSON
into a temporary folder and checks the fields a reader of ``bench/results/`` relies on for sane values. The
figures themselves mean nothing here (a shared CPU, random weights); that every benchmark still runs on
today's pipeline is what is tested. ``bench/gpu_check.py`` has its own smoke test, its CPU dry run
(``tests/test_gpu_check.py``).

``bench/e2e.py`` races Ultralytics YOLO11n-seg. The README's test command installs the ``[bench]`` extra and
ultralytics itself ``--no-deps`` (it requires ``opencv-python``, whose ``cv2`` would replace the headless one
and needs libGL), so CI runs this test too; it fails, not skips, where ultralytics is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from model.checkpoint import load_checkpoint, save_checkpoint
from service.settings import REPO
from tests.service_models import tiny_checkpoint

# The tiny nucleus model's input contract: raw microscopy fields at their own size, percentile intensity.
MICROSCOPY = ("data.resize=scale", "data.scale_test=1.0", "data.intensity=percentile", "model.num_classes=1")
BENCH_TIMEOUT_S = 600  # a loaded 2-core machine; each benchmark takes seconds on an idle one


def run_bench(name: str, *args: str) -> None:
    """``python -m bench.<name> *args`` from the repository root; fails with the end of its output."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def read(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def photo_model(workdir: Path) -> Path:
    """A tiny MEInst for photos (128 to 192 px buckets)."""
    return tiny_checkpoint("meinst", workdir / "meinst.pt")


@pytest.fixture(scope="module")
def photo(workdir: Path) -> Path:
    """A textured 200x160 PNG (the tiny models detect on texture)."""
    path = workdir / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def nucleus_data(workdir: Path) -> Path:
    """The nucleus builder's splits from one HeLa frame: a few tiles per split, one whole field each."""
    from training.nucleus import build

    root = workdir / "nucleus"
    build(str(root), tile=256, frames=1)
    return root


@pytest.fixture(scope="module")
def nucleus_model(workdir: Path) -> Path:
    """A tiny one-class microscopy EmbedMask with the nucleus dataset's category and a training object size
    (for scale=auto), in a folder named like the bundled recipe's (bench.accuracy's race names rows so)."""
    path = tiny_checkpoint("embedmask", workdir / "embedmask_nucleus" / "model.pt", extra=MICROSCOPY, object_size=12.0)
    saved = load_checkpoint(path)
    saved.update(class_names=["nucleus"], category_ids=[1])
    save_checkpoint(saved, path)
    return path


def models_json(name: str, path: Path) -> str:
    return json.dumps([{"name": name, "path": str(path)}])


def test_latency(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    run_bench(
        "latency",
        *("--methods", "meinst", "--sizes", "128x128", "--batches", "1", "2", "--repeats", "1", "--threads", "1"),
        *("--output", str(out)),
    )
    rows = read(out)["rows"]
    assert {(r["runtime"], r["batch"]) for r in rows} == {(e, b) for e in ("eager", "onnxruntime") for b in (1, 2)}
    for row in rows:
        assert all(row[key] > 0 for key in ("pre_ms", "graph_ms", "finish_ms", "graph_speedup", "total_speedup"))
        assert row["total_ms"] == pytest.approx(row["pre_ms"] + row["graph_ms"] + row["finish_ms"])
        assert 0 < row["detections_per_image"] <= 100 and 0 <= row["instances_per_image"] <= 100
        assert row["padded_shape"] == [128, 128]


def test_e2e(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    run_bench(
        "e2e",
        *("--methods", "meinst", "--engines", "onnxruntime", "--sizes", "128", "--repeats", "1"),
        *("--min-detections", "0", "--threads", "1", "--output", str(out)),
    )
    result = read(out)
    assert {r["model"] for r in result["rows"]} == {
        "ours-meinst-onnxruntime",
        "yolo11n-seg-retina-onnxruntime",
        "yolo11n-seg-default-onnxruntime",
    }
    for row in result["rows"]:
        assert row["runs"] == len(result["images"]) > 0
        assert all(row[f"{stage}_ms"] > 0 for stage in ("decode", "preprocess", "graph", "postprocess", "json"))
        assert row["total_ms"] > 0 and row["yolo_best_over_this"] > 0 and row["json_bytes_median"] > 0
        assert 0 <= row["instances_min"] <= 100 and 0 <= row["mask_area_mean"] <= 1


def test_tiling(tmp_path: Path, workdir: Path, nucleus_model: Path) -> None:
    out = tmp_path / "tiling.json"
    run_bench(
        "tiling",
        *("--models", models_json("nuclei", nucleus_model), "--sizes", "300x400", "--batch", "2", "--threads", "1"),
        *("--cache-dir", str(workdir / "cache"), "--out", str(out)),
    )
    (row,) = read(out)["rows"]
    tiled = row["tiled"]
    assert row["model"] == "nuclei" and row["size"] == [300, 400] and row["tiled_ms_per_megapixel"] > 0
    assert tiled["tiles"] > 1 and tiled["bucket"] is not None  # larger than every bucket of the tiny model
    assert all(tiled[key] > 0 for key in ("total_ms", "cpu_ms", "cut_ms", "inference_ms", "finish_merge_ms"))
    assert tiled["instances"] >= 0 and row["shrunk"]["total_ms"] > 0 and row["shrunk"]["instances"] >= 0


def test_accuracy(tmp_path: Path, workdir: Path, nucleus_data: Path, nucleus_model: Path) -> None:
    """The peer trains one step on the tiny dataset at half size; both are tuned on one scale; a one-round race."""
    out = tmp_path / "accuracy.json"
    data = [
        f"data.train_annotations={nucleus_data / 'train.json'}",
        f"data.train_images={nucleus_data / 'train'}",
        "data.scale_train=[0.5,0.5]",
        "data.num_workers=0",
        "solver.ims_per_batch=1",
    ]
    run_bench(
        "accuracy",
        *data,
        *("--iterations", "1", "--output-dir", str(tmp_path / "peer"), "--ours", str(nucleus_model)),
        *("--data", str(nucleus_data), "--scales", "0.5", "--race-rounds", "1"),
        *("--cache-dir", str(workdir / "cache"), "--output", str(out)),
    )
    rows = read(out)["rows"]
    assert [r["method"] for r in rows] == ["maskrcnn_mnv2_fpn", "embedmask_nucleus"]
    for row in rows:
        assert row["scale"] == 0.5 and row["seconds_per_iter"] > 0  # the race timed both
        for split in ("test", "test_fields"):
            assert all(0 <= row[split][kind]["AP"] <= 100 for kind in ("bbox", "segm"))
    assert rows[0]["iterations"] == 1 and rows[0]["images_seen"] == 1
    assert (tmp_path / "peer" / "model.pt").is_file()

    # bench.domains on the same models: the fields at half magnification and a stand-in for CHO, ours and the peer.
    out = tmp_path / "domains.json"
    fields = str(nucleus_data / "test_fields.json")
    run_bench(
        "domains",
        *("--checkpoints", str(nucleus_model), "--peer", str(tmp_path / "peer" / "model.pt"), "--fields", fields),
        *("--factors", "0.5", "--cho", fields, "--cache-dir", str(workdir / "cache"), "--output", str(out)),
    )
    rows = read(out)["rows"]
    assert [(r["model"], r["set"]) for r in rows] == [
        (model, name) for model in ("embedmask_nucleus", "maskrcnn") for name in ("hela x0.5", "cho")
    ]
    for row in rows:
        settings = row["settings"]
        assert {"default", "own"} <= set(settings) and ("auto" in settings) == (row["model"] != "maskrcnn")
        assert row["best_fixed"] in settings and row["ideal_scale"] > 0
        assert all(0 <= s["segm_AP"] <= 100 and s["seconds"] >= 0 for s in settings.values())


def test_serve(tmp_path: Path, workdir: Path, photo_model: Path, photo: Path) -> None:
    out = tmp_path / "serve.json"
    run_bench(
        "serve",
        *("--models", models_json("meinst", photo_model), "--image", str(photo), "--concurrency", "2"),
        *("--requests", "4", "--max-batch-size", "2", "--raw-repeats", "1", "--work", str(tmp_path / "work")),
        *("--cache-dir", str(workdir / "cache"), "--output", str(out)),
    )
    report = read(out)
    assert {(r["model"], r["max_batch_size"]) for r in report["serve"]} == {("meinst", 2), ("meinst", 1)}
    for row in report["serve"]:
        assert row["errors"] == 0 and row["requests"] == 4 and row["throughput_rps"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["mean_batch_size"] >= 1 and row["inference_ms"] > 0
    (raw,) = report["raw"]
    assert raw["bucket"] == [128, 192] and {run["batch"] for run in raw["runs"]} == {1, 2}
    assert all(run["infer_images_per_s"] > 0 and run["instances_per_image"] >= 0 for run in raw["runs"])
    assert report["summary"]["meinst"]["service_c2_rps"] > 0


def test_replica(tmp_path: Path, photo_model: Path) -> None:
    """A cold start exports the checkpoint (the benchmark asserts it), a warm one reuses it; no torch; two
    configurations take turns."""
    out = tmp_path / "replica.json"
    configs = {"one_stream": ["--runtime.streams", "1"], "ort": {"args": ["--runtime.engine", "onnxruntime"]}}
    run_bench(
        "replica",
        *("--repeats", "1", "--idle-s", "0.5", "--configs", json.dumps(configs)),
        *("--models", models_json("meinst", photo_model), "--output", str(out)),
    )
    result = read(out)
    assert set(result["runs"]) == set(configs)
    for name in configs:
        for kind in ("cold", "warm"):
            (run,) = result["runs"][name][kind]
            assert run["start_to_ready_s"] > 0 and 0 < run["server_rss_mb"] <= run["peak_rss_mb"]
            assert run["idle_rss_mb"] >= run["server_rss_mb"] and not run["torch_loaded"]
            assert result["summary"][name][kind]["idle_rss_mb"]["median"] == run["idle_rss_mb"]


def test_precision(tmp_path: Path, workdir: Path, nucleus_data: Path, nucleus_model: Path) -> None:
    out = tmp_path / "precision.json"
    run_bench(
        "precision",
        *("--models", models_json("embedmask", nucleus_model), "--data", str(nucleus_data)),
        *("--splits", "val_fields", "--repeats", "1", "--cache-dir", str(workdir / "cache"), "--output", str(out)),
    )
    result = read(out)["models"]["embedmask"]
    assert set(result["ap"]) == {
        "onnxruntime-fp32",
        "openvino-bf16",
        "openvino-bf16+fp32_mask_decode",
        "openvino-bf16+fp32_mask_branch",
        "openvino-fp32",
    }
    assert all(0 <= row["val_fields"]["segm_AP"] <= 100 for row in result["ap"].values())
    assert all(ms > 0 for ms in result["latency"]["median_ms"].values())
    assert result["training_precision_would_choose"] in (
        "bf16",
        "bf16+fp32_mask_decode",
        "bf16+fp32_mask_branch",
        "fp32",
    )


def test_openvino_memory(tmp_path: Path, photo_model: Path) -> None:
    out = tmp_path / "openvino_memory.json"
    run_bench(
        "openvino_memory",
        *("--graph", str(photo_model), "--models", models_json("meinst", photo_model), "--buckets", "128x128"),
        *("--batch", "2", "--repeats", "1", "--variants", "batch1,runtime,ort,service-onnxruntime,service-openvino"),
        *("--interleaved", "--output", str(out)),
    )
    result = read(out)
    records = {record["variant"]: record for record in result["records"]}
    assert set(records) == {"batch1", "runtime", "ort", "service-onnxruntime", "service-openvino"}
    for name in ("batch1", "runtime", "ort"):
        record = records[name]
        assert record["peak_rss_mb"] >= record["rss_mb"]["warm"] > 0
        assert record["latency"]["128x128"]["batch1_ms"] > 0 and record["latency"]["128x128"]["batch2_ms"] > 0
    for name in ("service-onnxruntime", "service-openvino"):
        record = records[name]
        assert record["rss_mb"]["idle"] > 0 and record["load_s"]["meinst"] >= 0
        assert record["buckets"]["meinst"] == ["128x128", "128x192", "192x128"]
    assert all(v > 0 for v in result["interleaved_latency"]["128x128"]["median_per_image_ms"].values())


def test_finishing(tmp_path: Path) -> None:
    out = tmp_path / "finishing.json"
    run_bench("finishing", "--runs", "1", "--full-runs", "1", "--sizes", "128x160", "--out", str(out))
    cases = read(out)["cases"]
    assert {case["mask_kind"] for case in cases} == {"box28", "logprob_s4"}
    for case in cases:
        assert case["identical_rle"] and case["image_size"] == [128, 160] and case["speedup_wall"] > 0
        assert case["ours"]["wall_ms_median"] > 0 and case["full_frame"]["wall_ms_median"] > 0


def test_scale_probes(tmp_path: Path, workdir: Path, nucleus_data: Path, nucleus_model: Path) -> None:
    """The probe records on one tuning set (here the val field itself), each strategy replayed."""
    index = tmp_path / "sets.json"
    index.write_text(json.dumps({"sets": [{"name": "val_fields"}]}))
    for suffix in (".json", ""):  # the set's files beside its index, as training.shifted writes them
        (tmp_path / f"val_fields{suffix}").symlink_to(nucleus_data / f"val_fields{suffix}")
    out = tmp_path / "scale_probes.json"
    run_bench(
        "scale_probes",
        *("--checkpoints", str(nucleus_model), "--sets", str(index), "--probe-scales", "1", "0.5"),
        *("--cache-dir", str(workdir / "cache"), "--output", str(out)),
    )
    (entry,) = read(out)["models"]["embedmask_nucleus"].values()
    assert set(entry["summary"]) == {"shipped", "own", "all"} and entry["images"]
    for image in entry["images"]:
        assert image["ideal"] > 0 and set(image["probes"]) == {"1", "0.5"}
        assert all(0.1 <= scale <= 10 for scale in image["chosen"].values())


def test_entry_points(tmp_path: Path, workdir: Path, nucleus_data: Path, nucleus_model: Path) -> None:
    """Evaluation, the predict CLI in process and the service on the tiny model: every answered instance is one
    evaluation's results hold too (the same pipeline)."""
    out = tmp_path / "entry_points.json"
    run_bench(
        "entry_points",
        *("--checkpoints", str(nucleus_model), "--annotations", str(nucleus_data / "test_fields.json")),
        *("--images", str(nucleus_data / "test_fields"), "--cache-dir", str(workdir / "cache"), "--output", str(out)),
    )
    rows = read(out)["rows"]
    assert [r["entry_point"] for r in rows] == [
        "training.evaluate",
        "service.predict --checkpoint",
        "POST /segment (service.predict --url)",
    ]
    for row in rows[1:]:
        held, total = row["held_by_evaluation"].split(" of ")
        assert held == total and row["instances"] <= rows[0]["instances"]


def test_auto_cost(tmp_path: Path, workdir: Path, nucleus_data: Path, nucleus_model: Path) -> None:
    """scale=auto timed against fixed scales on one set (here the val field itself): ratios and the scales
    chosen, per model and set."""
    index = tmp_path / "sets.json"
    index.write_text(json.dumps({"sets": [{"name": "val_fields"}]}))
    for suffix in (".json", ""):
        (tmp_path / f"val_fields{suffix}").symlink_to(nucleus_data / f"val_fields{suffix}")
    out = tmp_path / "auto_cost.json"
    run_bench(
        "auto_cost",
        *("--checkpoints", str(nucleus_model), "--sets", str(index), "--only", "val_fields", "--images", "1"),
        *("--repeats", "1", "--cache-dir", str(workdir / "cache"), "--output", str(out)),
    )
    (row,) = read(out)["rows"]
    assert row["model"] == "embedmask_nucleus" and row["set"] == "val_fields" and row["images"] == 1
    assert row["auto_vs_own"] > 0 and row["auto_vs_chosen"] > 0
    assert all(0.1 <= scale <= 10 for scale in row["chosen_scales"])
