"""EfficientDet end to end: it learns (an 8-image overfit reaches mAP50 >= 0.9 on those images), its checkpoint
validates and predicts like any detector's, and VOC data scores with VOC AP."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

import vistrain
from conftest import export_formats
from vistrain.data.synthetic import make_dataset


@pytest.fixture(scope="module")
def overfit(tmp_path_factory) -> dict:
    """EfficientDet-D0 on 8 images, validated on the same 8: 60 epochs, no augmentation, AdamW lr 0.01."""
    root = make_dataset(tmp_path_factory.mktemp("shapes"), n=10, imgsz=128, seed=0, workers=1)
    data = tmp_path_factory.mktemp("data") / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "detect"), "train": "images/train", "val": "images/train",
                                    "names": yaml.safe_load((root / "detect" / "data.yaml").read_text())["names"]}))
    project = tmp_path_factory.mktemp("runs")
    res = vistrain.train(model="efficientdet-d0", data=str(data), imgsz=128, epochs=60, batch=8, nbs=8, workers=0,
                         augment=False, mosaic=0.0, optimizer="AdamW", lr0=0.01, warmup_epochs=2, plots=False,
                         project=str(project), name="overfit", seed=0, verbose=False)
    return {**res, "root": root, "data": str(data)}


def test_efficientdet_overfits_eight_images(overfit):
    rows = list(csv.DictReader((Path(overfit["save_dir"]) / "results.csv").open()))
    assert len(rows) == 60 and {"train/box_loss", "train/cls_loss"} <= set(rows[0])
    first, last = rows[0], rows[-1]
    assert float(last["train/cls_loss"]) < 0.1 * float(first["train/cls_loss"])
    assert overfit["metrics/mAP50(B)"] >= 0.9, overfit["metrics/mAP50(B)"]


def test_efficientdet_checkpoint_val_and_predict(overfit, tmp_path):
    best = Path(overfit["save_dir"]) / "weights" / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["model_yaml"]["arch"] == "efficientdet" and ckpt["task"] == "detect"
    res = vistrain.val(model=str(best), data=overfit["data"], workers=0, project=str(tmp_path), name="v",
                       plots=False, verbose=False)
    assert res["metrics/mAP50(B)"] >= 0.9  # the checkpoint alone reproduces it (imgsz from the checkpoint)
    images = sorted((overfit["root"] / "detect" / "images" / "train").iterdir())[:2]
    preds = vistrain.predict(str(best), [str(p) for p in images], project=str(tmp_path), name="p", conf=0.5,
                             save=True)
    for r, im in zip(preds, images):
        labels = (overfit["root"] / "detect" / "labels" / "train" / f"{im.stem}.txt").read_text().splitlines()
        assert len(r.boxes) == len(labels)  # every object found once, at conf 0.5
        assert (Path(r.extra["save_dir"]) / im.name).is_file()  # drawn like YOLO's


def test_efficientdet_on_voc_data_reports_voc_ap(tmp_path):
    root = make_dataset(tmp_path / "shapes", n=12, imgsz=64, seed=2, workers=1)
    res = vistrain.train(model="efficientdet-d0", data=str(root / "voc"), imgsz=64, epochs=1, batch=4, nbs=4,
                         workers=0, plots=False, project=str(tmp_path / "runs"), name="voc", verbose=False)
    assert "metrics/VOC_AP50(B)" in res and "metrics/VOC07_AP50(B)" in res


def test_efficientdet_unknown_loss_preset_is_one_line(tmp_path):
    from vistrain.engine.utils import UserError

    root = make_dataset(tmp_path / "shapes", n=6, imgsz=64, seed=3, workers=1)
    with pytest.raises(UserError, match="loss=focal: EfficientDet's loss presets are effdet and tutorial"):
        vistrain.train(model="efficientdet-d0", data=str(root / "voc"), imgsz=64, epochs=1, batch=2, workers=0,
                       loss="focal", project=str(tmp_path / "runs"), plots=False)


def test_exported_efficientdet_validates_and_predicts_like_the_checkpoint(overfit, tmp_path):
    """The trained D0 exported to ONNX, TorchScript (and OpenVINO where installed): val gives the checkpoint's
    mAP50-95 (within 0.001), predict its boxes (within 1e-3 px) and classes, also from files exported with
    nms=True."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is a dev extra")
    best = Path(overfit["save_dir"]) / "weights" / "best.pt"
    formats = export_formats()
    images = [str(p) for p in sorted((overfit["root"] / "detect" / "images" / "train").iterdir())[:3]]
    kw = {"project": str(tmp_path), "verbose": False}
    want_val = vistrain.val(model=str(best), data=overfit["data"], workers=0, plots=False, name="v", **kw)
    want = vistrain.predict(str(best), images, name="p", conf=0.05, **kw)
    assert want_val["metrics/mAP50-95(B)"] > 0.5 and all(len(r.boxes) for r in want)
    for fmt in formats:
        path = vistrain.export(model=str(best), format=fmt, verbose=False)
        got_val = vistrain.val(model=str(path), data=overfit["data"], workers=0, plots=False, name=f"v{fmt}", **kw)
        assert abs(got_val["metrics/mAP50-95(B)"] - want_val["metrics/mAP50-95(B)"]) <= 1e-3, fmt
        for nms in (False, True):  # nms=True: the detections come out of the graph, 2 images a batch
            if nms:
                path = vistrain.export(model=str(best), format=fmt, nms=True, dynamic=True, conf=0.05, verbose=False)
            got = vistrain.predict(str(path), images, name=f"p{fmt}{nms}", conf=0.05, batch=2, **kw)
            for g, r in zip(got, want):
                assert len(g.boxes) == len(r.boxes), (fmt, nms)
                assert float((g.boxes[:, :4] - r.boxes[:, :4]).abs().max()) <= 1e-3, (fmt, nms)
                assert torch.equal(g.boxes[:, 5], r.boxes[:, 5]), (fmt, nms)
