"""Training: solver schedule, atomic checkpoints, short runs of each method from the nucleus configs,
kill-and-resume equivalence and a two-process gloo run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model import checkpoint as checkpoint_module
from model.checkpoint import load_checkpoint, load_detector, save_checkpoint
from model.config import Config, SolverConfig, load_config
from model.meinst.codec import PCAMaskCodec
from training import nucleus
from training.data import CocoInstanceDataset
from training.fit_codec import fit_codec
from training.solver import build_optimizer, lr_factor
from training.train import train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# A network small enough for seconds-long runs: no ImageNet file, 32-channel FPN and head, one conv.
TINY = [
    "model.backbone.weights=null",
    "model.backbone.weights_sha256=null",
    "model.fpn.out_channels=32",
    "model.head.channels=32",
    "model.head.num_convs=1",
    "model.head.num_groups=8",
    "model.head.pre_nms_topk=50",
    "model.head.max_detections=10",
    "model.head.score_threshold=0.0",
    "model.meinst.num_components=8",
    "model.embedmask.pixel_convs=1",
    "model.embedmask.pixel_channels=32",
    "data.min_size_train=[96,128]",
    "data.max_size_train=160",
    "data.min_size_test=128",
    "data.max_size_test=160",
    "data.num_workers=0",
    # The recipes' scale jitter reaches 6x: crop the 128-pixel tiles' inputs to 256 to keep steps short (and the
    # crop and photometric streams are part of what a resumed run must repeat).
    "data.crop_size_train=256",
    "solver.ims_per_batch=4",
    "solver.warmup_iters=2",
    "solver.steps=[3]",
    "solver.checkpoint_period=2",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One frame of HeLa nuclei in 128-pixel tiles: 42 train images, and 3 of the 12 val images."""
    root = tmp_path_factory.mktemp("nucleus")
    nucleus.build(str(root), tile=128, frames=1)
    val = json.loads((root / "val.json").read_text())
    val["images"] = val["images"][:3]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in {i["id"] for i in val["images"]}]
    (root / "val.json").write_text(json.dumps(val))
    return root


@pytest.fixture(scope="module")
def codec_path(data: Path) -> str:
    codec, ratio, _ = fit_codec(data / "train.json", num_components=8)
    path = data / "codec8.npz"
    codec.save_npz(path, ratio)
    return str(path)


def tiny_config(method: str, data: Path, output: Path, *extra: str, val: bool = False) -> Config:
    overrides = [
        *TINY,
        f"data.train_annotations={data / 'train.json'}",
        f"data.train_images={data / 'train'}",
        f"data.val_annotations={data / 'val.json' if val else 'null'}",
        f"data.val_images={data / 'val' if val else 'null'}",
        f"output_dir={output}",
        *extra,
    ]
    return load_config(CONFIGS / f"{method}_MNV2_nucleus.yaml", overrides)


