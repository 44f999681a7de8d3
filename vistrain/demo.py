"""``make demo``: the main job on the built-in dataset, end to end.

    python -m vistrain.demo            # instance segmentation: YOLOv8n-seg on the built-in shapes (the default)
    python -m vistrain.demo detect     # detection: YOLOv5n on the built-in shapes
    python -m vistrain.demo classify   # classification: yolov5n-cls on the built-in shapes
    python -m vistrain.demo efficientdet  # EfficientDet-D0 on the built-in Pascal VOC copy, backbone frozen first

Writes the synthetic shapes dataset (once), trains on it, validates the best checkpoint, predicts a
few images, and prints the run folder, the final metric and where the annotated images are.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import vistrain
from vistrain.data.synthetic import ensure_dataset


def classify(root: Path, t0: float) -> None:
    # nbs=32: one optimizer step per batch of 32 (the default nbs=64 would accumulate two)
    results = vistrain.train(model="yolov5n-cls", imgsz=64, epochs=12, batch=32, nbs=32, workers=2, name="demo")
    run = results["save_dir"]
    best = f"{run}/weights/best.pt"
    metrics = vistrain.val(model=best, name="demo-val")
    val_dir = root / "classify" / "val"
    samples = [next(d.iterdir()) for d in sorted(val_dir.iterdir()) if d.is_dir()][:6]
    preds = vistrain.predict(best, [str(p) for p in samples], name="demo-predict", save=True)
    correct = sum(r.top1[0] == p.parent.name for r, p in zip(preds, samples))
    print(f"\n[demo] run folder: {run}")
    print(f"[demo] predictions: {preds[0].extra['save_dir']} ({correct}/{len(samples)} sample images right)")
    print(f"[demo] final top-1 on the built-in validation split: {metrics['metrics/accuracy_top1']:.3f}")


def detect(root: Path, t0: float) -> None:
    results = vistrain.train(model="yolov5n", imgsz=128, epochs=DETECT_EPOCHS, batch=32, workers=2, name="demo",
                             close_mosaic=3)
    run = results["save_dir"]
    best = f"{run}/weights/best.pt"
    metrics = vistrain.val(model=best, name="demo-val", save_json=True)
    samples = sorted((root / "detect" / "images" / "val").iterdir())[:8]
    preds = vistrain.predict(best, [str(p) for p in samples], name="demo-predict", save=True)
    found = sum(len(r.boxes) for r in preds)
    print(f"\n[demo] run folder: {run}")
    print(f"[demo] annotated images: {preds[0].extra['save_dir']} ({found} objects found in {len(samples)} images)")
    print(f"[demo] final mAP50 on the built-in validation split: {metrics['metrics/mAP50(B)']:.3f} "
          f"(mAP50-95 {metrics['metrics/mAP50-95(B)']:.3f})")


def segment(root: Path, t0: float) -> None:
    # A short run's recipe (4 epochs, ~110 s each on 2 CPU cores). optimizer=auto would take AdamW at lr 0.001 with
    # 3 warm-up epochs (ultralytics' choice, made for long runs): the lr would peak at 0.0006 in the third epoch and
    # 5 epochs end at box mAP50 0.25. AdamW at 0.004 after one warm-up epoch, batch 16 with a step per batch
    # (nbs=16: 600 steps), mosaic for 3 epochs and plain images for the last end at box mAP50 0.75.
    results = vistrain.train(model="yolov8n-seg", imgsz=128, epochs=SEGMENT_EPOCHS, batch=16, nbs=16, workers=2,
                             optimizer="AdamW", lr0=0.004, warmup_epochs=1, name="demo", close_mosaic=1)
    run = results["save_dir"]
    best = f"{run}/weights/best.pt"
    metrics = results  # training ends by validating best.pt (the per-class table above): no second pass
    samples = sorted((root / "segment" / "images" / "val").iterdir())[:8]
    preds = vistrain.predict(best, [str(p) for p in samples], name="demo-predict", save=True)
    found = sum(len(r.boxes) for r in preds)
    print(f"\n[demo] run folder: {run}")
    print(f"[demo] images with mask overlays: {preds[0].extra['save_dir']} ({found} objects in {len(samples)} images)")
    print(f"[demo] final box mAP50 {metrics['metrics/mAP50(B)']:.3f} (mAP50-95 {metrics['metrics/mAP50-95(B)']:.3f}), "
          f"mask mAP50 {metrics['metrics/mAP50(M)']:.3f} (mAP50-95 {metrics['metrics/mAP50-95(M)']:.3f}) "
          f"on the built-in validation split")


def efficientdet(root: Path, t0: float) -> None:
    # the tutorial's two phases: the EfficientNet backbone frozen for the first epochs, then every layer trains
    # AdamW at lr 0.004 (optimizer=auto would take 0.001 here, slow for a few epochs); one light loader worker
    # beside two compute threads: the model's step, not the 128 px mosaics, is what takes the time
    results = vistrain.train(model="efficientdet-d0", data=str(root / "voc"), imgsz=128, epochs=EFFDET_EPOCHS,
                             freeze="backbone", freeze_epochs=EFFDET_FROZEN, batch=16, nbs=16, workers=1, threads=2,
                             optimizer="AdamW", lr0=0.004, name="demo-efficientdet", close_mosaic=1)
    run = results["save_dir"]
    best = f"{run}/weights/best.pt"
    metrics = vistrain.val(model=best, name="demo-efficientdet-val")
    samples = sorted((root / "voc" / "JPEGImages").iterdir())[-8:]  # the last images are in the val split
    preds = vistrain.predict(best, [str(p) for p in samples], name="demo-efficientdet-predict", save=True)
    found = sum(len(r.boxes) for r in preds)
    print(f"\n[demo] run folder: {run} (results.csv: the frozen column shows the two phases)")
    print(f"[demo] annotated images: {preds[0].extra['save_dir']} ({found} objects found in {len(samples)} images)")
    print(f"[demo] final box mAP50 {metrics['metrics/mAP50(B)']:.3f} (mAP50-95 {metrics['metrics/mAP50-95(B)']:.3f}, "
          f"VOC AP50 {metrics['metrics/VOC_AP50(B)']:.3f}) on the built-in validation split")


DETECT_EPOCHS = 12
SEGMENT_EPOCHS = 4
EFFDET_EPOCHS, EFFDET_FROZEN = 3, 1  # about 9 minutes on 2 CPU cores (1 frozen epoch ~100 s, unfrozen ~180 s)
JOBS = {"segment": segment, "detect": detect, "classify": classify, "efficientdet": efficientdet}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    job = argv[0] if argv else "segment"
    if job not in JOBS:
        raise SystemExit(f"usage: python -m vistrain.demo [{'|'.join(JOBS)}]")
    t0 = time.time()
    root = ensure_dataset()
    print(f"[demo] built-in dataset: {root} ({time.time() - t0:.1f}s)")
    JOBS[job](root, t0)
    print(f"[demo] total time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
