"""Diagnosis, not a benchmark: vistrain's YOLOv8-seg loss against ultralytics' on real training batches.

The loss tests compare the two on small random cases.  This script compares them where training
happens: batches of the built-in data made by ultralytics' own segment dataloader (mosaic closed, as in
``bench/segment.py``'s 10-epoch setting), one model's freshly initialised weights loaded into both
models, and for every batch the four loss terms and the relative difference of the whole gradient
(every parameter).  Equal losses differ by float rounding only (~1e-6).

It found the assigner's tie difference fixed in 6cbbeb4: with vistrain's old top-k rule the mask loss
differed on 9 of 12 batches and the gradients by up to 47%; since then all batches agree to ~2e-6.

    .venv/bin/python bench/segment_grad_check.py              # 12 batches at 320 px (~1 min on 2 cores)
    .venv/bin/python bench/segment_grad_check.py --batches 4 --imgsz 160

Exit status 1 when any batch's gradient differs by more than ``--tol`` (relative, default 1e-4).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import block_internet, quiet  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="vistrain-gradcheck-") as tmp:
        tmp = Path(tmp)
        os.environ.update(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(tmp / "ultralytics-config"))
        block_internet()
        import vistrain
        from vistrain.data.synthetic import make_dataset
        from vistrain.losses.yolov8 import SegmentLoss

        with quiet(False):
            from ultralytics.cfg import get_cfg
            from ultralytics.data.build import build_dataloader, build_yolo_dataset
            from ultralytics.data.utils import check_det_dataset
            from ultralytics.nn.tasks import SegmentationModel

            root = make_dataset(tmp / "data", n=max(40, args.batches * args.batch * 5 // 4), imgsz=args.imgsz)
            cfg = get_cfg(overrides=dict(task="segment", imgsz=args.imgsz, batch=args.batch, seed=args.seed))
            data = check_det_dataset(str(root / "segment" / "data.yaml"))
            ds = build_yolo_dataset(cfg, data["train"], args.batch, data, mode="train", stride=32)
            ds.close_mosaic(cfg)
            random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
            loader = build_dataloader(ds, args.batch, 0, shuffle=True, device="cpu")
            batches = [b for _, b in zip(range(args.batches), loader)]
            torch.manual_seed(args.seed)
            theirs = SegmentationModel("yolov8n-seg.yaml", nc=data["nc"], verbose=False)
        theirs.args = cfg
        ours = vistrain.build_model("yolov8n-seg", num_classes=data["nc"])
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.train(), ours.train()
        loss_fn = SegmentLoss.from_model(ours, {"box": cfg.box, "cls": cfg.cls, "dfl": cfg.dfl,
                                                "overlap_mask": cfg.overlap_mask})
        worst = 0.0
        print(f"{'batch':>5} {'gradient rel. diff':>18}   loss terms box, seg, cls, dfl: ultralytics | vistrain")
        for i, b in enumerate(batches):
            img = b["img"].float() / 255
            theirs.zero_grad(set_to_none=True)
            total, items = theirs.loss({**b, "img": img})
            total.sum().backward()
            g_theirs = {k: q.grad.clone() for k, q in theirs.named_parameters() if q.grad is not None}
            ours.zero_grad(set_to_none=True)
            targets = torch.cat((b["batch_idx"][:, None].float(), b["cls"].view(-1, 1).float(), b["bboxes"].float()), 1)
            total_v, items_v = loss_fn(ours(img), targets, b["masks"])
            total_v.backward()
            g_ours = {k: q.grad for k, q in ours.named_parameters() if q.grad is not None}
            num = sum(float((g_theirs[k] - g_ours.get(k, torch.zeros_like(g_theirs[k]))).norm() ** 2) for k in g_theirs)
            den = sum(float(g.norm() ** 2) for g in g_theirs.values())
            rel = math.sqrt(num / max(den, 1e-30))
            worst = max(worst, rel)
            t = [round(float(v), 5) for v in list(items.values())[:4]]
            print(f"{i:>5} {rel:>18.3g}   {t} | {[round(float(v), 5) for v in items_v]}", flush=True)
    print(f"largest relative gradient difference: {worst:.3g} (tolerance {args.tol:g})")
    return int(worst > args.tol)


if __name__ == "__main__":
    raise SystemExit(main())