def test_schedule_warms_up_then_steps() -> None:
    linear = SolverConfig(warmup_method="linear", warmup_factor=0.1, warmup_iters=10, steps=[20, 30], gamma=0.1)
    assert lr_factor(0, linear) == pytest.approx(0.1)
    assert lr_factor(5, linear) == pytest.approx(0.55)
    assert [lr_factor(i, linear) for i in (10, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    constant = SolverConfig(warmup_method="constant", warmup_factor=1 / 3, warmup_iters=500, steps=[600])
    assert lr_factor(0, constant) == lr_factor(499, constant) == pytest.approx(1 / 3)
    assert lr_factor(500, constant) == 1.0 and lr_factor(600, constant) == pytest.approx(0.1)


def test_biases_get_their_own_lr_and_weight_decay() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    model[0].weight.requires_grad_(False)  # frozen parameters stay out of the optimizer
    optimizer = build_optimizer(
        model, SolverConfig(base_lr=0.01, weight_decay=1e-4, bias_lr_factor=2.0, weight_decay_bias=0.0)
    )
    weights, biases = optimizer.param_groups
    assert [p.shape for p in weights["params"]] == [torch.Size([4])]  # the GroupNorm weight
    assert len(biases["params"]) == 2
    assert (weights["lr"], weights["weight_decay"], biases["lr"], biases["weight_decay"]) == (0.01, 1e-4, 0.02, 0.0)
    assert weights["momentum"] == 0.9


def test_failed_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 1, "weights": torch.ones(3)}, path)

    def crash(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iteration": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path)["iteration"] == 1


@pytest.mark.parametrize("method", ["meinst", "embedmask"])
def test_three_iterations_from_config(method: str, data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(method, data, tmp_path, "solver.max_iter=3", val=True)
    result = train(cfg)
    assert result.iteration == 3
    assert set(result.metrics) == {"bbox", "segm", "f1"}

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 3, 3]
    assert {"lr", "loss", "loss_cls", "loss_box", "loss_ctr", "loss_mask", "images_per_s", "eta_s"} <= set(lines[0])
    assert set(lines[2]["eval"]["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}

    for name in ("last.pt", "model_best.pt"):
        raw = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert raw["iteration"] == 3 and raw["class_names"] == ["nucleus"] and raw["category_ids"] == [1]
    assert {"optimizer", "scheduler"} <= set(load_checkpoint(tmp_path / "last.pt"))
    assert "optimizer" not in load_checkpoint(tmp_path / "model_best.pt")

    model, loaded_cfg, metadata = load_detector(tmp_path / "last.pt")
    assert not model.training and loaded_cfg.model.method == method
    # The recipe sizes by the scale rule, so the checkpoint records its training nuclei's median box side at its
    # test scale (the HeLa nuclei are about 26 px across in the image) for scale=auto.
    object_size = metadata.pop("object_size")
    # Answers default to the validation's best-F1 score threshold, which the checkpoint records.
    assert metadata.pop("recommended_score_threshold") == result.metrics["f1"]["threshold"]
    assert metadata.pop("object_density") > 0  # for the answers' density warning
    assert metadata.pop("cpu_precision") is None  # chosen after training, by training.precision
    assert metadata == {"class_names": ["nucleus"], "category_ids": [1], "iteration": 3, "metrics": result.metrics}
    assert 15 < object_size / loaded_cfg.data.scale_test < 45
    images = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8)
    result.model.eval()
    with torch.no_grad():
        expected, got = result.model(images), model(images)
    assert torch.equal(expected.boxes, got.boxes) and torch.equal(expected.masks, got.masks)
    if method == "meinst":  # fitted on the training set at the start, carried by the checkpoint
        assert model.mask_method.codec.is_fitted
        codec = PCAMaskCodec(8).load_npz(tmp_path / "codec.npz")
        assert torch.equal(codec.components, model.mask_method.codec.components)


def test_num_classes_must_match_the_dataset(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set model.num_classes=1"):
        train(tiny_config("embedmask", data, tmp_path, "model.num_classes=2", "model.class_names=[]"))


class Killed(Exception):
    pass


def test_killed_and_resumed_run_equals_an_uninterrupted_one(
    data: Path, codec_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MEInst, so that the per-iteration RNG (label-smoothing eps) is part of what must repeat; the
    learning rate steps down at iteration 3, after the resume point."""

    def config(name: str, *extra: str) -> Config:
        return tiny_config(
            "meinst", data, tmp_path / name, "solver.max_iter=4", f"model.meinst.codec_path={codec_path}", *extra
        )

    straight = train(config("straight"))

    original = CocoInstanceDataset.__getitem__
    loaded = []

    def dies_during_iteration_3(self: CocoInstanceDataset, key: object) -> object:
        loaded.append(key)
        if len(loaded) > 2 * 4 + 1:  # past the checkpoint at 2, partway through the third batch
            raise Killed
        return original(self, key)

    monkeypatch.setattr(CocoInstanceDataset, "__getitem__", dies_during_iteration_3)
    with pytest.raises(Killed):
        train(config("resumed"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["iteration"] == 2

    with pytest.raises(FileExistsError, match="--resume"):
        train(config("resumed"))
    with pytest.raises(ValueError, match="fpn"):
        train(config("resumed", "model.fpn.out_channels=16"), resume=True)

    resumed = train(config("resumed"), resume=True)
    assert resumed.iteration == straight.iteration == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert final["iteration"] == 4 and final["samples_consumed"] == 16
    assert final["scheduler"]["last_epoch"] == 4
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    result = train(Config.model_validate(cfg_dict))
    torch.save({"iteration": result.iteration, "model": result.model.state_dict()}, os.path.join(out, f"rank{rank}.pt"))


def test_two_gloo_processes_step_together(data: Path, tmp_path: Path) -> None:
    """Global batch 4 = 2 images on each of 2 ranks; both ranks end with the same weights."""
    cfg = tiny_config("embedmask", data, tmp_path / "run", "solver.max_iter=2")
    mp.spawn(_rank_main, args=(2, _free_port(), cfg.model_dump(mode="json"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 2
    a, b = ranks[0]["model"], ranks[1]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    written = load_checkpoint(tmp_path / "run" / "last.pt")  # by rank 0 only
    assert written["iteration"] == 2 and written["samples_consumed"] == 8
    assert all(torch.equal(written["model"][k], a[k]) for k in a)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_check.py on a GPU)")
@pytest.mark.parametrize("method", ["meinst", "embedmask"])
def test_amp_training_on_cuda(method: str, data: Path, tmp_path: Path) -> None:
    """The training loop on the GPU: fp16 autocast with a live loss scale, finite losses, a checkpoint that
    loads on the CPU and evaluates."""
    cfg = tiny_config(method, data, tmp_path, "solver.max_iter=6", "solver.steps=[5]", val=True)
    result = train(cfg)
    assert result.iteration == 6 and next(result.model.parameters()).device.type == "cuda"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines if "loss" in line)
    scaler = load_checkpoint(tmp_path / "last.pt")["grad_scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0  # AMP ran: an enabled scaler saves its state
    model, _, _ = load_detector(tmp_path / "last.pt")
    assert next(model.parameters()).device.type == "cpu" and set(result.metrics) == {"bbox", "segm"}
