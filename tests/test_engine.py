"""The trainer end to end on tiny generated data: run folder, loss, resume, bad images, predict."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vistrain
from vistrain.engine.checkpoint import load_checkpoint
from vistrain.engine.utils import UserError
from vistrain.engine.trainer import Trainer
from vistrain.config import get_config

FAST = dict(model="yolov5n-cls", imgsz=32, batch=8, nbs=8, workers=0, seed=0, warmup_epochs=0)


def rows(csv_path: Path) -> list[dict]:
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def make_trainer(**kw) -> Trainer:
    cfg = get_config(kw)
    cfg["_user_keys"] = sorted(kw)
    return Trainer(cfg)


def test_two_epochs_loss_falls_and_run_folder_complete(colour_folder):
    res = vistrain.train(data=str(colour_folder), epochs=2, **FAST)
    run = Path(res["save_dir"])
    assert run == Path("runs/classify/train")
    for f in ["args.yaml", "results.csv", "results.png", "confusion_matrix.png", "weights/best.pt",
              "weights/last.pt", "train_batch0.jpg", "val_batch0_labels.jpg", "val_batch0_pred.jpg"]:
        assert (run / f).is_file(), f
    r = rows(run / "results.csv")
    assert [int(x["epoch"]) for x in r] == [1, 2]
    for col in ["train/loss", "val/loss", "metrics/accuracy_top1", "metrics/accuracy_top5", "lr/pg0", "lr/pg1",
                "lr/pg2", "time"]:
        assert col in r[0], col
    assert float(r[1]["train/loss"]) < float(r[0]["train/loss"])
    lrs = [float(x["lr/pg0"]) for x in r]  # the lr each epoch trained with: linear decay to lrf 0.01
    assert lrs[1] / lrs[0] == pytest.approx(1 - 0.5 * 0.99)
    ckpt = load_checkpoint(run / "weights/best.pt")
    assert ckpt["names"] == ["blue", "green", "red"] and ckpt["imgsz"] == 32 and ckpt["task"] == "classify"
    # the finished run's best.pt holds no training state (last.pt does, for resume)
    last = load_checkpoint(run / "weights/last.pt")
    assert {"train_model", "optimizer"} <= set(last) and not {"train_model", "optimizer", "grads"} & set(ckpt)
    assert (run / "weights/best.pt").stat().st_size < 0.6 * (run / "weights/last.pt").stat().st_size
    umask = os.umask(0o022)
    os.umask(umask)
    for f in ("best.pt", "last.pt"):  # as open() would create them, not mkstemp's owner-only mode
        assert (run / "weights" / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    # a second run gets a new numbered folder
    res2 = vistrain.train(data=str(colour_folder), epochs=1, plots=False, **FAST)
    assert res2["save_dir"] == str(Path("runs/classify/train2"))


def test_checkpoint_rebuilds_for_val_predict_and_finetune(colour_folder, tmp_path):
    res = vistrain.train(data=str(colour_folder), epochs=3, optimizer="Adam", lr0=0.01, **FAST)
    best = f"{res['save_dir']}/weights/best.pt"
    model = vistrain.build_model(best)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    metrics = vistrain.val(model=best, save_json=True, workers=0)
    assert metrics["metrics/accuracy_top1"] == pytest.approx(res["metrics/accuracy_top1"])
    assert json.loads((Path(metrics["save_dir"]) / "metrics.json").read_text())["metrics/accuracy_top1"] >= 0
    images = sorted((colour_folder / "red").glob("*.png"))[:2] + sorted((colour_folder / "blue").glob("*.png"))[:2]
    preds = vistrain.predict(best, [str(p) for p in images], save_json=True, save=True)
    assert [len(p.topk(5)) for p in preds] == [3, 3, 3, 3]  # only 3 classes exist
    assert all(abs(float(p.probs.sum()) - 1) < 1e-5 for p in preds)
    out = Path(preds[0].extra["save_dir"])
    assert (out / "predictions.csv").is_file() and (out / "predictions.json").is_file()
    assert len(list(out.glob("*.jpg"))) == 4
    if res["metrics/accuracy_top1"] == 1.0:
        assert [p.top1[0] for p in preds] == ["red", "red", "blue", "blue"]
    # fine-tune from the checkpoint
    res3 = vistrain.train(data=str(colour_folder), epochs=1, **{**FAST, "model": best})
    assert Path(res3["save_dir"], "weights/last.pt").exists()


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(colour_folder):
    # batch 7, nbs 14: 5 batches per epoch, an optimizer step every 2, so an accumulation spans the interruption
    kw = dict(data=str(colour_folder), epochs=3, plots=False, **{**FAST, "warmup_epochs": 1.0, "batch": 7, "nbs": 14})
    full = make_trainer(**kw, name="full")
    full.train()

    part = make_trainer(**kw, name="part")

    def stop_after_first_epoch(trainer):  # two of its batches' gradients wait for the next step
        if trainer.epoch == 0:
            raise Interrupt

    part.add_callback("on_epoch_end", stop_after_first_epoch)
    with pytest.raises(Interrupt):
        part.train()
    last = Path("runs/classify/part/weights/last.pt")
    saved = load_checkpoint(last)
    assert saved["epoch"] == 0

    resumed = make_trainer(resume=str(last))
    seen = {}
    resumed.add_callback("on_train_start", lambda t: seen.update(
        start=t.start_epoch, updates=t.ema.updates,
        opt=t.optimizer.state_dict()["state"][0]["exp_avg"].clone()))
    resumed.train()
    assert seen["start"] == 1
    assert seen["updates"] == saved["ema_updates"] > 0
    assert torch.equal(seen["opt"], saved["optimizer"]["state"][0]["exp_avg"])
    assert [int(r["epoch"]) for r in rows(Path("runs/classify/part/results.csv"))] == [1, 2, 3]
    a = load_checkpoint("runs/classify/full/weights/last.pt")
    b = load_checkpoint(last)
    for k, v in a["train_model"].items():
        assert torch.allclose(v.float(), b["train_model"][k].float(), atol=1e-6), k
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-6), k
    # a finished run's best.pt carries no training state: resuming from it says so
    with pytest.raises(UserError, match="best.pt: not a vistrain last.pt with training state"):
        make_trainer(resume="runs/classify/full/weights/best.pt")


def test_resume_of_a_moved_run_continues_where_last_pt_is(colour_folder):
    part = make_trainer(data=str(colour_folder), epochs=2, plots=False, name="moved", **FAST)
    part.add_callback("on_epoch_end", lambda t: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        part.train()
    os.rename("runs", "elsewhere")
    make_trainer(resume="elsewhere/classify/moved/weights/last.pt").train()
    assert not Path("runs").exists()  # nothing made at the run's old place
    assert [int(r["epoch"]) for r in rows(Path("elsewhere/classify/moved/results.csv"))] == [1, 2]


def test_bad_and_odd_images_train_with_warnings(colour_folder, capsys):
    red = colour_folder / "red"
    base = np.full((32, 32, 3), (220, 30, 30), np.uint8)
    Image.fromarray(base).convert("L").save(red / "gray.png")
    Image.fromarray(base).convert("RGBA").save(red / "rgba.png")
    Image.fromarray(base).convert("P").save(red / "palette.png")
    Image.fromarray(base).convert("CMYK").save(red / "cmyk.jpg")
    Image.fromarray((base[..., 0].astype(np.uint16) * 257)).save(red / "sixteen.png")
    good = (red / "red_000.png").read_bytes()
    (red / "truncated.png").write_bytes(good[: len(good) // 2])
    (red / "empty.jpg").write_bytes(b"")
    (red / "notes.txt").write_text("not an image")
    (colour_folder / "purple").mkdir()
    before = {p: p.read_bytes() for p in colour_folder.rglob("*") if p.is_file()}
    res = vistrain.train(data=str(colour_folder), epochs=1, plots=False, **FAST)
    out = capsys.readouterr().out
    assert "2 corrupt skipped" in out or "2 corrupt" in out
    assert "truncated.png" in out and "empty.jpg" in out
    assert "purple" in out and "notes.txt" not in out
    ckpt = load_checkpoint(Path(res["save_dir"]) / "weights/best.pt")
    assert ckpt["names"] == ["blue", "green", "purple", "red"]
    after = {p: p.read_bytes() for p in colour_folder.rglob("*") if p.is_file()}
    assert before == after  # no user file modified, none added


def test_time_limit_and_patience(colour_folder):
    res = vistrain.train(data=str(colour_folder), epochs=50, time=1e-9, plots=False, **FAST)
    assert res["epochs_done"] == 1
    res = vistrain.train(data=str(colour_folder), epochs=50, patience=1, plots=False,
                         **{**FAST, "optimizer": "SGD", "lr0": 0.0})
    assert res["epochs_done"] == 2  # lr 0: no improvement after epoch 1, stop one epoch later


def test_non_finite_loss_skipped_then_divergence_stops_with_message(colour_folder, monkeypatch, capsys):
    from vistrain.tasks.classify import ClassifyTask

    real = ClassifyTask.loss
    calls = {"n": 0}

    def sometimes_nan(self, preds, batch):
        loss, items = real(self, preds, batch)
        calls["n"] += 1
        if self.nan_mode == "always" or calls["n"] == 2:
            loss = loss * float("nan")
        return loss, items

    monkeypatch.setattr(ClassifyTask, "loss", sometimes_nan)
    monkeypatch.setattr(ClassifyTask, "nan_mode", "once", raising=False)
    res = vistrain.train(data=str(colour_folder), epochs=1, plots=False, **FAST)
    ckpt = load_checkpoint(Path(res["save_dir"]) / "weights" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    out = capsys.readouterr()
    assert "1 batches skipped for a non-finite loss" in out.out + out.err
    monkeypatch.setattr(ClassifyTask, "nan_mode", "always", raising=False)
    monkeypatch.setattr(Trainer, "MAX_BAD_STEPS", 3)
    with pytest.raises(UserError, match="training diverged: the loss was NaN/inf for 3 batches in a row"):
        vistrain.train(data=str(colour_folder), epochs=1, plots=False, **FAST)


def test_channels_last_training_keeps_checkpoints_nchw(colour_folder):
    """channels_last=true trains with NHWC weights; the checkpoint is NCHW; val agrees in both layouts."""
    trainer = make_trainer(data=str(colour_folder), epochs=1, plots=False, **FAST)
    layouts = []
    trainer.add_callback("on_batch_end", lambda tr: layouts.append(
        tr.model.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)))
    res = trainer.train()
    assert layouts and all(layouts)
    ckpt = load_checkpoint(Path(res["save_dir"]) / "weights/last.pt")
    four_d = [v for v in ckpt["model"].values() if v.ndim == 4]
    assert four_d and all(v.is_contiguous() for v in four_d)
    best = f"{res['save_dir']}/weights/best.pt"
    nhwc = vistrain.val(model=best, workers=0, plots=False)
    nchw = vistrain.val(model=best, workers=0, plots=False, channels_last=False)
    assert nhwc["val/loss"] == pytest.approx(nchw["val/loss"], rel=1e-4)
    assert nhwc["metrics/accuracy_top1"] == nchw["metrics/accuracy_top1"]


def test_gradients_accumulate_across_epoch_boundaries(colour_folder):
    """An optimizer step every `accumulate` batches of the whole run (as YOLOv5 and ultralytics): the
    gradients of an epoch's last batches are not thrown away when the next epoch starts."""
    calls = {"zero_grad": 0, "step": 0}

    def count(tr):
        opt = tr.optimizer
        zero = opt.zero_grad

        def counted_zero(*a, **k):
            calls["zero_grad"] += 1
            return zero(*a, **k)

        opt.zero_grad = counted_zero
        opt.register_step_post_hook(lambda *_: calls.__setitem__("step", calls["step"] + 1))

    fast = {**FAST, "batch": 7, "nbs": 14}  # accumulate 2 batches, an odd number of batches per epoch
    trainer = make_trainer(data=str(colour_folder), epochs=3, plots=False, **fast)
    trainer.add_callback("on_train_start", count)
    trainer.train()
    nb = len(trainer.train_loader)
    assert nb % 2 == 1, nb
    assert calls["step"] == (3 * nb) // 2  # every second batch of the run, whatever the epoch
    assert calls["zero_grad"] == 1 + calls["step"]
