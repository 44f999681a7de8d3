"""Keys large runs need (ultralytics' names): ``fraction`` (a fixed subset of the training split), ``save_period``
(also keep ``epochN.pt`` every N epochs), ``single_cls`` (every object one class) and ``val=False`` (validate after
the last epoch only)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
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


def test_single_cls_merges_every_class_into_one(tmp_path):
    root = make_dataset(tmp_path / "shapes", n=20, imgsz=64, seed=0, workers=1)
    cfg = get_config({"data": str(root / "detect" / "data.yaml"), "imgsz": 64, "workers": 0})
    many = get_task("detect").build_data(cfg)
    one = get_task("segment").build_data({**cfg, "data": str(root / "segment" / "data.yaml"), "single_cls": True})
    assert len(many.names) == 6 and one.names == ["item"]
    for split in ("train", "val"):
        counts = [len(it.cls) for it in getattr(many, split).items]
        merged = getattr(one, split).items
        assert [len(it.cls) for it in merged] == counts and all((it.cls == 0).all() for it in merged)
        assert len(set(int(c) for it in getattr(many, split).items for c in it.cls)) > 1
    assert any("single_cls: the 6 classes" in line for line in one.summary)


def test_val_false_validates_after_the_last_epoch_only(colour_folder):
    cfg = get_config({**FAST, "data": str(colour_folder), "epochs": 3, "val": False, "name": "noval"})
    cfg["_user_keys"] = sorted(cfg)
    res = Trainer(cfg).train()
    with open("runs/classify/noval/results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    top1 = [float(r["metrics/accuracy_top1"]) for r in rows]
    assert math.isnan(top1[0]) and math.isnan(top1[1]) and not math.isnan(top1[2])
    assert all(not math.isnan(float(r["train/loss"])) for r in rows)
    assert res["best_epoch"] == 3 and res["metrics/accuracy_top1"] == pytest.approx(top1[2], abs=1e-6)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_cache_gives_the_same_training_samples(mode, tmp_path, monkeypatch):
    from vistrain.data.sampler import SampleKey

    monkeypatch.setenv("VISTRAIN_CACHE", str(tmp_path / "cache"))
    root = make_dataset(tmp_path / "shapes", n=20, imgsz=96, seed=0, workers=1)
    cfg = get_config({"data": str(root / "segment" / "data.yaml"), "imgsz": 64, "workers": 0, "mixup": 0.5})
    plain = get_task("segment").build_data(cfg)
    cached = get_task("segment").build_data({**cfg, "cache": mode})
    assert cached.train.cache.mode == mode and cached.val.cache.mode == mode
    if mode == "disk":
        assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == len(plain.train) + len(plain.val)
    for ds_plain, ds_cached in ((plain.train, cached.train), (plain.val, cached.val)):
        for key in (SampleKey(0, 0), SampleKey(3, 1), SampleKey(len(ds_plain) - 1, 2)):
            a, b = ds_plain[key], ds_cached[key]
            assert a.keys() == b.keys()
            for k in a:
                assert same(a[k], b[k]), (mode, key, k)


def same(a, b) -> bool:
    """Equal, element for element, through tensors, arrays, tuples, lists and dicts."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_cache_ram_that_would_not_fit_is_refused(tmp_path, monkeypatch):
    import vistrain.data.cache as cache
    from vistrain.engine.utils import UserError

    monkeypatch.setattr(cache, "available_memory", lambda: 10_000)
    root = make_dataset(tmp_path / "shapes", n=20, imgsz=64, seed=0, workers=1)
    cfg = get_config({"data": str(root / "detect" / "data.yaml"), "imgsz": 64, "workers": 0, "cache": True})
    with pytest.raises(UserError, match=r"cache=ram: the train images at imgsz=64 need 0.0 GB .* use cache=disk"):
        get_task("detect").build_data(cfg)
    with pytest.raises(ConfigError, match="cache=memory: not one of ram, disk"):
        get_config({"cache": "memory"})
