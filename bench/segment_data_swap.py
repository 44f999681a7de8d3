"""Diagnosis, not a benchmark: vistrain's Trainer fed with ultralytics' training batches.

``bench/segment.py`` compares whole pipelines.  When their accuracy differs, this script tells the data
side from the training side: it trains yolov8n-seg with vistrain's Trainer (model, loss, optimizer,
schedule, EMA, validation: all vistrain) on batches made by ultralytics' own segment dataset and
dataloader (mosaic closed, as both sides run in bench/segment.py's 10-epoch setting), and prints
vistrain's validation mAP50-95 (box, mask) for each seed, next to the same run on vistrain's batches.

    .venv/bin/python bench/segment_data_swap.py --seeds 0,3       # ~8 min per seed and pipeline, 2 cores
    .venv/bin/python bench/segment_data_swap.py --seeds 0,1,2 --batches ultralytics   # only ultralytics' batches
    .venv/bin/python bench/segment_data_swap.py --quick            # smoke run (60 images, 1 epoch, 128 px)
    .venv/bin/python bench/segment_data_swap.py --stop-after 2     # the first 2 epochs only, validation losses by epoch

Two more arms split the pipeline further (``--batches``, comma-separated, any of the four):

- ``ultralytics-dataset``: ultralytics' dataset (its transforms and its draws: Python's ``random`` for the geometry
  and flips, numpy's global generator for HSV) in vistrain's DataLoader (its seeding, persistent workers);
- ``vistrain-python-random``: vistrain's dataset and DataLoader, its draws taken from Python's ``random`` (seeded per
  worker as both libraries seed it) instead of a numpy Generator.

And two arms that each change one convention of vistrain's dataset to ultralytics' (see ``convention``):
``vistrain-ultralytics-masks`` (its mask raster) and ``vistrain-pixel-warp`` (its warp on pixel indices).
``--nbs 16`` steps the optimizer every batch (4x the steps of the default 64 in the same time): the runs then reach
box mAP50-95 0.15-0.36 instead of ~0.03.  Each run prints its per-epoch box mAP50-95 too.

Uses so far (box mAP50-95, 320 px, 10 epochs; details in bench/README.md): 2026-11-23, before the 1% area rule
of random_perspective and feeding channels in BGR order: ultralytics' batches 0.0547 / 0.0360 at seeds 0 / 3,
vistrain's 0.0322 / 0.0197.  2026-11-24, after the assigner fix (f267b9b): ultralytics' batches 0.0420 / 0.0393 /
0.0415 at seeds 0 / 1 / 2; vistrain's own batches (bench/segment.py's runs) 0.0240 / 0.0299 / 0.0205.
2026-11-24 (eighth session, vistrain/ as of f9c98d4): ultralytics' batches 0.0473 / 0.0337 at seeds 3 / 4 (vistrain's
own: 0.0297 / 0.0338); ``ultralytics-dataset`` 0.0437 / 0.0256 at seeds 3 / 2; ``vistrain-python-random`` 0.0334 /
0.0283 at seeds 3 / 2.  Ninth session, ``--nbs 16`` (same vistrain/): ``vistrain`` 0.2072 / 0.2081 / 0.1615 at seeds
0 / 1 / 2; ``ultralytics-dataset`` 0.3139 / 0.1370 / 0.3574; ``ultralytics`` 0.3339 at seed 0;
``vistrain-ultralytics-masks`` 0.2049 / 0.2043 / 0.2878; ``vistrain-pixel-warp`` 0.1674 at seed 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import block_internet, quiet  # noqa: E402


class PythonRandom:
    """The calls vistrain.data.augment makes on its ``np.random.Generator``, answered from Python's ``random`` (which
    DataLoader workers seed from torch's per-worker seed, in vistrain as in ultralytics)."""

    @staticmethod
    def _many(fn, size):
        return fn() if size is None else np.array([fn() for _ in range(int(np.prod(size)))]).reshape(size)

    def uniform(self, low=0.0, high=1.0, size=None):
        return self._many(lambda: random.uniform(low, high), size)

    def random(self, size=None):
        return self._many(random.random, size)

    def integers(self, low, high=None, size=None):
        low, high = (0, low) if high is None else (low, high)
        return self._many(lambda: random.randrange(low, high), size)

    def permutation(self, x):
        x = list(x)
        random.shuffle(x)
        return np.array(x)

    def beta(self, a, b):
        return random.betavariate(a, b)


