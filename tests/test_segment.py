"""Instance segmentation end to end on a tiny generated polygon dataset: train, run folder, val save_json
against pycocotools (bbox and segm), masks in predictions, and a box-only dataset refused."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vistrain
from conftest import export_formats
from vistrain.data.synthetic import make_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), n=40, imgsz=96, seed=1, workers=1)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> dict:
    project = tmp_path_factory.mktemp("runs")
    return vistrain.train(model="yolov8n-seg", data=str(shapes / "segment" / "data.yaml"), imgsz=96, epochs=2,
                          batch=8, workers=0, project=str(project), name="seg", close_mosaic=1, warmup_epochs=0.5,
                          seed=0, verbose=False)


def test_segment_run_folder(trained):
    run = Path(trained["save_dir"])
    for f in ("args.yaml", "results.csv", "weights/best.pt", "weights/last.pt", "train_batch0.jpg",
              "val_batch0_pred.jpg", "PR_curve.png", "mask/PR_curve.png", "confusion_matrix.png"):
        assert (run / f).is_file(), f
    header = (run / "results.csv").read_text().splitlines()[0]
    for key in ("train/box_loss", "train/seg_loss", "train/cls_loss", "train/dfl_loss", "val/seg_loss",
                "metrics/mAP50(B)", "metrics/mAP50-95(B)", "metrics/mAP50(M)", "metrics/mAP50-95(M)"):
        assert key in header
    ckpt = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert ckpt["task"] == "segment"
    assert 0.0 <= trained["metrics/mAP50-95(M)"] <= trained["metrics/mAP50(M)"] <= 1.0


def test_val_save_json_matches_pycocotools_bbox_and_segm(trained, shapes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    best = Path(trained["save_dir"]) / "weights" / "best.pt"
    res = vistrain.val(model=str(best), save_json=True, name="val", project=str(Path(trained["save_dir"]).parent),
                       workers=0, conf=0.001)
    out = Path(res["save_dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and isinstance(preds[0]["segmentation"]["counts"], str)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "annotations.json"))
        dt = gt.loadRes(str(out / "predictions.json"))
        stats = {}
        for iou_type in ("bbox", "segm"):
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            stats[iou_type] = ev.stats
    for iou_type, x in (("bbox", "B"), ("segm", "M")):
        assert abs(stats[iou_type][0] - metrics[f"metrics/mAP50-95({x})"]) < 1e-3
        assert abs(stats[iou_type][1] - metrics[f"metrics/mAP50({x})"]) < 1e-3
    assert len(gt.getImgIds()) == len(list((shapes / "segment" / "images" / "val").iterdir()))


def test_predict_masks_at_original_size(trained, shapes):
    best = Path(trained["save_dir"]) / "weights" / "best.pt"
    images = sorted((shapes / "segment" / "images" / "val").iterdir())[:3]
    results = vistrain.predict(best, [str(p) for p in images], conf=0.001, max_det=20, name="pred", save=True,
                               project=str(Path(trained["save_dir"]).parent))
    assert len(results) == 3
    for r in results:
        h, w = r.orig_shape
        assert r.boxes.shape[1] == 6 and r.masks.dtype == torch.bool and r.masks.shape == (len(r.boxes), h, w)
        for box, mask in zip(r.boxes, r.masks):  # every mask pixel lies inside its box
            ys, xs = np.nonzero(mask.numpy())
            if len(xs):
                assert xs.min() >= int(box[0]) - 1 and xs.max() <= box[2] + 1
                assert ys.min() >= int(box[1]) - 1 and ys.max() <= box[3] + 1
    assert any(r.masks.any() for r in results)
    out = Path(results[0].extra["save_dir"])
    assert (out / f"{images[0].stem}.jpg").is_file()
    record = json.loads((out / "predictions.json").read_text())[0]
    assert record["detections"] and "segmentation" in record["detections"][0]
    rows = [line.split() for r in results for line in
            (out / "labels" / f"{Path(r.path).stem}.txt").read_text().splitlines()]
    assert rows and all(len(row) % 2 == 0 and len(row) >= 8 for row in rows)  # cls, >= 3 points, conf


def test_box_only_dataset_refused_with_the_first_file(shapes, tmp_path):
    p = subprocess.run([sys.executable, "-m", "vistrain", "train", "model=yolov8n-seg",
                        f"data={shapes / 'detect' / 'data.yaml'}", "epochs=1", "imgsz=64", "workers=0"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    msg = p.stderr + p.stdout
    assert "Traceback" not in msg and "polygon" in msg and str(shapes / "detect" / "labels") in msg


def test_val_skips_only_masks_that_cannot_meet_a_ground_truth(trained, monkeypatch):
    """The wiring: validation without save_json leaves empty the masks whose box shares no pixel with any
    ground-truth mask's bounding box, with save_json it makes every mask, and the metrics are the same.  (This
    2-epoch model's masks hardly overlap anything; that a left-out mask cannot change a metric is shown by
    the next test.)"""
    from vistrain.ops import masks as masks_module

    counted = {"skipped": 0, "masks": 0}
    real = masks_module.masks_from_protos

    def spy(coef, *args, only=None, **kwargs):
        counted["masks"] += len(coef)
        counted["skipped"] += 0 if only is None else int((~np.asarray(only, bool)).sum())
        return real(coef, *args, only=only, **kwargs)

    monkeypatch.setattr(masks_module, "masks_from_protos", spy)
    best = Path(trained["save_dir"]) / "weights" / "best.pt"
    kw = dict(model=str(best), workers=0, conf=0.001, plots=False, project=str(Path(trained["save_dir"]).parent),
              exist_ok=True)
    every = vistrain.val(save_json=True, name="val-every-mask", **kw)
    assert counted["skipped"] == 0 and counted["masks"] > 0
    some = vistrain.val(save_json=False, name="val-some-masks", **kw)
    assert 0 < counted["skipped"] < counted["masks"]
    keys = [k for k in every if k.startswith("metrics/")]
    assert len(keys) == 8 and {k: every[k] for k in keys} == {k: some[k] for k in keys}


def test_masks_left_out_of_validation_have_no_overlap_with_any_ground_truth():
    """touches_masks (which masks validation computes) against pycocotools' mask IoU: a box it leaves out,
    filled completely, overlaps no ground-truth mask, including boxes that end exactly at a mask's edge."""
    from pycocotools import mask as mask_utils

    from vistrain.metrics.detect import mask_iou, to_rles
    from vistrain.ops.masks import box_pixels
    from vistrain.tasks.segment import polygon_rles, touches_masks

    rng = np.random.default_rng(3)
    h, w = 60, 80
    left_out = kept_overlapping = 0
    for _ in range(40):
        centre = rng.uniform([5, 5], [w - 5, h - 5], (3, 1, 2))
        polygons = list(centre + rng.uniform(-12, 12, (3, int(rng.integers(3, 7)), 2)))
        gt = polygon_rles(polygons, h, w)
        gx, gy, gw, gh = np.asarray(mask_utils.toBbox(gt)).T
        boxes = rng.uniform(-10, 90, (30, 2))
        boxes = np.concatenate((boxes, boxes + rng.uniform(0, 30, (30, 2))), 1)[:, [0, 1, 2, 3]]
        k = rng.integers(0, len(gt), 6)  # boxes against a mask's right / left edge, just touching or not
        edge = np.stack([gx[k] + gw[k] + np.array([0, 0, -0.99, -1.0, 0, 0]), gy[k], gx[k] + gw[k] + 5, gy[k] + gh[k]], 1)
        edge[4:, 0], edge[4:, 2] = gx[k[4:]] - 5, gx[k[4:]] + np.array([0.0, 0.01])
        boxes = torch.tensor(np.concatenate((boxes, edge)), dtype=torch.float32)
        px = box_pixels(boxes, h, w)
        masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for i, (c0, r0, c1, r1) in enumerate(px.tolist()):
            masks[i, r0:max(r0, r1), c0:max(c0, c1)] = True
        iou = mask_iou(to_rles(masks), gt)
        touch = touches_masks(boxes, gt, h, w)
        assert (iou[~touch] == 0).all()
        left_out += int((~touch).sum())
        kept_overlapping += int((iou[touch].max(1) > 0).sum())
    assert left_out > 100 and kept_overlapping > 100


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    """yolov8n-seg fitted to 8 images (validated on the same 8): 30 epochs of batch 2, no augmentation, no EMA,
    AdamW lr 0.002: confident detections and masks (the 2-epoch ``trained`` has nearly none)."""
    import yaml

    root = make_dataset(tmp_path_factory.mktemp("fit"), n=10, imgsz=96, seed=0, workers=1)
    data = root / "segment" / "fit.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "segment"), "train": "images/train", "val": "images/train",
                                    "names": yaml.safe_load((root / "segment" / "data.yaml").read_text())["names"]}))
    res = vistrain.train(model="yolov8n-seg", data=str(data), imgsz=96, epochs=30, batch=2, nbs=2, workers=0,
                         augment=False, mosaic=0.0, optimizer="AdamW", lr0=0.002, warmup_epochs=2, ema=False,
                         patience=0, plots=False, project=str(tmp_path_factory.mktemp("runs")), name="fit", seed=0,
                         verbose=False)
    return {**res, "root": root}


