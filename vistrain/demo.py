"""``make demo``: the main job on the built-in dataset, end to end.

Writes the synthetic shapes dataset (once), trains a classifier on it, validates the best
checkpoint, predicts a few images, and prints the run folder and the final top-1.
"""

from __future__ import annotations

import time

import vistrain
from vistrain.data.synthetic import ensure_dataset


def main() -> None:
    t0 = time.time()
    root = ensure_dataset()
    print(f"[demo] built-in dataset: {root} ({time.time() - t0:.1f}s)")
    # nbs=32: one optimizer step per batch of 32 (the default nbs=64 would accumulate two)
    results = vistrain.train(model="yolov5n-cls", imgsz=64, epochs=12, batch=32, nbs=32, workers=2, name="demo")
    run = results["save_dir"]
    best = f"{run}/weights/best.pt"
    metrics = vistrain.val(model=best, name="demo-val")
    val_dir = root / "classify" / "val"
    samples = [next(d.iterdir()) for d in sorted(val_dir.iterdir()) if d.is_dir()][:6]
    preds = vistrain.predict(best, [str(p) for p in samples], name="demo-predict")
    correct = sum(r.top1[0] == p.parent.name for r, p in zip(preds, samples))
    print(f"\n[demo] run folder: {run}")
    print(f"[demo] predictions: {preds[0].extra['save_dir']} ({correct}/{len(samples)} sample images right)")
    print(f"[demo] final top-1 on the built-in validation split: {metrics['metrics/accuracy_top1']:.3f}")
    print(f"[demo] total time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
