"""Keys large runs need (ultralytics' names): ``fraction`` (a fixed subset of the training split) and
``save_period`` (also keep ``epochN.pt`` every N epochs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vistrain.config import ConfigError, get_config
from vistrain.data.synthetic import make_dataset
from vistrain.engine.checkpoint import load_checkpoint
from vistrain.engine.trainer import Trainer
from vistrain.tasks.base import get_task, take_fraction

FAST = dict(model="yolov5n-cls", imgsz=32, batch=8, nbs=8, workers=0, seed=0, warmup_epochs=0, plots=False)


def test_take_fraction_is_fixed_and_spread():
    items = [f"{c}/{i:02d}" for c in "abc" for i in range(10)]  # sorted, as an ImageFolder's samples
    picked, lines = take_fraction(items, 0.2)
    assert len(picked) == 6 and picked == take_fraction(items, 0.2)[0]  # the same subset every time
    assert {p[0] for p in picked} == {"a", "b", "c"} and sum(p[0] == "a" for p in picked) == 2  # every class's share
    assert lines == ["train: fraction=0.2: 6 of 30 images used"]
    assert take_fraction(items, 1.0) == (items, []) and len(take_fraction(items, 0.001)[0]) == 1
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="fraction"):
            get_config({"fraction": bad})


def test_fraction_trains_on_a_subset_and_validates_on_everything(tmp_path, colour_folder):
    root = make_dataset(tmp_path / "shapes", n=20, imgsz=64, seed=0, workers=1)
    for task, data in (("detect", root / "detect" / "data.yaml"), ("classify", colour_folder)):
        cfg = get_config({"data": str(data), "imgsz": 64, "workers": 0, "fraction": 0.5})
        half = get_task(task).build_data(cfg)
        full = get_task(task).build_data({**cfg, "fraction": 1.0})
        assert len(half.train) == round(len(full.train) / 2) and len(half.val) == len(full.val)
        assert half.names == full.names and any("fraction=0.5" in line for line in half.summary)


def test_save_period_keeps_every_nth_epoch(colour_folder):
    cfg = get_config({**FAST, "data": str(colour_folder), "epochs": 3, "save_period": 2, "name": "p"})
    cfg["_user_keys"] = sorted(cfg)
    Trainer(cfg).train()
    weights = Path("runs/classify/p/weights")
    assert sorted(p.name for p in weights.glob("*.pt")) == ["best.pt", "epoch2.pt", "last.pt"]
    kept = load_checkpoint(weights / "epoch2.pt")
    assert kept["epoch"] == 1 and "optimizer" in kept  # a full checkpoint of epoch 2 (0-based 1), resumable
    last = load_checkpoint(weights / "last.pt")
    assert last["epoch"] == 2
    assert any(not torch.equal(kept["model"][k], last["model"][k]) for k in kept["model"])