def test_exported_segmenter_validates_and_predicts_like_the_checkpoint(fitted, tmp_path):
    """The fitted yolov8n-seg exported with dynamic=True to ONNX, TorchScript (and OpenVINO where installed), each
    without and with nms=True: val gives the checkpoint's box and mask mAP50-95 (within 0.001); predict (3 images
    a batch) gives its boxes (within 1e-3 px), classes and masks (IoU >= 0.999), on square images and on 96 x 64
    crops, which the checkpoint and the dynamic exports both letterbox to 96 x 64 rather than 96 x 96."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is a dev extra")
    from PIL import Image

    best = Path(fitted["save_dir"]) / "weights" / "best.pt"
    formats = export_formats()
    images = [str(p) for p in sorted((fitted["root"] / "segment" / "images" / "train").iterdir())[:4]]
    for i, p in enumerate(images[:2]):  # wide crops: a rectangular letterbox
        Image.open(p).crop((0, 16, 96, 80)).save(tmp_path / f"wide{i}.png")
        images.append(str(tmp_path / f"wide{i}.png"))
    kw = {"project": str(tmp_path), "verbose": False, "conf": 0.01, "max_det": 30}  # nms=True files keep these
    metrics = ("metrics/mAP50-95(B)", "metrics/mAP50-95(M)")
    want_val = vistrain.val(model=str(best), workers=0, plots=False, name="v", **kw)
    want = vistrain.predict(str(best), images, name="p", **kw)
    assert want_val[metrics[1]] > 0 and sum(len(r.boxes) for r in want) >= 3
    assert any(r.masks.any() for r in want) and all(r.orig_shape == (64, 96) for r in want[-2:])
    for fmt in formats:
        for nms in (False, True):
            path = vistrain.export(model=str(best), format=fmt, dynamic=True, nms=nms, **kw)
            got_val = vistrain.val(model=str(path), workers=0, plots=False, name=f"v{fmt}{nms}", **kw)
            for k in metrics:
                assert abs(got_val[k] - want_val[k]) <= 1e-3, (fmt, nms, k, got_val[k], want_val[k])
            got = vistrain.predict(str(path), images, name=f"p{fmt}{nms}", batch=3, **kw)
            for g, r in zip(got, want):
                assert len(g.boxes) == len(r.boxes), (fmt, nms)
                if not len(r.boxes):
                    continue
                assert float((g.boxes[:, :4] - r.boxes[:, :4]).abs().max()) <= 1e-3, (fmt, nms)
                assert torch.equal(g.boxes[:, 5], r.boxes[:, 5]), (fmt, nms)
                inter = (g.masks.data & r.masks.data).flatten(1).sum(1)
                union = (g.masks.data | r.masks.data).flatten(1).sum(1)
                assert bool((union == 0).logical_or(inter >= 0.999 * union).all()), (fmt, nms)
