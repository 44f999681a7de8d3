"""Exact resume: a run killed with SIGKILL in the middle of an epoch and resumed from ``last.pt`` ends with the
same weights, bit for bit, as the run that was never interrupted, for every task, with augmentation on (mosaic,
mixup, warps, HSV, flips, random resized crops, dropout), with ``workers=0`` and ``workers=2``.

The killed run is a real process that sends itself SIGKILL from a callback after a given batch: no ``finally``,
no atexit, no flush.  The uninterrupted reference runs with the other ``workers`` setting (0 or 2): every sample
being a function of (seed, epoch, index), the number of loader processes must not change a bit either.  The
CPU thread count does change bits, so resume restores the interrupted run's count (checked here too).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_colour_folder
from vistrain.config import get_config
from vistrain.data.synthetic import make_dataset
from vistrain.engine.checkpoint import load_checkpoint
from vistrain.engine.trainer import Trainer
from vistrain.utils.threads import resolve_threads

@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


KILLER = r"""
import json, os, signal, sys
from vistrain.config import get_config
from vistrain.engine.trainer import Trainer
from vistrain.utils.threads import resolve_threads

kw, (kill_epoch, kill_batch) = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cfg = get_config(kw)
cfg["_user_keys"] = sorted(kw)
trainer = Trainer(cfg)
seen = {}

def kill(t):
    seen[t.epoch] = seen.get(t.epoch, 0) + 1
    if t.epoch == kill_epoch and seen[t.epoch] == kill_batch:
        os.kill(os.getpid(), signal.SIGKILL)

trainer.add_callback("on_batch_end", kill)
trainer.train()
"""

# 3 epochs; killed after batch 2 of epoch 2 (index 1), with gradients of the batches before still pending
# (accumulation over 2 batches), in warmup for the detectors
KILL_AT = (1, 2)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume-data")
    shapes = make_dataset(root / "shapes", n=16, imgsz=64, seed=1, workers=1)
    return {"classify": write_colour_folder(root / "colours", per_class=8),
            "detect": shapes / "detect" / "data.yaml", "segment": shapes / "segment" / "data.yaml"}


def run_config(family: str, datasets: dict[str, Path]) -> dict:
    common = dict(epochs=3, seed=0, deterministic=True, plots=False, verbose=False, exist_ok=True)
    if family == "classify":
        return dict(model="yolov5n-cls", data=str(datasets["classify"]), imgsz=32, batch=6, nbs=12,
                    warmup_epochs=1.0, dropout=0.2, hsv=0.3, **common)
    # mosaic (closed for the last epoch), mixup, rotation and shear on: every random draw of the detect pipeline
    data = datasets["segment" if family == "yolov8n-seg" else "detect"]
    return dict(model=family, data=str(data), imgsz=64, batch=4, nbs=8, warmup_epochs=1.0, close_mosaic=1,
                mixup=0.5, degrees=5.0, shear=2.0, **common)


def train_in_process(**kw) -> Path:
    cfg = get_config(kw)
    cfg["_user_keys"] = sorted(kw)
    trainer = Trainer(cfg)
    trainer.train()
    return trainer.wdir / "last.pt"


def csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# (family, workers of the interrupted run): the reference and the resumed run use the other setting, so each
# family checks that neither the kill nor the number of loader processes changes a bit. The thread count does
# (CPU kernels split their sums by thread): the interrupted run takes the automatic count for its workers, the
# reference is given that count, and the resumed run, whose workers would choose another one on 2 CPUs, must
# take it back from last.pt
CASES = [("classify", 2), ("yolov5n", 0), ("yolov8n", 2), ("yolov8n-seg", 0)]


@pytest.fixture(scope="module")
def uninterrupted(datasets, tmp_path_factory) -> dict[str, Path]:
    project = tmp_path_factory.mktemp("full")
    return {f: train_in_process(**run_config(f, datasets), workers=2 - w, threads=resolve_threads(0, w),
                                project=str(project), name=f) for f, w in CASES}


@pytest.mark.parametrize("family, workers", CASES)
def test_killed_and_resumed_run_equals_uninterrupted(family, workers, datasets, uninterrupted, tmp_path):
    cfg = {**run_config(family, datasets), "workers": workers, "project": str(tmp_path / "runs"), "name": "killed"}
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg), json.dumps(KILL_AT)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "runs" / ("classify" if family == "classify" else
                               "segment" if family.endswith("-seg") else "detect") / "killed"
    last = run / "weights" / "last.pt"
    assert load_checkpoint(last)["epoch"] == KILL_AT[0] - 1  # the killed epoch was never saved

    torch.set_num_threads(resolve_threads(0, 2 - workers))
    train_in_process(resume=str(last), workers=2 - workers)
    resumed_threads = torch.get_num_threads()

    a, b = load_checkpoint(uninterrupted[family]), load_checkpoint(last)
    assert b["epoch"] == a["epoch"] == 2
    for part in ("train_model", "model"):
        diff = [k for k, v in a[part].items() if not torch.equal(v, b[part][k])]
        assert not diff, f"{part}: {len(diff)} of {len(a[part])} tensors differ, first {diff[0]}"
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert all(torch.equal(va[s], vb[s]) for s in va), f"optimizer state {ka}"
    full_rows = csv_rows(uninterrupted[family].parent.parent / "results.csv")
    rows = csv_rows(run / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # the killed epoch's row is not there twice
    for ra, rb in zip(full_rows, rows):  # losses and metrics of every epoch, as logged
        assert {k: v for k, v in ra.items() if k != "time"} == {k: v for k, v in rb.items() if k != "time"}
    assert resumed_threads == resolve_threads(0, workers)  # the interrupted run's count, from last.pt