class UltralyticsBatches:
    """ultralytics' dataloader, its batches in vistrain's format (``targets`` = index, class, cx cy w h)."""

    def __init__(self, loader):
        self.loader, self.batch_size, self.generator = loader, loader.batch_size, torch.Generator()

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            n = len(b["img"])
            targets = torch.cat((b["batch_idx"][:, None].float(), b["cls"].view(-1, 1).float(), b["bboxes"].float()), 1)
            yield {"img": b["img"], "targets": targets, "masks": b["masks"], "im_file": list(b["im_file"]),
                   "ori_shape": [tuple(s) for s in b["ori_shape"]], "ratio_pad": [((1.0, 1.0), (0.0, 0.0))] * n,
                   "ori_labels": [None] * n}


ARMS = ("ultralytics", "vistrain", "ultralytics-dataset", "vistrain-python-random", "vistrain-ultralytics-masks",
        "vistrain-pixel-warp")


@contextlib.contextmanager
def convention(batches: str):
    """The arms that change one convention of vistrain's dataset to ultralytics' (patched before the workers fork):

    - ``vistrain-ultralytics-masks``: training masks rasterised by ultralytics' ``polygons2masks_overlap`` (vertices
      truncated to integers, filled at full size, resized bilinearly; instances ordered by mask area);
    - ``vistrain-pixel-warp``: the warp applied to pixel indices, as ultralytics does (no half-pixel correction, so
      the image moves by 0.5 x (1 - zoom) px against its labels)."""
    import vistrain.data.augment as A

    saved = {"instance_masks": A.instance_masks, "_shift_half_pixel": A._shift_half_pixel}
    if batches == "vistrain-ultralytics-masks":
        from ultralytics.data.utils import polygons2masks_overlap

        def instance_masks(inst, shape, ratio=4, overlap=True):
            assert overlap, "this arm stands in for the overlap masks only"
            polys = [np.asarray(s, np.float32) for s in inst.segments]
            if not polys:
                return np.zeros((shape[0] // ratio, shape[1] // ratio), np.uint8), inst
            masks, index = polygons2masks_overlap(tuple(shape), polys, downsample_ratio=ratio)
            return masks, inst.select(index)

        A.instance_masks = instance_masks
    elif batches == "vistrain-pixel-warp":
        A._shift_half_pixel = lambda matrix: np.asarray(matrix, dtype=np.float64)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(A, k, v)


def train(data_yaml: Path, seed: int, batches: str, project: Path, args) -> dict:
    from vistrain.config import get_config
    from vistrain.engine.trainer import Trainer

    class SwapTrainer(Trainer):
        def make_train_loader(self):
            if batches in ("vistrain", "vistrain-ultralytics-masks", "vistrain-pixel-warp"):
                return super().make_train_loader()
            if batches == "vistrain-python-random":
                from vistrain.data.detect import DetectDataset

                DetectDataset.sample_rng = lambda self, index, epoch: PythonRandom()  # before the workers fork
                return super().make_train_loader()
            from ultralytics.cfg import get_cfg
            from ultralytics.data.build import build_dataloader, build_yolo_dataset
            from ultralytics.data.utils import check_det_dataset

            cfg = get_cfg(overrides=dict(task="segment", imgsz=self.cfg["imgsz"], batch=self.cfg["batch"], seed=seed))
            data = check_det_dataset(str(data_yaml))
            ds = build_yolo_dataset(cfg, data["train"], self.cfg["batch"], data, mode="train", stride=32)
            if args.epochs <= 10:  # close_mosaic 10: ultralytics trains these runs without mosaic
                ds.close_mosaic(cfg)
            if batches == "ultralytics-dataset":  # in vistrain's loader, which the trainer re-seeds every epoch
                from vistrain.engine.validator import make_loader

                task = type("UltralyticsCollate", (), {"collate_fn": staticmethod(ds.collate_fn)})
                loader = make_loader(ds, task, self.cfg["batch"], self.cfg["workers"], shuffle=True, seed=seed)
                wrapped = UltralyticsBatches(loader)
                wrapped.generator = loader.generator
                return wrapped
            torch.manual_seed(seed)
            return UltralyticsBatches(build_dataloader(ds, self.cfg["batch"], self.cfg["workers"], shuffle=True,
                                                       device="cpu"))

    overrides = dict(model="yolov8n-seg", data=str(data_yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                     workers=args.workers, device="cpu", seed=seed, deterministic=False, project=str(project),
                     name=f"{batches}-seed{seed}", exist_ok=True, plots=False)
    if args.nbs:
        overrides["nbs"] = args.nbs
    cfg = get_config(overrides)
    cfg["_user_keys"] = sorted(overrides)
    torch.set_num_threads(args.threads)
    trainer = SwapTrainer(cfg)
    if args.stop_after:  # the first epochs of the --epochs schedule only

        def stop(tr):
            tr.stop = tr.stop or tr.epoch + 1 >= args.stop_after

        trainer.add_callback("on_epoch_end", stop)
    with quiet(args.show_progress), convention(batches):
        res = trainer.train()
    curve, losses = [], []  # box mAP50-95 and the validation losses of vistrain's validation after each epoch
    with open(Path(res["save_dir"]) / "results.csv") as f:
        for row in csv.DictReader(f):
            curve.append(round(float(row["metrics/mAP50-95(B)"]), 4))
            losses.append({k.split("/")[1]: round(float(v), 4) for k, v in row.items() if k.startswith("val/")})
    return {**{k: float(v) for k, v in res.items() if "mAP50-95" in k}, "curve": curve, "val_losses": losses}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--nbs", type=int, default=None, help="nominal batch size (default vistrain's 64)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0])
    p.add_argument("--batches", default="ultralytics,vistrain",
                   help="which pipelines' batches to train on, comma-separated (default both)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many epochs of the --epochs schedule (every run prints its validation "
                        "losses by epoch; after 1-2 epochs, before learning takes off, they do not separate the "
                        "pipelines)")
    p.add_argument("--show-progress", action="store_true")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    unknown = sorted(set(args.batches.split(",")) - set(ARMS))
    if unknown:
        raise SystemExit(f"--batches {','.join(unknown)}: not one of {', '.join(ARMS)}")
    if args.quick:
        args.n, args.epochs, args.imgsz, args.seeds = 60, 1, 128, args.seeds[:1]
    with tempfile.TemporaryDirectory(prefix="vistrain-swap-") as tmp:
        tmp = Path(tmp)
        os.environ.update(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(tmp / "ultralytics-config"),
                          VISTRAIN_CACHE=str(tmp / "vistrain-cache"))
        block_internet()
        from vistrain.data.synthetic import make_dataset

        root = make_dataset(tmp / "data", n=args.n, imgsz=args.imgsz, seed=0)
        for seed in args.seeds:
            for batches in args.batches.split(","):
                res = train(root / "segment" / "data.yaml", seed, batches, tmp / "runs", args)
                curve, losses = res.pop("curve"), res.pop("val_losses")
                print(f"seed {seed}: vistrain trainer on {batches:<11} batches: " + json.dumps(
                    {k.split("/")[-1]: round(v, 4) for k, v in res.items()}) + f"; box mAP50-95 by epoch {curve}",
                    flush=True)
                print(f"seed {seed}: {batches}: validation losses by epoch " + json.dumps(losses), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
