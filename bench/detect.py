"""YOLOv5s detection on CPU: vistrain vs. its peers, training throughput and inference latency.

    .venv/bin/python bench/detect.py            # full run: ~7 minutes on 2 cores (plus any wait for quiet)
    .venv/bin/python bench/detect.py --quick    # smoke run: small images, a few steps, < 2 minutes

Everything runs in this one process, on the same machine, in alternating counterbalanced runs; each side
reports its median and the script prints ratios vistrain / peer (higher is better for vistrain; target >= 1.0).

Two peers:

* ``yolov5`` -- the reference package ``yolov5==7.0.14`` (ultralytics/yolov5 v7.0; the Makefile installs it
  with ``--no-deps`` as a test oracle): the same anchor-based model, loss and augmentation as vistrain's
  ``yolov5s``, the like-for-like comparison.  Its ``train()`` runs in-process (``yolov5.train.train(hyp, opt,
  device, callbacks)``).  Its import chain names ``roboflow`` and ``boto3``/``botocore`` (cloud uploads never
  used here); where they are not installed, empty stand-in modules are put in ``sys.modules`` for the import
  and removed afterwards.  Patched in its modules for the run: ``init_seeds`` is called with
  ``deterministic=False`` (its train() hard-codes True; the other sides run False), ``check_font`` and
  ``attempt_download_from_hub`` do nothing (they would reach the network).  Its ``nbs`` is fixed at 64 but its
  warmup (always >= 100 iterations) keeps gradient accumulation at 1 for the first 16 iterations, so in the
  default 3 + 10 steps it steps the optimizer every batch like the other sides.  If it is not importable,
  the benchmark says so and runs without it.
* ``ultralytics`` -- ``YOLO("yolov5s.yaml")`` in ultralytics 8.x builds **YOLOv5u**: the YOLOv5 backbone and
  neck with ultralytics' anchor-free, decoupled, DFL head, trained with the TAL assigner and DFL/CIoU/BCE
  losses.  A bigger model (the script prints both models' parameters and GFLOPs), so those ratios compare two
  frameworks training two related models; the "per GFLOP" and "body" lines help to read them.

1. Training throughput (img/s): batch 16, imgsz 320, 2 dataloader workers, the same temp dataset written by
   ``vistrain.data.synthetic.make_dataset`` (its ``detect/data.yaml`` is read by every side), random init,
   SGD lr 0.01 momentum 0.937 Nesterov weight decay 5e-4, ``nbs`` = batch (an optimizer step every batch), no
   warmup, EMA on and gradient clipping at 10 everywhere (both peers always do both), mosaic 1.0 and the same
   HSV/translate/scale/flip augmentation, mixup off, ``close_mosaic=0`` (with epochs=1 the default 10 would
   turn mosaic off), ``deterministic=False``, AMP off (CPU), no plots, no validation.  A step is the time from
   the end of one batch to the end of the next (data wait, forward, loss, backward, optimizer step, EMA and
   everything else the trainer does per batch), stamped from a callback (vistrain: ``on_batch_end``; the
   peers: ``on_train_batch_end``), which stops the run after the timed steps, so validation and checkpointing
   never run.  vistrain keeps its default ``channels_last=True`` (NHWC convolutions; the peers train NCHW).
   ultralytics on CPU by default forces ``workers=0`` and sets torch to ``cpu_count - 1`` threads;
   the benchmark undoes both (a Trainer subclass restores ``workers``, an ``on_train_start`` callback the
   thread count) so every side runs with the same threads and workers.  ``--peer-defaults`` adds a line with
   ultralytics as shipped on CPU (for information; not in the ratio).  5 runs per side, rotated (A B C,
   C B A, ...); the ratio of the medians is the result, the median of the per-round ratios a check.
2. Inference latency (ms, batch 1, 640x640): one image of the temp dataset letterboxed to 640x640 once, the
   same float tensor on every side; timed: forward of the eval-mode model + box decoding + NMS (conf 0.25,
   iou 0.45, max_det 300), under ``torch.inference_mode``; not timed: image decoding, letterbox, scaling boxes
   back.  vistrain: ``build_model("yolov5s", num_classes=80)`` + ``DetectTask.postprocess`` (``decode_yolov5``
   + ``non_max_suppression``); yolov5: its ``models.yolo.Model`` (its Detect decodes in eval mode) +
   ``utils.general.non_max_suppression``, loaded with vistrain's very weights (the state_dict keys are the
   same), so both see identical candidates; ultralytics: ``DetectionModel("yolov5s.yaml")`` (its head
   decodes) + ``ultralytics.utils.nms.non_max_suppression``.  Random weights: the score logits (objectness
   and class; ultralytics: class) are spread out (the score rows of the output convs scaled) and shifted
   (their biases) so that ``--candidates`` boxes pass conf 0.25 on ultralytics and as many on vistrain
   (the counts are printed), so every NMS call sees the same number of candidates.  No model is Conv+BN
   fused (ultralytics' own predictor fuses; a "fused" information line shows what that does).  Timing is
   round robin: each round runs every model once (order reversed every other round), 6 blocks x 15 rounds
   after 2 warm-up rounds, so slow drifts of the machine's speed hit all sides alike; medians per side,
   and the median of the per-round ratios as a check.  Two more information lines ("body") time
   every layer but the Detect head, i.e. the backbone and neck, which are the same layers with the same
   parameter count in vistrain and ultralytics, run by one executor: the like-for-like part of those two.
3. Data: the per-sample cost of each side's training dataset ``__getitem__`` (mosaic, HSV, warp, flips),
   single-threaded in this process, alternating blocks (information, no target).

Load: as bench/classify.py (whose helpers this script uses): wait for the 1-minute load average to drop below
``--max-load``; every timed run reports the share of the CPUs other processes used, and a run above
``--max-other`` is repeated after waiting (``--retries``).

Offline: ``YOLO_OFFLINE=1``, the peers' settings folders and vistrain's label cache go to the temp dir, and
for the whole run this process refuses internet sockets (AF_INET/AF_INET6 connects and DNS look-ups raise),
so no side can download fonts, weights or data, or call home.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CpuMonitor, StepClock, StopRun, block_internet, cpu_name, load1, quiet,  # noqa: E402
                    run_trainer_steps, wait_for_idle, wait_for_quiet)

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.937, 5e-4
CONF, IOU, MAX_DET = 0.25, 0.45, 300
# augmentation both sides train with (vistrain's and ultralytics' defaults, spelled out)
HYP = {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
       "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "close_mosaic": 0}
PEER_ONLY_HYP = {"cutmix": 0.0, "copy_paste": 0.0}
RESULTS = Path(__file__).resolve().parent / "results" / "detect.json"
QUICK_RESULTS = RESULTS.with_name("detect-quick.json")
V, Y, P, P_SHIPPED = "vistrain", "yolov5", "ultralytics", "ultralytics (CPU defaults)"
YOLOV5 = None  # the reference's train module once imported (import_yolov5)
# yolov5's train() would otherwise start accumulating gradients (its nbs is fixed at 64) after this many steps
YOLOV5_NO_ACCUMULATE_STEPS = 16


def import_yolov5():
    """Import the reference ``yolov5`` package's train module and patch it for an offline, comparable run;
    returns (module, None) or (None, why not)."""
    stand_ins = {"roboflow": [], "roboflow.core": [], "roboflow.core.version": ["Version"],
                 "boto3": [], "botocore": [], "botocore.exceptions": ["NoCredentialsError"]}
    added = []
    missing = {top for top in {n.split(".")[0] for n in stand_ins}
               if top not in sys.modules and importlib.util.find_spec(top) is None}
    for name, attrs in stand_ins.items():
        if name.split(".")[0] in missing:
            mod = types.ModuleType(name)
            for attr in attrs:
                setattr(mod, attr, type(attr, (Exception,), {}))
            mod.Roboflow = type("Roboflow", (), {})
            sys.modules[name] = mod
            added.append(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train = importlib.import_module("yolov5.train")
            general = importlib.import_module("yolov5.utils.general")
    except Exception as e:  # noqa: BLE001 - any failure means: run without this peer
        return None, f"{type(e).__name__}: {e}"
    finally:
        for name in added:
            sys.modules.pop(name, None)
    init_seeds = train.init_seeds
    train.init_seeds = lambda seed=0, deterministic=False: init_seeds(seed, deterministic=False)
    train.attempt_download_from_hub = lambda *a, **k: None  # would ask huggingface.co about weights=""
    general.check_font = lambda *a, **k: None  # would download Arial.ttf
    return train, None


# ---------------------------------------------------------------------------------------------- models
def gflops(model, imgsz: int) -> float:
    """Forward GFLOPs (2 x multiply-adds, torch's FlopCounterMode) of a batch-1 ``imgsz`` image (eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, imgsz, imgsz))
    return counter.get_total_flops() / 1e9


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def yolov5_model(nc: int = 80):
    from yolov5.models.yolo import Model

    with quiet(False):
        return Model(str(Path(YOLOV5.__file__).parent / "models" / "yolov5s.yaml"), ch=3, nc=nc)


def peer_model(nc: int = 80):
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov5s.yaml", nc=nc, verbose=False)


def model_info(nc: int) -> dict:
    import vistrain

    out = {}
    builders = [(V, lambda: vistrain.build_model("yolov5s", num_classes=nc)), (P, lambda: peer_model(nc))]
    if YOLOV5 is not None:
        builders.insert(1, (Y, lambda: yolov5_model(nc)))
    for side, build in builders:
        m = build().eval()
        body = BodyInfer(side, m)
        out[side] = {"params": n_params(m), "gflops_640": gflops(m, 640), "gflops_320": gflops(m, 320),
                     "body_params": sum(n_params(layer) for layer in body.layers),
                     "body_gflops_640": gflops(body, 640)}
    if Y in out:
        out[Y]["model"] = "yolov5==7.0.14 models/yolov5s.yaml: YOLOv5 v7.0, anchor-based Detect head"
    out[V]["model"] = "vistrain yolov5s: YOLOv5 v7.0, anchor-based Detect head (3 anchors x 3 levels)"
    out[P]["model"] = "ultralytics yolov5s.yaml = YOLOv5u: YOLOv5 backbone/neck, anchor-free DFL Detect head"
    return out


# ---------------------------------------------------------------------------------------------- training
def vistrain_cfg(data_yaml: Path, project: Path, args) -> dict:
    from vistrain.config import get_config

    overrides = dict(
        model="yolov5s", data=str(data_yaml), imgsz=args.imgsz, batch=args.batch, workers=args.workers,
        device="cpu", epochs=1, optimizer="SGD", lr0=LR, momentum=MOMENTUM, nesterov=True,
        weight_decay=WEIGHT_DECAY, nbs=args.batch, warmup_epochs=0, ema=True, clip_grad=10.0, amp=False,
        deterministic=False, plots=False, verbose=False, rect=False, project=str(project), name="vistrain",
        exist_ok=True, seed=0, **HYP,
    )
    cfg = get_config(overrides)
    cfg["_user_keys"] = sorted(overrides)
    return cfg


def peer_overrides(data_yaml: Path, project: Path, args) -> dict:
    return dict(
        data=str(data_yaml), imgsz=args.imgsz, batch=args.batch, workers=args.workers, device="cpu", epochs=1,
        optimizer="SGD", lr0=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nbs=args.batch, warmup_epochs=0,
        amp=False, deterministic=False, plots=False, val=False, save=False, verbose=False, rect=False, cache=False,
        project=str(project), name="ultralytics", exist_ok=True, seed=0, pretrained=False, **HYP, **PEER_ONLY_HYP,
    )


def run_vistrain(data_yaml: Path, project: Path, args, may_abort: bool) -> dict:
    torch.set_num_threads(args.threads)
    return run_trainer_steps(vistrain_cfg(data_yaml, project, args), args, may_abort)


def run_peer(data_yaml: Path, project: Path, args, may_abort: bool, shipped: bool = False) -> dict:
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer

    torch.set_num_threads(args.threads)
    workers = args.workers

    class BenchTrainer(DetectionTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            if not shipped:
                self.args.workers = workers  # ultralytics sets workers=0 on CPU

    clock = StepClock(args, may_abort)
    seen, held = {}, []

    def on_train_start(tr) -> None:
        held.append(tr)
        if not shipped:
            torch.set_num_threads(args.threads)  # its select_device set cpu_count - 1 threads

    def on_batch_end(tr) -> None:
        seen["threads"] = torch.get_num_threads()
        seen["workers"] = tr.train_loader.num_workers
        if clock.step_end():
            raise StopRun

    model = YOLO("yolov5s.yaml", task="detect")
    model.add_callback("on_train_start", on_train_start)
    model.add_callback("on_train_batch_end", on_batch_end)
    overrides = peer_overrides(data_yaml, project, args)
    if shipped:
        overrides["name"] += "-shipped"
    try:
        with quiet(args.show_progress):
            model.train(trainer=BenchTrainer, **overrides)
    except StopRun:
        pass
    finally:
        for tr in held:  # its loaders keep worker processes until closed
            for loader in (getattr(tr, "train_loader", None), getattr(tr, "test_loader", None)):
                if hasattr(loader, "close"):
                    loader.close()
        torch.set_num_threads(args.threads)
    if len(clock.stamps) <= args.warmup:
        raise RuntimeError(f"ultralytics ran only {len(clock.stamps)} steps: the training split is too small")
    seen["children"] = len(getattr(clock.cpu, "pids", [0])) - 1
    held.clear()
    del model
    gc.collect()
    return {**clock.result(args.batch), **seen}


def yolov5_hyp() -> dict:
    """The reference's hyp.scratch-low.yaml (its defaults) with this benchmark's optimizer and augmentation."""
    import yaml

    hyp = yaml.safe_load((Path(YOLOV5.__file__).parent / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    hyp.update(lr0=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, warmup_epochs=0.0, copy_paste=0.0,
               **{k: v for k, v in HYP.items() if k in hyp})
    return hyp


def run_yolov5(data_yaml: Path, project: Path, args, may_abort: bool) -> dict:
    from yolov5.utils.callbacks import Callbacks

    torch.set_num_threads(args.threads)
    argv, sys.argv = sys.argv, sys.argv[:1]  # parse_opt reads sys.argv: take its defaults, not our flags
    try:
        opt = YOLOV5.parse_opt(known=True)
    finally:
        sys.argv = argv
    opt.cfg = str(Path(YOLOV5.__file__).parent / "models" / "yolov5s.yaml")
    opt.weights, opt.data, opt.epochs, opt.batch_size, opt.imgsz = "", str(data_yaml), 1, args.batch, args.imgsz
    opt.workers, opt.optimizer, opt.device, opt.seed = args.workers, "SGD", "cpu", 0
    opt.noplots, opt.noval, opt.nosave, opt.exist_ok = True, True, True, True
    opt.project, opt.name = str(project), "yolov5"
    opt.save_dir = str(project / "yolov5")
    callbacks = Callbacks()
    clock = StepClock(args, may_abort)
    seen = {"workers": f"min(cpu_count, batch, {args.workers})"}

    def on_batch_end(*_a, **_k) -> None:
        seen["threads"] = torch.get_num_threads()
        if clock.step_end():
            callbacks.stop_training = True  # train() returns right after this callback

    callbacks.register_action("on_train_batch_end", callback=on_batch_end)
    with quiet(args.show_progress), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.* deprecations, once per batch
        YOLOV5.train(yolov5_hyp(), opt, torch.device("cpu"), callbacks)
    if len(clock.stamps) <= args.warmup:
        raise RuntimeError(f"yolov5 ran only {len(clock.stamps)} steps: the training split is too small")
    seen["children"] = len(getattr(clock.cpu, "pids", [0])) - 1
    gc.collect()  # its loaders' workers end with them
    return {**clock.result(args.batch), **seen}


def bench_training(data_yaml: Path, tmp: Path, args) -> tuple[dict, dict]:
    sides = ([Y] if YOLOV5 is not None else []) + [P, V] + ([P_SHIPPED] if args.peer_defaults else [])
    results: dict[str, list[dict]] = {s: [] for s in sides}
    discarded: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):  # counterbalanced: A B C, C B A, ...
            for attempt in range(args.retries + 1):
                last = attempt == args.retries
                if side == V:
                    res = run_vistrain(data_yaml, tmp / "runs", args, may_abort=not last)
                elif side == Y:
                    res = run_yolov5(data_yaml, tmp / "runs", args, may_abort=not last)
                else:
                    res = run_peer(data_yaml, tmp / "runs", args, may_abort=not last, shipped=side == P_SHIPPED)
                share = res["other_cpu_share"]
                busy = share is not None and share > args.max_other
                mark = ""
                if busy:
                    mark = (f"  DISCARDED after {res['timed_steps']} steps: machine busy" if not last
                            else "  (machine busy; kept, out of retries)")
                other = f", other processes {100 * share:.0f}% CPU" if share is not None else ""
                workers = res["workers"] if isinstance(res["workers"], int) else args.workers
                print(f"  train run {r + 1}/{args.repeats} {side:<27} {res['img_per_s']:7.2f} img/s (median step "
                      f"{res['step_s_median']:.2f} s, {res['threads']} threads, {workers} workers, "
                      f"{res['children']} child processes{other}){mark}", flush=True)
                if busy and not last:
                    discarded[side].append(res)
                    wait_for_idle(args.max_other, args.max_wait)
                    continue
                results[side].append(res)
                break
    return results, discarded


# ---------------------------------------------------------------------------------------------- inference
def letterboxed_image(data_root: Path, size: int) -> torch.Tensor:
    """The first validation image of the temp dataset, letterboxed to ``size`` x ``size`` -> ``Tensor[1, 3, H, W]``."""
    from PIL import Image

    from vistrain.data.augment import letterbox

    path = sorted((data_root / "detect" / "images" / "val").glob("*.jpg"))[0]
    img = np.asarray(Image.open(path).convert("RGB"))
    out, _, _ = letterbox(img, size, auto=False, scaleup=True)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).float().div_(255.0)[None]


def _bisect(count, target: int) -> float:
    """The logit shift ``d`` for which ``count(d)`` (increasing in ``d``) is closest to ``target``."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if count(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi if abs(count(hi) - target) <= abs(count(lo) - target) else lo


# A random-init head gives nearly the same score logits everywhere on a level (the count of boxes above conf
# then jumps by whole levels as the bias moves), so before shifting the bias, the score rows of each level's
# output conv are scaled until the logits spread over positions with this standard deviation.
LOGIT_SPREAD = 2.0


class VistrainInfer:
    name = V

    def __init__(self, x: torch.Tensor, target: int):
        import vistrain
        from vistrain.tasks.detect import DetectTask, nms_settings

        self.model = vistrain.build_model("yolov5s", num_classes=80).eval()
        self.head = self.model.model[-1]
        self.task = DetectTask()
        self.task.head = self.head
        self.settings = nms_settings({"conf": CONF, "iou": IOU, "max_det": MAX_DET}, "predict")
        na = self.head.na
        with torch.inference_mode():
            raw = self.model(x)  # per level (1, na, h, w, 5 + nc)
        self.count_at_init = self._count(raw, 0.0)
        self.shift = 0.0
        if not target:
            return
        with torch.no_grad():
            for conv, p in zip(self.head.m, raw):
                spread = float(p[0, ..., 4:].std(dim=(1, 2)).mean())  # over positions, mean over anchors x scores
                conv.weight.view(na, -1, *conv.weight.shape[1:])[:, 4:] *= LOGIT_SPREAD / max(spread, 1e-6)
            with torch.inference_mode():
                raw = self.model(x)
            self.shift = _bisect(lambda d: self._count(raw, d), target)
            for conv in self.head.m:  # shift objectness and class logits by the same amount
                conv.bias.view(na, -1)[:, 4:] += self.shift

    @staticmethod
    def _count(raw: list[torch.Tensor], d: float) -> int:
        """Boxes whose objectness x best class probability passes conf, with every score logit shifted by ``d``."""
        return sum(int(((p[..., 4] + d).sigmoid() * (p[..., 5:] + d).sigmoid().amax(-1) > CONF).sum()) for p in raw)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.task.postprocess(self.model(x), self.settings)

    def candidates(self, x: torch.Tensor) -> int:
        from vistrain.ops.boxes import decode_yolov5

        d = decode_yolov5(self.model(x), self.head.anchors, self.head.stride)[0]
        return int(((d[:, 5:] * d[:, 4:5]).amax(1) > CONF).sum())


class Yolov5Infer:
    """The reference model with vistrain's weights (same state_dict keys): the same candidates, by construction."""

    name = Y

    def __init__(self, vis: VistrainInfer):
        from yolov5.utils.general import non_max_suppression

        self.nms = non_max_suppression
        self.model = yolov5_model(80)
        self.model.load_state_dict(vis.model.state_dict(), strict=True)
        self.model.eval()
        self.count_at_init, self.shift = vis.count_at_init, vis.shift

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.nms(self.model(x), conf_thres=CONF, iou_thres=IOU, max_det=MAX_DET)

    def candidates(self, x: torch.Tensor) -> int:
        d = self.model(x)[0][0]
        return int(((d[:, 5:] * d[:, 4:5]).amax(1) > CONF).sum())


class PeerInfer:
    name = P

    def __init__(self, x: torch.Tensor, target: int, fused: bool = False):
        try:
            from ultralytics.utils.nms import non_max_suppression
        except ImportError:  # ultralytics < 8.3.x kept it in ops
            from ultralytics.utils.ops import non_max_suppression

        self.nms = non_max_suppression
        self.model = peer_model(80).eval()
        self.head = self.model.model[-1]
        with torch.inference_mode():
            logits = self.model(x)[1]["scores"][0]  # (nc, anchors) raw class logits, levels concatenated
        self.count_at_init = self._count(logits, 0.0)
        self.shift = 0.0
        if target:
            sizes = [(x.shape[2] // int(s)) * (x.shape[3] // int(s)) for s in self.head.stride]
            with torch.no_grad():
                for branch, lv in zip(self.head.cv3, logits.split(sizes, 1)):
                    branch[-1].weight *= LOGIT_SPREAD / max(float(lv.std(1).mean()), 1e-6)
                with torch.inference_mode():
                    logits = self.model(x)[1]["scores"][0]
                self.shift = _bisect(lambda d: self._count(logits, d), target)
                for branch in self.head.cv3:
                    branch[-1].bias += self.shift
        self.count = self._count(logits, self.shift)
        if fused:
            self.model = self.model.fuse(verbose=False)
            self.name = f"{P} (fused, info)"

    @staticmethod
    def _count(logits: torch.Tensor, d: float) -> int:
        return int(((logits + d).sigmoid().amax(0) > CONF).sum())

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.nms(self.model(x), conf_thres=CONF, iou_thres=IOU, max_det=MAX_DET)

    def candidates(self, x: torch.Tensor) -> int:
        return int((self.model(x)[0][0, 4:].amax(0) > CONF).sum())


class BodyInfer:
    """Every layer but the Detect head (backbone + neck: the same architecture on both sides), run by one
    executor that follows the layers' ``f`` (from) indices, so that the code around the layers is identical."""

    def __init__(self, side: str, model: torch.nn.Module):
        self.layers = list(model.model[:-1])
        self.name = f"{side} body (info)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for m in self.layers:
            if m.f != -1:
                x = outs[m.f] if isinstance(m.f, int) else [x if j == -1 else outs[j] for j in m.f]
            x = m(x)
            outs.append(x)
        return x


def bench_inference(x: torch.Tensor, args) -> dict:
    torch.set_num_threads(args.threads)
    peer = PeerInfer(x, args.candidates)
    vis = VistrainInfer(x, peer.count if args.candidates else 0)  # as many candidates as the peer got
    runners = ([Yolov5Infer(vis)] if YOLOV5 is not None else []) + [peer, vis]
    if args.peer_fused:
        runners.append(PeerInfer(x, args.candidates, fused=True))
    if args.body:
        runners += [BodyInfer(P, peer.model), BodyInfer(V, vis.model)]
    info = {}
    with torch.inference_mode():
        for rn in runners:
            if hasattr(rn, "candidates"):
                info[rn.name] = {"candidates_at_init": rn.count_at_init, "logit_shift": rn.shift,
                                 "candidates": rn.candidates(x), "detections": int(len(rn(x)[0]))}
    print("  NMS input: " + "; ".join(f"{k}: {v['candidates']} boxes above conf {CONF} (at init "
                                      f"{v['candidates_at_init']}; logit shift {v['logit_shift']:+.2f}) -> "
                                      f"{v['detections']} kept" for k, v in info.items()), flush=True)
    # Round robin: every round runs each model once (order reversed every other round), so slow drifts of the
    # machine's speed hit all sides alike; a block is --infer-iters rounds, watched for other processes.
    names = [rn.name for rn in runners]
    times: dict[str, list[float]] = {n: [] for n in names}
    blocks: list[dict] = []
    with torch.inference_mode():
        for _ in range(args.infer_warmup):
            for rn in runners:
                rn(x)
        for b in range(args.infer_blocks):
            for attempt in range(args.retries + 1):
                mon = CpuMonitor()
                mon.start()
                ts: dict[str, list[float]] = {n: [] for n in names}
                for i in range(args.infer_iters):
                    for rn in (runners if i % 2 == 0 else runners[::-1]):
                        t0 = time.perf_counter()
                        rn(x)
                        ts[rn.name].append(time.perf_counter() - t0)
                share = mon.share()
                busy = share is not None and share > args.max_other
                if busy and attempt < args.retries:
                    print(f"  infer block {b + 1}/{args.infer_blocks}: DISCARDED, other processes "
                          f"{100 * share:.0f}% CPU", flush=True)
                    wait_for_idle(args.max_other, args.max_wait)
                    continue
                break
            for n in names:
                times[n] += ts[n]
            med = {n: 1e3 * statistics.median(ts[n]) for n in names}
            blocks.append({"median_ms": med, "other_cpu_share": share, "busy_kept": busy})
            other = f", other processes {100 * share:.0f}% CPU" if share is not None else ""
            print(f"  infer block {b + 1}/{args.infer_blocks} ({args.infer_iters} rounds{other}): "
                  + ", ".join(f"{n} {m:.1f}" for n, m in med.items()) + " ms", flush=True)
    # paired: each peer's time over vistrain's in the same round, median over rounds
    paired = {n: statistics.median(a / b for a, b in zip(times[n], times[V])) for n in names if n != V}
    return {"nms": info, "ms": {k: [1e3 * t for t in v] for k, v in times.items()}, "blocks": blocks,
            "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "paired_ratio_peer_over_vistrain": paired}


# ---------------------------------------------------------------------------------------------- data
def bench_data(data_yaml: Path, tmp: Path, args) -> dict:
    """Per-sample ``__getitem__`` seconds of each side's training dataset (mosaic on), single-threaded, in
    alternating blocks."""
    import cv2
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from vistrain.tasks.detect import DetectTask

    datasets = {}
    with quiet(args.show_progress):
        datasets[V] = DetectTask().build_data(vistrain_cfg(data_yaml, tmp / "runs", args)).train
        if YOLOV5 is not None:
            from yolov5.utils.dataloaders import LoadImagesAndLabels

            train_dir = data_yaml.parent / "images" / "train"
            datasets[Y] = LoadImagesAndLabels(str(train_dir), args.imgsz, args.batch, augment=True,
                                              hyp=yolov5_hyp(), rect=False, stride=32)
        pcfg = get_cfg(overrides={**peer_overrides(data_yaml, tmp / "runs", args), "mode": "train",
                                  "model": "yolov5s.yaml", "task": "detect"})
        pdata = check_det_dataset(str(data_yaml))
        datasets[P] = build_yolo_dataset(pcfg, pdata["train"], args.batch, pdata, mode="train", stride=32)
    n = min(len(ds) for ds in datasets.values())
    rng = np.random.default_rng(0)
    threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    sides = list(datasets)
    per = {s: [] for s in sides}
    try:
        for b in range(args.data_blocks):
            idx = rng.integers(0, n, args.data_samples).tolist()
            for side in (sides if b % 2 == 0 else sides[::-1]):
                ds = datasets[side]
                t0 = time.perf_counter()
                for i in idx:
                    ds[i]
                per[side].append((time.perf_counter() - t0) / len(idx))
    finally:
        cv2.setNumThreads(threads)
        torch.set_num_threads(torch_threads)
    med = {k: statistics.median(v) for k, v in per.items()}
    for side in sides:
        print(f"  data {side:<12} {1e3 * med[side]:6.1f} ms/sample (blocks: "
              f"{' '.join(f'{1e3 * t:.1f}' for t in per[side])})", flush=True)
    return {"s_per_sample_median": med, "s_per_sample_blocks": per, "samples_per_block": args.data_samples,
            "ultralytics_image_buffer": getattr(datasets[P], "max_buffer_length", None)}


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed training steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="training runs per side, alternated; median reported")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--imgsz", type=int, default=320, help="training image size (default 320)")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers on both sides (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads on both sides (default: torch's)")
    p.add_argument("--infer-imgsz", type=int, default=640, help="inference input size (default 640)")
    p.add_argument("--infer-iters", type=int, default=15,
                   help="rounds per block; a round times every model once, in alternating order (default 15)")
    p.add_argument("--infer-warmup", type=int, default=2, help="untimed rounds before the first block")
    p.add_argument("--infer-blocks", type=int, default=6, help="blocks (default 6)")
    p.add_argument("--candidates", type=int, default=300,
                   help="boxes above conf 0.25 entering NMS: ultralytics' biases are shifted to about this, "
                        "vistrain's (and so yolov5's) to ultralytics' count; 0 = as initialised (default 300)")
    p.add_argument("--data-samples", type=int, default=32, help="dataset samples per block in the data test")
    p.add_argument("--data-blocks", type=int, default=6, help="alternating blocks per side in the data test")
    p.add_argument("--skip", default="", help="comma list of parts to skip: train, infer, data")
    p.add_argument("--no-yolov5", dest="yolov5", action="store_false",
                   help="leave out the reference yolov5 package (otherwise used when importable)")
    p.add_argument("--peer-defaults", action="store_true",
                   help="also train ultralytics as shipped on CPU (workers 0, cpu_count-1 threads); information")
    p.add_argument("--no-peer-fused", dest="peer_fused", action="store_false",
                   help="skip the information line with ultralytics' Conv+BN-fused model")
    p.add_argument("--no-body", dest="body", action="store_false",
                   help="skip the information lines timing backbone + neck only (the same layers on both sides)")
    p.add_argument("--max-load", type=float, default=1.0, help="wait until the 1-min load average is below this")
    p.add_argument("--max-wait", type=float, default=600.0, help="longest wait for a quiet machine, seconds")
    p.add_argument("--max-other", type=float, default=0.10,
                   help="a run during which other processes used more than this share of the CPUs is repeated")
    p.add_argument("--retries", type=int, default=3, help="repeats of a run spoilt by other processes (default 3)")
    p.add_argument("--show-progress", action="store_true", help="let both trainers print their logs and bars")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON results (default {RESULTS}; --quick: {QUICK_RESULTS.name} beside it)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: imgsz 128, 1+2 steps, 1 repeat, inference at 320, no waiting")
    args = p.parse_args(argv)
    if args.quick:
        args.imgsz, args.warmup, args.steps, args.repeats, args.max_wait, args.retries = 128, 1, 2, 1, 0.0, 0
        args.infer_imgsz, args.infer_iters, args.infer_blocks, args.data_samples, args.data_blocks = 320, 3, 2, 4, 2
    if args.out is None:
        args.out = QUICK_RESULTS if args.quick else RESULTS
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be at least 1")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - {"train", "infer", "data"}:
        p.error("--skip takes train, infer, data")
    return args


def _ratio_line(label: str, ratio: float, target: float = 1.0) -> str:
    return f"{label}: {ratio:.3f} (target >= {target:.1f}) {'ok' if ratio >= target else 'BELOW TARGET'}"


def _peer_ratio_lines(ratios: dict, info: dict) -> list[str]:
    lines = []
    for peer in (Y, P):
        if f"train_vs_{peer}" in ratios:
            lines.append(_ratio_line(f"ratio training img/s vistrain/{peer}", ratios[f"train_vs_{peer}"])
                         + f"  [round by round: {ratios[f'train_vs_{peer}_paired']:.2f}]")
        if f"infer_vs_{peer}" in ratios:
            lines.append(_ratio_line(f"ratio inference speed vistrain/{peer} ({peer} ms / vistrain ms)",
                                     ratios[f"infer_vs_{peer}"])
                         + f"  [round by round: {ratios[f'infer_vs_{peer}_paired']:.2f}]")
    per_gflop = [f"{part} {ratios[f'{part}_vs_{P}_per_gflop']:.2f}" for part in ("train", "infer")
                 if f"{part}_vs_{P}_per_gflop" in ratios]
    if per_gflop:
        lines.append(f"  {P} per GFLOP of its model (x {info[V]['gflops_640']:.1f}/{info[P]['gflops_640']:.1f}): "
                     f"{', '.join(per_gflop)} (information)")
    if "infer_body_vs_ultralytics" in ratios:
        lines.append(f"  {P} backbone + neck only (the same layers, {info[V]['body_gflops_640']:.1f} / "
                     f"{info[P]['body_gflops_640']:.1f} GFLOPs): {ratios['infer_body_vs_ultralytics']:.2f} "
                     f"(information)")
    for peer in (Y, P):
        if f"data_vs_{peer}" in ratios:
            lines.append(f"ratio data samples/s vistrain/{peer}: {ratios[f'data_vs_{peer}']:.2f} (information)")
    return lines


def main(argv=None) -> int:
    global YOLOV5
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="vistrain-bench-detect-") as tmp:
        tmp = Path(tmp)
        # before the peers are imported: no network, settings and caches inside the temp dir
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_CONFIG_DIR"] = str(tmp / "ultralytics-config")
        os.environ["YOLOV5_CONFIG_DIR"] = str(tmp / "yolov5-config")
        os.environ["VISTRAIN_CACHE"] = str(tmp / "vistrain-cache")
        block_internet()
        with quiet(args.show_progress):
            import ultralytics
        yolov5_note = "not requested (--no-yolov5)"
        if args.yolov5:
            with quiet(args.show_progress):
                YOLOV5, why = import_yolov5()
            yolov5_note = (f"yolov5 {importlib.metadata.version('yolov5')}" if YOLOV5 is not None
                           else f"not importable, left out: {why}")
        import cv2
        import torchvision

        from vistrain.data.synthetic import make_dataset, split_layout

        torch.set_num_threads(args.threads)  # the peers' imports set OMP_NUM_THREADS for later processes
        print(f"YOLOv5s detection, CPU, {args.threads} torch threads; train: batch {args.batch}, {args.imgsz} px, "
              f"{args.workers} workers, {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} runs per "
              f"side; inference: batch 1, {args.infer_imgsz} px, {args.infer_blocks} x {args.infer_iters} per side; "
              f"peers: {yolov5_note}, ultralytics {ultralytics.__version__}", flush=True)
        if YOLOV5 is not None and args.warmup + args.steps > YOLOV5_NO_ACCUMULATE_STEPS:
            print(f"  note: after {YOLOV5_NO_ACCUMULATE_STEPS} steps yolov5 accumulates gradients over 2+ batches "
                  f"(its nbs is 64), so it steps its optimizer less often than the others", flush=True)
        info = model_info(6)
        for side, m in info.items():
            print(f"  {side:<12} {m['params'] / 1e6:5.2f} M params at 6 classes, {m['gflops_640']:5.1f} GFLOPs at "
                  f"640 ({m['gflops_320']:.1f} at 320; backbone + neck {m['body_params'] / 1e6:.2f} M, "
                  f"{m['body_gflops_640']:.1f} GFLOPs)  {m['model']}", flush=True)

        need = (args.warmup + args.steps + 1) * args.batch  # a whole run within one epoch, with a batch to spare
        n = math.ceil(need / 0.8) + 2
        while split_layout(n, 0.2)[0] < need:
            n += 1
        t0 = time.time()
        root = make_dataset(tmp / "data", n=n, imgsz=320, seed=0)
        data_yaml = root / "detect" / "data.yaml"
        print(f"  data: {split_layout(n, 0.2)[0]} train / {n - split_layout(n, 0.2)[0]} val images, 320 px "
              f"(make_dataset, seed 0, {time.time() - t0:.0f} s)", flush=True)

        load_before, waited = wait_for_quiet(args.max_load, args.max_wait)
        print(f"load average (1 min) before measuring: {load_before:.2f} (waited {waited:.0f} s)", flush=True)
        t_start = time.time()
        train = discarded = infer = data = None
        if "train" not in args.skip:
            train, discarded = bench_training(data_yaml, tmp, args)
        if "infer" not in args.skip:
            infer = bench_inference(letterboxed_image(root, args.infer_imgsz), args)
        if "data" not in args.skip:
            data = bench_data(data_yaml, tmp, args)
        load_after = load1()
        elapsed = time.time() - t_start

    ratios, summary = {}, {}
    print(f"\n{'':<34}{'median':>12}{'runs / blocks':>38}{'vistrain/peer':>15}")
    if train:
        med = {s: statistics.median(r["img_per_s"] for r in runs) for s, runs in train.items()}
        summary["train_img_per_s_median"] = med
        for s, runs in train.items():
            vs = f"{med[V] / med[s]:.3f}" if s != V else ""
            per_run = " ".join(f"{r['img_per_s']:.2f}" for r in runs)
            print(f"{'train ' + s:<34}{med[s]:>8.2f} img/s {per_run:>34}{vs:>15}")
        for peer in (Y, P):
            if peer in med:
                ratios[f"train_vs_{peer}"] = med[V] / med[peer]
                ratios[f"train_vs_{peer}_paired"] = statistics.median(  # run r of both sides: the same round
                    a["img_per_s"] / b["img_per_s"] for a, b in zip(train[V], train[peer]))
        ratios["train_vs_ultralytics_per_gflop"] = (ratios["train_vs_ultralytics"] * info[V]["gflops_320"]
                                                    / info[P]["gflops_320"])
    if infer:
        med = infer["median_ms"]
        for s, v in med.items():
            blocks = " ".join(f"{b['median_ms'][s]:.0f}" for b in infer["blocks"])
            base = med[f"{V} body (info)"] if "body" in s else med[V]
            vs = f"{med[s] / base:.3f}" if not s.startswith(V) else ""
            print(f"{'infer ' + s:<34}{v:>9.1f} ms  {blocks:>34}{vs:>15}")
        for peer in (Y, P):
            if peer in med:
                ratios[f"infer_vs_{peer}"] = med[peer] / med[V]
                ratios[f"infer_vs_{peer}_paired"] = infer["paired_ratio_peer_over_vistrain"][peer]
        if f"{V} body (info)" in med:
            ratios["infer_body_vs_ultralytics"] = med[f"{P} body (info)"] / med[f"{V} body (info)"]
        ratios["infer_vs_ultralytics_per_gflop"] = (ratios["infer_vs_ultralytics"] * info[V]["gflops_640"]
                                                    / info[P]["gflops_640"])
    if data:
        med = data["s_per_sample_median"]
        for s in med:
            vs = f"{med[s] / med[V]:.3f}" if s != V else ""
            print(f"{'data ' + s:<34}{1e3 * med[s]:>7.1f} ms/img {'(single thread, mosaic)':>34}{vs:>15}")
            if s != V:
                ratios[f"data_vs_{s}"] = med[s] / med[V]
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after (this benchmark included); "
          f"{elapsed:.0f} s of measuring")
    if Y in info:
        print(f"{Y} = the same anchor-based YOLOv5s as vistrain's ({info[Y]['params'] / 1e6:.2f} M params, "
              f"{info[Y]['gflops_640']:.1f} GFLOPs at 640): the like-for-like peer")
    print(f"{P} = YOLOv5u, anchor-free DFL head ({info[P]['params'] / 1e6:.2f} M params, {info[P]['gflops_640']:.1f} "
          f"GFLOPs) vs vistrain's anchor-based YOLOv5s ({info[V]['params'] / 1e6:.2f} M, "
          f"{info[V]['gflops_640']:.1f} GFLOPs)")
    for line in _peer_ratio_lines(ratios, info):
        print(line)

    out = {
        "benchmark": "yolov5s detection on CPU: training throughput and inference latency, vistrain vs peers",
        "peers": {Y: f"{yolov5_note}: anchor-based YOLOv5 v7.0, the same model as vistrain's yolov5s",
                  P: f"ultralytics {ultralytics.__version__} YOLO('yolov5s.yaml') = YOLOv5u (anchor-free DFL head)"},
        "settings": {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                     for k, v in vars(args).items()},
        "train_settings_all": {"optimizer": "SGD", "lr0": LR, "momentum": MOMENTUM, "nesterov": True,
                               "weight_decay": WEIGHT_DECAY, "nbs": args.batch, "warmup_epochs": 0, "ema": True,
                               "clip_grad": 10.0, "amp": False, "deterministic": False, "epochs": 1, **HYP},
        "train_settings_ultralytics": {**PEER_ONLY_HYP, "val": False, "save": False,
                                       "workers_restored": "Trainer subclass sets args.workers after __init__",
                                       "threads_restored": "on_train_start sets torch.set_num_threads"},
        "train_settings_yolov5": {
            "hyp": "hyp.scratch-low.yaml with lr0/momentum/weight_decay/augmentation above, warmup_epochs 0",
            "nbs": f"64 (fixed); accumulate stays 1 for the first {YOLOV5_NO_ACCUMULATE_STEPS} steps of its "
                   f">= 100-iteration warmup",
            "patched": "init_seeds(deterministic=False); check_font and attempt_download_from_hub no-ops",
            "noval": True, "nosave": True, "noplots": True, "stopped_by": "callbacks.stop_training"},
        "inference_settings": {"imgsz": args.infer_imgsz, "batch": 1, "conf": CONF, "iou": IOU, "max_det": MAX_DET,
                               "timed": "forward + decode + NMS under torch.inference_mode",
                               "not_timed": "image decode, letterbox, scaling boxes back", "fused": False,
                               "yolov5_weights": "vistrain's (state_dict loaded strictly)"},
        "models": info,
        "ratios_vistrain_over_peer": ratios,
        "target": 1.0,
        **summary,
        "train_runs": train, "train_discarded_runs": discarded,
        "inference": infer,
        "data": data,
        "load_average_1min": {"before": load_before, "after": load_after, "waited_s": waited},
        "elapsed_s": elapsed,
        "machine": {
            "torch": torch.__version__, "torchvision": torchvision.__version__, "ultralytics": ultralytics.__version__,
            "yolov5": yolov5_note, "opencv": cv2.__version__, "python": platform.python_version(),
            "torch_threads": args.threads, "cv2_threads_after_peer_imports": cv2.getNumThreads(),
            "cpu_count": os.cpu_count(), "cpu": cpu_name(), "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.quick:
        out["note"] = "--quick smoke run: not a measurement"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
