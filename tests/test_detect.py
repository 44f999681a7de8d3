"""Detection end to end on a tiny generated dataset: train, run folder, val save_json vs pycocotools, predict."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import vistrain
from vistrain.data.synthetic import make_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), n=40, imgsz=96, seed=1, workers=1)


@pytest.fixture(scope="module", params=["yolov5n", "yolov8n"])
def trained(request, shapes, tmp_path_factory) -> dict:
    """A 2-epoch run of an anchor-based (YOLOv5) and of an anchor-free (YOLOv8) detector."""
    project = tmp_path_factory.mktemp("runs")
    return vistrain.train(model=request.param, data=str(shapes / "detect" / "data.yaml"), imgsz=96, epochs=2, batch=8,
                          workers=0, project=str(project), name="det", close_mosaic=1, warmup_epochs=0.5,
                          seed=0, verbose=False)


def test_detect_run_folder(trained):
    run = Path(trained["save_dir"])
    for f in ("args.yaml", "results.csv", "results.png", "weights/best.pt", "weights/last.pt", "labels.jpg",
              "train_batch0.jpg", "val_batch0_labels.jpg", "val_batch0_pred.jpg", "PR_curve.png", "F1_curve.png",
              "confusion_matrix.png"):
        assert (run / f).is_file(), f
    header = (run / "results.csv").read_text().splitlines()[0]
    v5 = yaml.safe_load((run / "args.yaml").read_text())["model"] == "yolov5n"
    losses = ("box_loss", "obj_loss", "cls_loss") if v5 else ("box_loss", "cls_loss", "dfl_loss")
    for key in (*(f"train/{n}" for n in losses), "metrics/mAP50(B)", "metrics/mAP50-95(B)"):
        assert key in header
    ckpt = torch.load(run / "weights" / "last.pt", weights_only=True)
    assert ckpt["task"] == "detect" and ("autoanchor" in ckpt["task_state"]) == v5
    assert 0.0 <= trained["metrics/mAP50-95(B)"] <= trained["metrics/mAP50(B)"] <= 1.0


def test_training_validates_in_double_batches_that_val_reproduces(trained, shapes):
    """As ultralytics, validation during training runs in batches of 2 x batch (8 here); ``vistrain val`` of the
    last epoch's weights at that batch gives the losses and mAP the run logged for that epoch, and in smaller
    batches (other rectangular batches, each padded to its own shape; the loss normalised per batch) others."""
    import csv

    run = Path(trained["save_dir"])
    last = list(csv.DictReader((run / "results.csv").open()))[-1]
    data = str(shapes / "detect" / "data.yaml")
    with contextlib.redirect_stdout(io.StringIO()):
        res = {b: vistrain.val(model=str(run / "weights" / "last.pt"), data=data, imgsz=96, batch=b, workers=0,
                               project=str(run.parent), name=f"val-b{b}", exist_ok=True, plots=False, verbose=False)
               for b in (16, 2)}
    keys = [k for k in last if k.startswith("val/")] + ["metrics/mAP50(B)", "metrics/mAP50-95(B)"]
    assert len(keys) == 5
    for k in keys:
        assert res[16][k] == pytest.approx(float(last[k]), rel=1e-4, abs=1e-6), k
    assert any(abs(res[2][k] - float(last[k])) > 1e-3 * abs(float(last[k])) for k in keys if k.startswith("val/"))


def test_val_save_json_matches_pycocotools(trained, shapes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    best = Path(trained["save_dir"]) / "weights" / "best.pt"
    res = vistrain.val(model=str(best), save_json=True, name="val", project=str(Path(trained["save_dir"]).parent),
                       workers=0, conf=0.001)
    out = Path(res["save_dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert preds, "an untrained model still gives low-confidence boxes at conf=0.001"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "annotations.json"))
        dt = gt.loadRes(str(out / "predictions.json"))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert abs(ev.stats[0] - metrics["metrics/mAP50-95(B)"]) < 1e-3
    assert abs(ev.stats[1] - metrics["metrics/mAP50(B)"]) < 1e-3
    n_val = len(list((shapes / "detect" / "images" / "val").iterdir()))
    assert len(gt.getImgIds()) == n_val


def test_predict_boxes_in_original_pixels(trained, shapes):
    best = Path(trained["save_dir"]) / "weights" / "best.pt"
    images = sorted((shapes / "detect" / "images" / "val").iterdir())[:3]
    results = vistrain.predict(best, [str(p) for p in images], conf=0.001, max_det=50, name="pred", save=True,
                               project=str(Path(trained["save_dir"]).parent))
    assert len(results) == 3
    for r in results:
        assert r.boxes.shape[1] == 6 and len(r.boxes) <= 50
        h, w = r.orig_shape
        assert (r.boxes[:, [0, 2]] >= 0).all() and (r.boxes[:, [0, 2]] <= w).all()
        assert (r.boxes[:, [1, 3]] >= 0).all() and (r.boxes[:, [1, 3]] <= h).all()
    out = Path(results[0].extra["save_dir"])
    assert (out / "predictions.json").is_file() and (out / "labels" / f"{images[0].stem}.txt").is_file()
    assert (out / f"{images[0].stem}.jpg").is_file()
    rows = (out / "labels" / f"{images[0].stem}.txt").read_text().splitlines()
    assert len(rows) == len(results[0].boxes) and all(len(r.split()) == 6 for r in rows)


def test_resume_detect_continues_next_epoch(trained):
    last = Path(trained["save_dir"]) / "weights" / "last.pt"
    res = vistrain.train(resume=str(last), epochs=3, verbose=False)
    assert res["epochs_done"] == 3 and res["save_dir"] == trained["save_dir"]
    rows = (Path(trained["save_dir"]) / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 2


def test_bad_data_yaml_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "d.yaml"
    bad.write_text("train: images/train\nval: images/val\nnames: [a, b]\n")
    p = subprocess.run([sys.executable, "-m", "vistrain", "train", "model=yolov5n", f"data={bad}", "epochs=1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "images/train does not exist" in p.stderr + p.stdout


def test_predict_video_frames(trained, shapes, tmp_path):
    import cv2
    import numpy as np
    from PIL import Image

    video = tmp_path / "clip.mp4"
    paths = sorted((shapes / "detect" / "images" / "val").iterdir())[:3]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (w, h))
    for f in frames:
        writer.write(f[:, :, ::-1].copy())
    writer.release()
    best = Path(trained["save_dir"]) / "weights" / "best.pt"
    results = vistrain.predict(best, str(video), conf=0.001, name="vid", project=str(tmp_path / "runs"), save=True)
    assert [r.extra["frame"] for r in results] == [0, 1, 2]
    assert all(r.orig_shape == (h, w) and r.boxes.shape[1] == 6 for r in results)
    out = Path(results[0].extra["save_dir"])
    assert (out / "clip.mp4").stat().st_size > 0 and (out / "labels" / "clip_2.txt").is_file()


def test_augmented_batches_reproducible_across_runs(shapes):
    """The augmentation RNG comes from the seeded loader, so the same seed gives the same batches."""
    from vistrain.data.detect import DetectDataset
    from vistrain.data.yolo import list_split_images, load_data_yaml, scan_split

    data = load_data_yaml(shapes / "detect" / "data.yaml")
    labels, _ = scan_split(list_split_images(data, "train"), data["nc"], workers=1)

    def first_batch():
        ds = DetectDataset(labels.items, 96, augment=True, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=list,
                                             generator=torch.Generator().manual_seed(0))
        return next(iter(loader))

    a, b = first_batch(), first_batch()
    assert all(torch.equal(x["img"], y["img"]) and torch.equal(x["bboxes"], y["bboxes"]) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["detect", "segment"])
def test_mosaic_image_buffer_one_decode_per_sample_and_partners_from_it(shapes, monkeypatch, kind):
    """With mosaic, as ultralytics: each process keeps the images it decoded last (8 batches' worth) and a mosaic
    draws its other three images from them, so a sample costs about one decode, not four; the buffered arrays
    are shared and so must come out of any number of samples (mixup, flips, partial mosaic) unchanged."""
    import vistrain.data.detect as D
    from vistrain.data.yolo import list_split_images, load_data_yaml, scan_split

    data = load_data_yaml(shapes / kind / "data.yaml")
    labels, _ = scan_split(list_split_images(data, "train"), data["nc"], workers=1)
    decoded, used = [], []
    real_decode = D.load_rgb_array
    monkeypatch.setattr(D, "load_rgb_array", lambda p: decoded.append(p) or real_decode(p))
    hyp = {"mosaic": 0.7, "mixup": 0.3, "flipud": 0.5, "hsv_h": 0.02}
    ds = D.DetectDataset(labels.items, 96, augment=True, hyp=hyp, batch_size=1, seed=0, masks=kind == "segment",
                         mosaic_buffer=True)
    assert ds.buffer_size == min(len(ds), 8)
    real_load = ds.load
    monkeypatch.setattr(ds, "load", lambda i: used.append((i, list(ds.buffer))) or real_load(i))
    for i in range(40):
        ds[i % len(ds)]
    assert len(ds.buffer) == ds.buffer_size
    assert len(decoded) <= 40 * 1.5  # main images (and mixup's), not every mosaic partner
    misses = [i for i, held in used if i not in held]
    assert len(misses) == len(decoded) and len(used) > 2 * len(decoded)  # partners came from the buffer
    for i, (img, inst, _) in ds.buffer.items():  # each used many times since it was decoded
        img0, inst0, _ = ds._decode(i)
        assert np.array_equal(img, img0) and np.array_equal(inst.boxes, inst0.boxes)
        assert len(inst.segments) == len(inst0.segments) == (len(inst0) if kind == "segment" else 0)
        assert all(np.array_equal(a, b) for a, b in zip(inst.segments, inst0.segments))
    ds.close_mosaic()
    assert ds.buffer_size == 0 and not ds.buffer


def test_mosaic_partners_from_the_whole_dataset_by_default(shapes, monkeypatch):
    """Without ``mosaic_buffer`` (the default) a mosaic's other three images are drawn from the whole dataset, as
    in YOLOv5, not from the images decoded last; the setting reaches the training dataset from the config."""
    import vistrain.data.detect as D
    from vistrain.config import get_config
    from vistrain.data.yolo import list_split_images, load_data_yaml, scan_split
    from vistrain.tasks.base import get_task

    data = load_data_yaml(shapes / "detect" / "data.yaml")
    labels, _ = scan_split(list_split_images(data, "train"), data["nc"], workers=1)
    ds = D.DetectDataset(labels.items, 96, augment=True, hyp={"mosaic": 1.0}, batch_size=1, seed=0)
    assert ds.buffer_size == 0 and len(ds) > 16
    loads = []
    real_load = ds.load
    monkeypatch.setattr(ds, "load", lambda i: loads.append(i) or real_load(i))
    mains, far = [], 0
    for i in range(40):
        del loads[:]
        ds[i % len(ds)]
        partners = [j for j in loads if j != i % len(ds)]
        far += sum(j not in mains[-8:] for j in partners)  # outside what a buffer of 8 would hold
        mains.append(i % len(ds))
    assert far > 40  # of ~120 partners, ~ (1 - 8 / len) of them with the whole dataset, none with a buffer
    assert not ds.buffer

    for on in (False, True):
        cfg = get_config({"model": "yolov8n", "data": str(shapes / "detect" / "data.yaml"), "imgsz": 96,
                          "batch": 2, "workers": 0, "mosaic_buffer": on})
        train = get_task("detect").build_data(cfg).train
        assert train.buffer_size == (min(len(train), 16) if on else 0)
