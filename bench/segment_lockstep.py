"""Diagnosis, not a benchmark: vistrain's Trainer and ultralytics' trainer in lockstep.

Both trainers start from the same initial weights and consume the same recorded batches (made once by
ultralytics' segment dataloader, mosaic closed as in ``bench/segment.py``), with everything else their
own: loss, assigner, optimizer (optimizer=auto), warmup, accumulation, weight decay, clipping, EMA.  The
script prints, at several optimizer steps, how far apart the two models' parameters are, next to the
same distance between two vistrain runs that differ only in float rounding (channels_last on and off):
with AdamW, whose first steps move every parameter by about lr whatever its gradient's size, rounding
alone separates runs visibly, so only a distance well above that baseline means the trainers differ.

    .venv/bin/python bench/segment_lockstep.py                 # 50 batches (2 epochs) at 320 px, ~6 min
    .venv/bin/python bench/segment_lockstep.py --batches 100   # past warmup's end (batch 75), ~14 min
    .venv/bin/python bench/segment_lockstep.py --batches 10 --imgsz 160

Results (2026-11-24): before 6cbbeb4 (the assigner's tie rule), the first real step already put the two
trainers 73% of a step apart against a 15% rounding baseline; see bench/README.md for the numbers since.
With ``--batches 100`` (past the end of warmup): 102.8% apart after 100 batches against a 101.0% baseline.
"""

from __future__ import annotations

import argparse
import copy
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
from segment_data_swap import UltralyticsBatches  # noqa: E402


class Stop(Exception):
    """Raised from a batch callback once the last snapshot is taken."""


class Replay:
    """Recorded batches as a train loader (fresh copies each time: trainers preprocess them in place)."""

    def __init__(self, batches: list, dataset, per_epoch: int):
        self.batches, self.dataset, self.per_epoch, self.pos = batches, dataset, per_epoch, 0
        self.batch_size, self.num_workers, self.drop_last = len(batches[0]["img"]), 0, False
        self.sampler = range(len(dataset))

    def __len__(self):
        return self.per_epoch

    def __iter__(self):
        start, self.pos = self.pos, self.pos + self.per_epoch
        for b in self.batches[start:start + self.per_epoch]:
            yield {k: v.clone() if torch.is_tensor(v) else copy.copy(v) for k, v in b.items()}

    def reset(self):
        pass


def params_of(model) -> dict:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()
            if v.is_floating_point() and "running" not in k}


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).norm() ** 2) for k in a))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10, help="the schedule's length (the run stops after --batches)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="vistrain-lockstep-") as tmp:
        tmp = Path(tmp)
        os.environ.update(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(tmp / "ultralytics-config"),
                          VISTRAIN_CACHE=str(tmp / "vistrain-cache"))
        block_internet()
        from vistrain.config import get_config
        from vistrain.data.synthetic import make_dataset
        from vistrain.engine.trainer import Trainer

        with quiet(False):
            from ultralytics.cfg import get_cfg
            from ultralytics.data.build import build_dataloader, build_yolo_dataset
            from ultralytics.data.utils import check_det_dataset
            from ultralytics.models.yolo.segment import SegmentationTrainer
            from ultralytics.nn.tasks import SegmentationModel

            root = make_dataset(tmp / "data", n=args.n, imgsz=args.imgsz)
            data_yaml = str(root / "segment" / "data.yaml")
            cfg = get_cfg(overrides=dict(task="segment", imgsz=args.imgsz, batch=args.batch, seed=args.seed))
            data = check_det_dataset(data_yaml)
            ds = build_yolo_dataset(cfg, data["train"], args.batch, data, mode="train", stride=32)
            ds.close_mosaic(cfg)
            random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
            per_epoch = math.ceil(len(ds) / args.batch)
            batches = []
            while len(batches) < args.batches:  # one pass of the loader per epoch
                batches += [b for _, b in zip(range(args.batches - len(batches)),
                                              build_dataloader(ds, args.batch, 0, shuffle=True, device="cpu"))]
            torch.manual_seed(args.seed)
            init = copy.deepcopy(SegmentationModel("yolov8n-seg.yaml", nc=data["nc"], verbose=False).state_dict())
        snaps_at = sorted({0, 1, 3, 7, args.batches - 1} | set(range(per_epoch - 1, args.batches, per_epoch)))  # + epoch ends
        snaps: dict[str, dict[int, dict]] = {}

        def recorder(name: str, model_of):
            snaps[name], count = {}, [0]

            def on_batch_end(trainer):
                ni, count[0] = count[0], count[0] + 1
                if ni in snaps_at:
                    snaps[name][ni] = params_of(model_of(trainer))
                if ni == args.batches - 1:
                    raise Stop
            return on_batch_end

        class UltralyticsSide(SegmentationTrainer):
            def get_model(self, cfg=None, weights=None, verbose=True):
                model = SegmentationModel("yolov8n-seg.yaml", nc=self.data["nc"], verbose=False)
                model.load_state_dict(init)
                return model

            def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
                if mode == "train":
                    return Replay(batches, ds, per_epoch)
                return super().get_dataloader(dataset_path, batch_size, rank, mode)

        ul = UltralyticsSide(overrides=dict(model="yolov8n-seg.yaml", data=data_yaml, epochs=args.epochs,
                                            imgsz=args.imgsz, batch=args.batch, workers=0, device="cpu",
                                            seed=args.seed, deterministic=False, plots=False, val=False,
                                            project=str(tmp / "runs"), name="ultralytics", exist_ok=True))
        ul.add_callback("on_train_batch_end", recorder("ultralytics", lambda t: t.model))

        class VistrainSide(Trainer):
            def make_train_loader(self):
                return UltralyticsBatches(Replay(batches, ds, per_epoch))

            def setup(self):
                super().setup()
                self.model.load_state_dict(init)
                if self.ema:
                    self.ema.ema.load_state_dict(init)

        with quiet(False):
            try:
                ul.train()
            except Stop:
                pass
            for name, channels_last in (("vistrain", True), ("vistrain NCHW", False)):
                over = dict(model="yolov8n-seg", data=data_yaml, epochs=args.epochs, imgsz=args.imgsz,
                            batch=args.batch, workers=0, device="cpu", seed=args.seed, plots=False,
                            channels_last=channels_last, project=str(tmp / "runs"), name=name, exist_ok=True)
                c = get_config(over)
                c["_user_keys"] = sorted(over)
                tr = VistrainSide(c)
                tr.add_callback("on_batch_end", recorder(name, lambda t: t.model))
                try:
                    tr.train()
                except Stop:
                    pass
    start = snaps["ultralytics"][0]  # after the first batch: its step has lr 0, so these are the initial weights
    print(f"{'batch':>5} {'step size':>10} {'ultralytics - vistrain':>24} {'rounding baseline':>18}")
    for ni in snaps_at[1:]:
        moved = distance(snaps["ultralytics"][ni], start)
        d = distance(snaps["ultralytics"][ni], snaps["vistrain"][ni])
        base = distance(snaps["vistrain NCHW"][ni], snaps["vistrain"][ni])
        print(f"{ni:>5} {moved:>10.4g} {d:>12.4g} ({d / moved:6.1%}) {base:>9.4g} ({base / moved:6.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
