"""The vistrain side of ``bench/segment.py`` alone, for A/B runs of a change to vistrain: train yolov8n-seg from
scratch on the bench's data with the bench's settings, then score the ``best`` weights' ``vistrain val
save_json=True`` predictions with pycocotools (box and mask mAP50-95, the ``val`` pipeline of ``segment.py``).

    .venv/bin/python bench/segment_vistrain.py SEED [--epochs 24 --nbs 16 --device 0 ...]
    .venv/bin/python bench/segment_vistrain.py SEED --epochs 24 --nbs 16 --mosaic-buffer   # mosaic partners from
        # ultralytics' image buffer instead of the whole dataset (the A/B in bench/README.md)

One line starting ``RESULT`` per run.  Several seeds side by side on a GPU machine: one process per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment import cocoeval, quiet  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("seed", type=int)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--nbs", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mosaic-buffer", action="store_true",
                   help="mosaic partners drawn from the image buffer, not from the whole dataset (mosaic_buffer=true)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="vistrain-bench-seg-"))
    os.environ["VISTRAIN_CACHE"] = str(tmp / "vistrain-cache")
    import vistrain
    from vistrain.config import get_config
    from vistrain.data.synthetic import make_dataset
    from vistrain.engine.trainer import Trainer

    torch.set_num_threads(args.threads)
    data = str(make_dataset(tmp / "data", n=args.n, imgsz=args.imgsz, seed=0) / "segment" / "data.yaml")
    overrides = dict(model="yolov8n-seg", data=data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                     workers=args.workers, device=args.device, seed=args.seed, deterministic=False, nbs=args.nbs,
                     project=str(tmp), name="vistrain", exist_ok=True, plots=False,
                     mosaic_buffer=args.mosaic_buffer)
    cfg = get_config(overrides)
    cfg["_user_keys"] = sorted(overrides)
    t0 = time.time()
    with quiet(False):
        best = Path(Trainer(cfg).train()["save_dir"]) / "weights" / "best.pt"
        res = vistrain.val(model=str(best), data=data, save_json=True, conf=0.001, iou=0.7, device=args.device,
                           imgsz=args.imgsz, batch=args.batch, workers=args.workers, project=str(tmp), name="val",
                           exist_ok=True)
    out = Path(res["save_dir"])
    s = cocoeval(out / "annotations.json", json.loads((out / "predictions.json").read_text()))
    losses = {k: round(float(v), 4) for k, v in res.items() if k.startswith("val/")}
    tag = " mosaic-buffer" if args.mosaic_buffer else ""
    print(f"RESULT seed {args.seed}{tag} box {s['mAP50-95(B)']:.4f} mask {s['mAP50-95(M)']:.4f} box50 {s['mAP50(B)']:.4f} "
          f"mask50 {s['mAP50(M)']:.4f} wall {time.time() - t0:.0f} s losses {losses}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
