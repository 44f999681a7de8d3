"""EfficientDet-D0 on CPU: vistrain vs. effdet (the reference implementation, effdet 0.4.1), the same weights.

    .venv/bin/python bench/efficientdet.py --part latency     # ~2 minutes on 2 cores
    .venv/bin/python bench/efficientdet.py --part train       # ~5 minutes
    .venv/bin/python bench/efficientdet.py --part accuracy    # ~40 minutes (6 training runs at 128 px)
    .venv/bin/python bench/efficientdet.py --quick            # smoke run of all three parts, a few minutes
    .venv/bin/python bench/efficientdet.py --help             # --rounds --steps --repeats --threads --seeds ...

Every part writes its entry of ``bench/results/efficientdet.json`` (the other parts' entries are kept; ``--quick``
writes ``efficientdet-quick.json``).  Data: the built-in dataset's Pascal VOC copy
(``vistrain.data.synthetic.ensure_dataset() / "voc"``: 128x128 JPEGs, 6 shapes, 2400 train / 600 val).
Weights: vistrain's ``efficientdet-d0`` (``build_model``, 6 classes) and effdet's ``EfficientDet(tf_efficientdet_d0
config, num_classes=6)`` hold the same state_dict (loaded with ``strict=True``); vistrain's model takes RGB 0..1
and normalises inside, effdet's takes the normalised image (the bench normalises with the same ImageNet mean / std).
Before torch loads, the script sets ``OMP_WAIT_POLICY=PASSIVE`` as vistrain's API does (unless the environment sets
a policy), so both sides run under the same OpenMP policy and the same torch thread count.

1. Latency (``--part latency``; target vistrain / effdet <= 0.9): one image end to end, batch 1, 512 px, CPU.
   vistrain = the steps of ``vistrain.engine.predictor.predict`` with its defaults: model ``eval()``,
   ``fuse_conv_bn`` (``fuse=True``), ``set_memory_format(channels_last=True)``, ``task.setup_model``; per image
   ``task.predict_preprocess`` (letterbox to 512, HWC uint8 -> CHW float / 255), ``torch.stack``, the model under
   ``torch.no_grad``, ``task.predict_postprocess`` (top-5000 over anchors x classes, conf 0.25, class-wise NMS
   IoU 0.5, max 100, boxes back to the original pixels).  effdet = the same ``task.predict_preprocess`` letterbox
   and ``torch.stack``, then ``(x - mean) / std``, ``DetBenchPredict`` (its top-5000 + class-wise NMS at 0.5 +
   100 per image, no score threshold), then ``score >= 0.25`` and the same box scaling back.  Not timed: reading
   and decoding the image (a PIL image in memory), building and loading the models, drawing / saving.  The two
   sides (and information lines) run round robin, one image each per round, the order reversed every round,
   ``--warmup-rounds`` untimed then ``--rounds`` timed; medians per side, the ratio of the medians is the result,
   the median of the per-round ratios a check.  Forward hooks stamp where the model starts and ends, so every
   line splits into preprocess / model / postprocess.  Information lines: vistrain at ``conf=0.001`` (the
   validation threshold: with a fresh model's 0.01 class prior every one of the 5000 candidates enters NMS, as
   effdet's always do), and vistrain with the BatchNorms that ``fuse_conv_bn`` leaves in EfficientDet folded by
   this script (what a fusing predictor could gain), and vistrain with ``channels_last=False`` (NCHW weights, as
   effdet runs).  Weights: a fresh model (seed 0) unless ``--weights`` names
   a vistrain checkpoint.  ``--profile`` adds torch.profiler's top operators of each side.
2. Training throughput (``--part train``; target vistrain / effdet >= 1.0): D0, batch 4, 512 px, img/s.
   vistrain = its real loop: ``Trainer(cfg).train()`` on the VOC data (the recipe below with ``warmup_epochs=0``,
   ``epochs=1``), a step stamped from the ``on_batch_end`` callback, which stops the run after the timed steps (no
   validation or checkpoint is timed).  A step = from the end of one batch to the end of the next: data wait,
   ``task.preprocess``, forward, ``EffDetLoss``, backward, clip, AdamW step, EMA update, the progress bar, all
   ``train_epoch`` does.  effdet = a plain loop (``effdet_train`` below) fed by the same vistrain DataLoader
   (``DetectTask.build_data`` + ``make_loader``, seeded: the same batches): per step the data wait, uint8 -> float,
   normalise, targets to effdet's padded yxyx / 1-based classes, ``DetBenchTrain`` (forward + effdet's
   ``AnchorLabeler`` + ``DetectionLoss``), backward, clip, AdamW step, EMA update -- the same extras as vistrain's,
   written in plain torch.  Both: the same torch threads (vistrain's auto choice for the config unless
   ``--threads``) and loader workers; ``--warmup`` untimed + ``--steps`` timed steps per run, ``--repeats`` runs
   per side in counterbalanced order (V E, E V, ...), medians; a run during which other processes took more than
   ``--max-other`` of the CPUs is repeated (``--retries``).  The machine's load is printed and stored.
3. Accuracy (``--part accuracy``; the plan, fixed on 2026-12-06 before the first run): D0 from scratch (no pretrained
   weights: nothing downloads) on the built-in VOC data, imgsz 128, batch 16, ``--epochs`` 3, seeds 0, 1, 2 (in
   this order, each seed both sides before the next; stop only for time).  Recipe, both sides: AdamW lr 0.001,
   betas (0.9, 0.999), weight decay 5e-4 on conv weights only (not on norm weights, biases or other 1-D weights such
   as the BiFPN fusion weights: vistrain's three groups, rebuilt in the plain loop; the script checks that both
   sides' groups hold the same tensors), BatchNorm momentum 0.1 (vistrain's default for EfficientDet; effdet's
   model is set to it; its config's is 0.01), an optimizer step every batch (``nbs=0``),
   1 epoch of linear lr warmup from 0 (every group; ``warmup_bias_lr=0``; 150 steps), then linear decay per epoch to
   ``lrf=0.01``, gradient norm clipped at 10 on vistrain's loss (= its mean loss x batch; the plain loop clips
   effdet's mean loss at 10 / batch, the same clip), EMA of the weights (vistrain's ``ModelEMA`` formula: decay
   0.9999 * (1 - exp(-updates / 2000)), written out in the plain loop), loss preset ``effdet`` (effdet's own
   ``DetBenchTrain`` on the effdet side), augmentation: vistrain's VOC training pipeline with ``mosaic=0`` (HSV,
   translate 0.1, scale 0.5, horizontal flip 0.5) -- both sides take their batches from the same seeded vistrain
   DataLoader (``workers`` 1), so they see the same images in the same order with the same augmentation.  Each
   pair starts from the same initial weights (vistrain's model at ``on_train_start``, copied into effdet's).
   Evaluation, the same for both: the EMA weights after the last epoch (vistrain: ``last.pt``'s ``model``, not
   the best epoch's ``best.pt``, which is chosen on the val split) loaded into a vistrain ``efficientdet-d0``
   and scored by vistrain's validator on the 600 val images (conf 0.001, NMS IoU 0.5, 100 per image; COCO
   mAP50-95 and mAP50 by vistrain's metrics).  Reported: per seed both sides, the means, the paired difference
   (vistrain - effdet) with its standard error sd(d) / sqrt(n); a difference within two standard errors is level.
   Information only: vistrain's own ``best.pt`` result and the last epoch's mean training losses of both sides.
   Amended at 06:50, after 20 s of the first attempt and before any result: vistrain changed during the session
   (46e691b: EfficientDet's BatchNorm momentum 0.1 by default, square validation; its trainer: no weight decay on
   1-D weights), so the plain loop's decay groups and BatchNorm momentum were made to follow; nothing else changed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vistrain.utils.threads import resolve_threads, set_wait_policy  # noqa: E402 (imports no torch)

set_wait_policy()  # as vistrain's API: OMP_WAIT_POLICY=PASSIVE before torch loads, unless the environment says

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CpuMonitor, StepClock, cpu_name, load1, quiet, run_trainer_steps,  # noqa: E402
                    wait_for_idle, wait_for_quiet)

RESULTS = Path(__file__).resolve().parent / "results" / "efficientdet.json"
QUICK_RESULTS = RESULTS.with_name("efficientdet-quick.json")
V, E = "vistrain", "effdet"
NC = 6
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the training recipe of parts 2 and 3 (vistrain keys; the plain effdet loop implements the same)
RECIPE = dict(optimizer="AdamW", lr0=0.001, lrf=0.01, momentum=0.9, weight_decay=0.0005, nbs=0, warmup_epochs=1.0,
              warmup_bias_lr=0.0, cos_lr=False, ema=True, clip_grad=10.0, loss="effdet", amp=False, mosaic=0.0,
              close_mosaic=0, mixup=0.0, hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, translate=0.1, scale=0.5, degrees=0.0,
              shear=0.0, perspective=0.0, fliplr=0.5, flipud=0.0, rect=False)
EMA_DECAY, EMA_TAU = 0.9999, 2000.0  # vistrain's ModelEMA defaults


def voc_root() -> Path:
    from vistrain.data.synthetic import ensure_dataset

    return ensure_dataset() / "voc"


def vistrain_cfg(mode: str, **overrides) -> dict:
    from vistrain.config import get_config

    cfg = get_config(overrides)
    cfg["_user_keys"] = sorted(overrides)
    cfg["_mode"] = mode
    return cfg


def import_effdet():
    with warnings.catch_warnings():  # its torch.jit.script decorators warn on import
        warnings.simplefilter("ignore")
        import effdet
    return effdet


def effdet_model(state_dict: dict, imgsz: int, nc: int = NC):
    """effdet's EfficientDet-D0 (``tf_efficientdet_d0`` config, ``nc`` classes, anchors for ``imgsz``) with
    ``state_dict`` loaded strictly."""
    effdet = import_effdet()
    cfg = effdet.get_efficientdet_config("tf_efficientdet_d0")
    cfg.num_classes, cfg.image_size = nc, (imgsz, imgsz)
    model = effdet.EfficientDet(cfg, pretrained_backbone=False)
    model.load_state_dict({k: v.float().contiguous() if v.is_floating_point() else v for k, v in state_dict.items()},
                          strict=True)
    return model


def nchw_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def other_share_during(fn):
    """Run ``fn()``; return (its result, the share of the CPUs other processes used meanwhile)."""
    mon = CpuMonitor()
    mon.start()
    out = fn()
    return out, mon.share()


def machine_info() -> dict:
    import cv2
    import timm
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "effdet": importlib.metadata.version("effdet"), "opencv": cv2.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpu": cpu_name(), "platform": platform.platform(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def top_snapshot() -> str:
    """``top``'s CPU line and its busiest processes, as text (for the record of the machine's load)."""
    import subprocess

    try:
        out = subprocess.run(["top", "-bn2", "-d", "2", "-w", "160"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    last = out[out.rfind("top -"):].splitlines()
    head = [ln for ln in last[:5] if ln.startswith(("top -", "%Cpu"))]
    procs = [ln for ln in last[7:] if ln.strip()][:5]
    return "\n".join(head + procs)


# ============================================================================================ 1. latency
def fold_batchnorms(model: torch.nn.Module) -> int:
    """Fold every BatchNorm that directly follows a Conv2d among a module's children (the order they run in:
    timm's EfficientNet blocks, vistrain's SeparableConv and ConvBn) into that conv; a timm BatchNormAct2d leaves
    its activation behind.  Eval mode only.  Returns how many were folded.  (Information: what fusing could give;
    the head's per-level BatchNorms after convs shared across levels cannot be folded this way.)"""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    n = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if isinstance(conv, torch.nn.Conv2d) and type(bn).__name__ in ("BatchNorm2d", "BatchNormAct2d"):
                setattr(parent, cname, fuse_conv_bn_eval(conv, bn))
                rest = torch.nn.Sequential(getattr(bn, "drop", torch.nn.Identity()),
                                           getattr(bn, "act", torch.nn.Identity()))
                setattr(parent, bname, rest)
                n += 1
    return n


def latency_image(path: str | None):
    from vistrain.data.image import load_image

    if path:
        return Path(path), load_image(Path(path))
    root = voc_root()
    first = (root / "ImageSets" / "Main" / "val.txt").read_text().split()[0]
    p = root / "JPEGImages" / f"{first}.jpg"
    return p, load_image(p)


def bench_latency(args) -> dict:
    from vistrain.data.augment import scale_boxes_back
    from vistrain.engine.checkpoint import load_checkpoint
    from vistrain.nn.model import build_model, fuse_conv_bn, set_memory_format
    from vistrain.tasks.detect import DetectTask

    effdet = import_effdet()
    threads = args.threads or resolve_threads(0, 0)  # vistrain predict's own choice: no loader workers
    torch.set_num_threads(threads)
    img_path, image = latency_image(args.image)
    if args.weights:
        ckpt = load_checkpoint(args.weights)
        nc = int(ckpt["model_yaml"].get("nc", NC))
        state = ckpt["model"]
        weights = str(args.weights)
    else:
        torch.manual_seed(0)
        nc = NC
        state = nchw_state(build_model("efficientdet-d0", num_classes=nc))
        weights = "fresh build_model('efficientdet-d0', num_classes=6), torch seed 0"
    cfg = vistrain_cfg("predict", model="efficientdet-d0", imgsz=args.imgsz, device="cpu", threads=threads)
    low = {**cfg, "conf": 0.001}

    def vistrain_side(fold: bool, channels_last: bool = True):
        model = build_model("efficientdet-d0", num_classes=nc)
        model.load_state_dict(state, strict=True)
        model.eval()
        bn_before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        if cfg["fuse"]:
            fuse_conv_bn(model)  # exactly what predict() does (it folds vistrain's Conv modules)
        folded = fold_batchnorms(model) if fold else 0
        set_memory_format(model, cfg["channels_last"] and channels_last)
        task = DetectTask()
        task.setup_model(model, None, cfg, train=False)
        bn_after = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        return model, task, {"batchnorms_before_fuse": bn_before, "batchnorms_after_fuse": bn_after,
                             "folded_by_bench": folded}

    v_model, v_task, v_bn = vistrain_side(False)
    f_model, f_task, f_bn = vistrain_side(True)
    n_model, n_task, _ = vistrain_side(False, channels_last=False)
    e_bench = effdet.DetBenchPredict(effdet_model(state, args.imgsz, nc)).eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    conf = float(cfg["conf"] if cfg["conf"] is not None else 0.25)

    stamps: dict[str, float] = {}

    def hooks(module, key):
        module.register_forward_pre_hook(lambda *_: stamps.__setitem__(key + "0", time.perf_counter()))
        module.register_forward_hook(lambda *_: stamps.__setitem__(key + "1", time.perf_counter()))

    hooks(v_model, "v")
    hooks(f_model, "f")
    hooks(n_model, "n")
    hooks(e_bench.model, "e")

    def run_vistrain(model, task, c):
        def fn():
            x, meta = task.predict_preprocess(image, c["imgsz"])  # predictor: per frame, then torch.stack
            with torch.no_grad():
                return task.predict_postprocess(task.decode(model(torch.stack([x]))), c, [meta])[0]
        return fn

    def run_effdet():
        x, (ratio, pad, shape, _) = v_task.predict_preprocess(image, cfg["imgsz"])  # the same letterbox
        inp = (torch.stack([x]) - mean) / std
        with torch.no_grad():
            det = e_bench(inp)[0]
        det = det[det[:, 4] >= conf].clone()
        det[:, :4] = scale_boxes_back(det[:, :4], ratio, pad, shape)
        det[:, 5] -= 1  # effdet's classes are 1-based
        return det

    sides = {V: (run_vistrain(v_model, v_task, cfg), "v"), E: (run_effdet, "e"),
             f"{V} conf=0.001 (info)": (run_vistrain(v_model, v_task, low), "v"),
             f"{V} + BN folded (info)": (run_vistrain(f_model, f_task, cfg), "f"),
             f"{V} NCHW (info)": (run_vistrain(n_model, n_task, {**cfg, "channels_last": False}), "n")}
    names = list(sides)

    # the outputs, once: same detections?
    with torch.no_grad():
        check = {n: fn() for n, (fn, _) in sides.items()}
        e_all = e_bench((torch.stack([v_task.predict_preprocess(image, cfg["imgsz"])[0]]) - mean) / std)[0]
    e_all = e_all[e_all[:, 5] > 0]  # drop effdet's padding rows
    v_all = check[f"{V} conf=0.001 (info)"]
    agree = {"detections_conf_0.25": {n: int(len(d)) for n, d in check.items()},
             "detections_conf_0.001_vistrain": int(len(v_all)), "detections_effdet_unthresholded": int(len(e_all))}
    if len(v_all) and len(e_all):
        k = min(len(v_all), len(e_all))
        agree["top_scores_max_abs_diff"] = float((v_all[:k, 4].sort(descending=True).values
                                                  - e_all[:k, 4].sort(descending=True).values).abs().max())
    with torch.no_grad():
        x1 = torch.stack([v_task.predict_preprocess(image, cfg["imgsz"])[0]])
        cls_outs, box_outs = v_model(x1)
        f_cls, f_box = f_model(x1)
        e_cls, e_box = e_bench.model((x1 - mean) / std)
        agree["raw_outputs_max_abs_diff"] = {
            f"{V} (channels-last) vs {E}": max(float((a - b).abs().max()) for a, b in zip(cls_outs + box_outs,
                                                                                           e_cls + e_box)),
            f"{V} + BN folded vs {V}": max(float((a - b).abs().max()) for a, b in zip(f_cls + f_box,
                                                                                      cls_outs + box_outs))}
        s = torch.cat([c.flatten() for c in cls_outs]).sigmoid()
        logits = {"candidates_above_0.25": int((s >= 0.25).sum()), "candidates_above_0.001": int((s >= 0.001).sum()),
                  "pairs": int(s.numel()),
                  "max_score": float(s.max())}

    print(f"EfficientDet-D0 latency, batch 1, {args.imgsz} px, CPU, {threads} torch threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); image {img_path.name} {image.width}x{image.height}; "
          f"weights: {weights}", flush=True)
    print(f"  fuse_conv_bn (predict's fuse=True) leaves {v_bn['batchnorms_after_fuse']} of "
          f"{v_bn['batchnorms_before_fuse']} BatchNorms in EfficientDet; the bench's folding leaves "
          f"{f_bn['batchnorms_after_fuse']} (folded {f_bn['folded_by_bench']})", flush=True)
    print(f"  (anchor, class) scores >= 0.25: {logits['candidates_above_0.25']}, >= 0.001: "
          f"{logits['candidates_above_0.001']} of {logits['pairs']} (both sides keep the top 5000 for NMS, vistrain "
          f"those >= conf); detections {agree['detections_conf_0.25']}", flush=True)

    load_before, waited = wait_for_quiet(args.max_load, args.max_wait)
    times = {n: [] for n in names}  # per round: (total, preprocess, model, postprocess) seconds
    mon = CpuMonitor()
    for r in range(args.warmup_rounds + args.rounds):
        if r == args.warmup_rounds:
            mon.start()
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            fn, key = sides[n]
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            if r >= args.warmup_rounds:
                times[n].append((t1 - t0, stamps[key + "0"] - t0, stamps[key + "1"] - stamps[key + "0"],
                                 t1 - stamps[key + "1"]))
    other = mon.share()
    med = {n: {part: 1e3 * statistics.median(t[i] for t in times[n])
               for i, part in enumerate(("total_ms", "preprocess_ms", "model_ms", "postprocess_ms"))} for n in names}
    ratio = med[V]["total_ms"] / med[E]["total_ms"]
    paired = statistics.median(a[0] / b[0] for a, b in zip(times[V], times[E]))
    print(f"\n  {'':<32}{'total ms':>10}{'preprocess':>12}{'model':>10}{'postprocess':>13}   "
          f"(medians of {args.rounds})")
    for n in names:
        m = med[n]
        print(f"  {n:<32}{m['total_ms']:>10.1f}{m['preprocess_ms']:>12.2f}{m['model_ms']:>10.1f}"
              f"{m['postprocess_ms']:>13.2f}", flush=True)
    print(f"  ratio vistrain / effdet latency: {ratio:.3f} (target <= 0.9) {'ok' if ratio <= 0.9 else 'ABOVE TARGET'}"
          f"  [round by round: {paired:.3f}]")
    for n in names[2:]:
        print(f"    {n}: {med[n]['total_ms'] / med[E]['total_ms']:.3f} of effdet's (information)")
    print(f"  other processes used {100 * other:.0f}% of the CPUs during the timed rounds; load average "
          f"{load_before:.2f} before, {load1():.2f} after", flush=True)
    profile = profile_sides({V: sides[V][0], E: sides[E][0]}, args.profile) if args.profile else None
    return {"imgsz": args.imgsz, "batch": 1, "threads": threads, "image": str(img_path), "weights": weights,
            "conf": conf, "rounds": args.rounds, "warmup_rounds": args.warmup_rounds, "median": med,
            "ratio_vistrain_over_effdet": ratio, "ratio_paired_median": paired, "target": 0.9,
            "ratios_info": {n: med[n]["total_ms"] / med[E]["total_ms"] for n in names[2:]},
            "per_round_total_ms": {n: [round(1e3 * t[0], 2) for t in times[n]] for n in names},
            "batchnorms": {V: v_bn, f"{V} + BN folded (info)": f_bn}, "score_candidates": logits,
            "outputs": agree, "other_cpu_share": other, "load_average_1min": {"before": load_before, "after": load1(),
                                                                               "waited_s": waited},
            "profile": profile,
            "timed": {V: "task.predict_preprocess + torch.stack + model (no_grad) + task.decode + task.predict_postprocess",
                      E: "task.predict_preprocess + torch.stack + normalise + DetBenchPredict (no_grad) + "
                         "score >= conf + scale_boxes_back"},
            "not_timed": "image read/decode (PIL image in memory), model build / load / fuse, drawing and saving"}


def profile_sides(fns: dict, iters: int) -> dict:
    """torch.profiler's top operators (self CPU time) of each side over ``iters`` calls, after 2 warm-up calls."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, fn in fns.items():
        for _ in range(2):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                fn()
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        out[name] = [{"op": e.key, "self_ms_per_call": e.self_cpu_time_total / 1e3 / iters, "calls": e.count // iters,
                      "share": e.self_cpu_time_total / max(total, 1)} for e in rows]
        print(f"\n  profile {name} (self CPU per image, {iters} images):")
        for row in out[name]:
            print(f"    {row['op']:<40}{row['self_ms_per_call']:>9.2f} ms {100 * row['share']:>5.1f}%  "
                  f"x{row['calls']}")
    return out


# ============================================================================================ training (2 and 3)
def effdet_targets(t: torch.Tensor, b: int, h: int, w: int) -> dict:
    """vistrain batch targets ``(image, class, cx, cy, w, h)`` normalised -> effdet's: per image ``bbox`` yxyx in
    pixels and ``cls`` 1-based, padded with -1 to the batch's most objects."""
    counts = torch.bincount(t[:, 0].long(), minlength=b) if len(t) else torch.zeros(b, dtype=torch.long)
    m = max(int(counts.max()), 1)
    bbox, cls = torch.zeros(b, m, 4), torch.full((b, m), -1.0)
    cx, cy, bw, bh = t[:, 2] * w, t[:, 3] * h, t[:, 4] * w, t[:, 5] * h
    yxyx = torch.stack((cy - bh / 2, cx - bw / 2, cy + bh / 2, cx + bw / 2), 1)
    for i in range(b):
        sel = t[:, 0] == i
        n = int(sel.sum())
        bbox[i, :n], cls[i, :n] = yxyx[sel], t[sel, 1] + 1
    return {"bbox": bbox, "cls": cls}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weights with decay; norm-layer weights, other 1-D weights (BiFPN fusion weights) and biases without: the rule
    of vistrain's trainer (and of timm's optimizer factory, which effdet's train.py uses)."""
    groups = [[], [], []]
    for module in model.modules():
        norm = "Norm" in type(module).__name__ or isinstance(module, torch.nn.modules.batchnorm._NormBase)
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                groups[2 if pname == "bias" else 1 if norm or p.ndim <= 1 else 0].append(p)
    return [{"params": groups[0], "weight_decay": weight_decay}, {"params": groups[1], "weight_decay": 0.0},
            {"params": groups[2], "weight_decay": 0.0}]


def group_sizes(groups) -> list[list[int]]:
    """(tensors, elements) per optimizer group, to check that both sides decay the same parameters."""
    return [[len(g["params"]), sum(p.numel() for p in g["params"])] for g in groups]


def bn_momentum(model: torch.nn.Module) -> float:
    """The BatchNorm running-statistics momentum of ``model`` (vistrain's EfficientDet: 0.1 by default)."""
    return next(m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def train_loader(cfg: dict):
    """vistrain's training DataLoader for ``cfg`` (the trainer's: ``build_data`` + ``make_loader`` with epoch keys)."""
    from vistrain.engine.validator import make_loader
    from vistrain.tasks.detect import DetectTask

    task = DetectTask()
    task.cfg = cfg
    data = task.build_data(cfg)
    return make_loader(data.train, task, cfg["batch"], cfg["workers"], shuffle=True, seed=cfg["seed"],
                       device=torch.device("cpu"), epoch_keys=True)


def effdet_train(state_dict: dict, loader, cfg: dict, epochs: int, on_step=None, momentum_bn: float = 0.1,
                 info: dict | None = None) -> tuple[dict, dict]:
    """The plain effdet loop: effdet's EfficientDet + ``DetBenchTrain`` (its labeler and loss), torch AdamW,
    linear warmup / decay, gradient clipping and an EMA written out here -- the recipe of vistrain's trainer.
    ``momentum_bn``: the BatchNorms' running-statistics momentum (effdet's config: 0.01; vistrain's default 0.1).
    ``on_step()`` after every optimizer step; True stops.  Returns (EMA state_dict, last epoch's mean losses);
    ``info`` receives the optimizer groups' sizes."""
    effdet = import_effdet()
    imgsz = cfg["imgsz"]
    model = effdet_model(state_dict, imgsz)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum_bn
    bench = effdet.DetBenchTrain(model, create_labeler=True)
    groups = param_groups(model, cfg["weight_decay"])
    if info is not None:
        info["optimizer_groups"] = group_sizes(groups)
    opt = torch.optim.AdamW(groups, lr=cfg["lr0"], betas=(cfg["momentum"], 0.999))
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    updates = 0
    nb = len(loader)
    warmup_iters = round(min(cfg["warmup_epochs"], max(epochs - 1, 0)) * nb) if cfg["warmup_epochs"] > 0 else 0

    def lf(epoch: int) -> float:
        return max(1 - epoch / epochs, 0) * (1.0 - cfg["lrf"]) + cfg["lrf"]

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = {}
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        bench.train()
        sums, count = torch.zeros(2), 0
        for i, batch in enumerate(loader):
            ni = i + nb * epoch
            for j, g in enumerate(opt.param_groups):  # vistrain: warmup from 0 (biases: from warmup_bias_lr)
                g["lr"] = cfg["lr0"] * lf(epoch)
                if warmup_iters and ni <= warmup_iters:
                    start = cfg["warmup_bias_lr"] if j == 2 else 0.0
                    g["lr"] = float(np.interp(ni, [0, warmup_iters], [start, g["lr"]]))
            img = batch["img"]
            x = (img.float().div_(255.0) - mean) / std
            out = bench(x, effdet_targets(batch["targets"], img.shape[0], img.shape[2], img.shape[3]))
            out["loss"].backward()
            if cfg["clip_grad"]:  # vistrain clips the gradient of (mean loss x batch) at clip_grad
                torch.nn.utils.clip_grad_norm_(params, max_norm=cfg["clip_grad"] / img.shape[0])
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cfg["ema"]:
                updates += 1
                d = EMA_DECAY * (1 - math.exp(-updates / EMA_TAU))
                with torch.no_grad():
                    msd = model.state_dict()
                    for k, v in ema.state_dict().items():
                        if v.dtype.is_floating_point:
                            v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            sums += torch.stack((50.0 * out["box_loss"].detach(), out["class_loss"].detach()))
            count += 1
            if on_step is not None and on_step():
                return nchw_state(ema if cfg["ema"] else model), {}
        losses = {"box_loss": float(sums[0] / count), "cls_loss": float(sums[1] / count)}
    return nchw_state(ema if cfg["ema"] else model), losses


def train_cfg(args, project: Path, name: str, seed: int, imgsz: int, batch: int, epochs: int, workers: int,
              threads: int, **extra) -> dict:
    overrides = dict(model="efficientdet-d0", data=str(voc_root()), imgsz=imgsz, batch=batch, epochs=epochs,
                     workers=workers, threads=threads, device="cpu", seed=seed, plots=False, verbose=False,
                     project=str(project), name=name, exist_ok=True, **{**RECIPE, **extra})
    return vistrain_cfg("train", **overrides)


# ============================================================================================ 2. throughput
def run_vistrain_steps(cfg: dict, args, may_abort: bool) -> dict:
    def on_start(tr, seen: dict) -> None:
        seen.update(optimizer_groups=group_sizes(tr.optimizer.param_groups), bn_momentum=bn_momentum(tr.model))

    return run_trainer_steps(cfg, args, may_abort, on_start)


def run_effdet_steps(cfg: dict, state: dict, args, may_abort: bool, momentum_bn: float) -> dict:
    torch.set_num_threads(cfg["threads"])
    torch.use_deterministic_algorithms(False)  # a plain loop: torch's default (vistrain's run set it process-wide)
    torch.manual_seed(cfg["seed"])
    with quiet(args.show_progress):
        loader = train_loader(cfg)
    clock = StepClock(args, may_abort)
    seen = {"workers": loader.num_workers}

    def on_step() -> bool:
        seen["threads"] = torch.get_num_threads()
        return clock.step_end()

    effdet_train(state, loader, cfg, epochs=1, on_step=on_step, momentum_bn=momentum_bn, info=seen)
    seen["bn_momentum"] = momentum_bn
    seen["children"] = len(getattr(clock.cpu, "pids", [0])) - 1
    del loader
    gc.collect()
    return {**clock.result(cfg["batch"]), **seen}


def bench_train(args, tmp: Path) -> dict:
    from vistrain.nn.model import build_model

    threads = args.threads or resolve_threads(0, args.workers)  # vistrain's auto choice for this config
    torch.set_num_threads(threads)
    cfg = train_cfg(args, tmp / "runs", "throughput", 0, args.train_imgsz, args.batch, 1, args.workers, threads,
                    warmup_epochs=0.0)
    torch.manual_seed(0)
    fresh = build_model("efficientdet-d0", num_classes=NC)
    state = nchw_state(fresh)  # effdet's weights: a fresh D0, as vistrain's
    momentum_bn = bn_momentum(fresh)  # vistrain's BatchNorm momentum, given to effdet's model too
    print(f"EfficientDet-D0 training, CPU, batch {args.batch}, {args.train_imgsz} px, {threads} torch threads, "
          f"{args.workers} workers, {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} runs per side",
          flush=True)
    load_before, waited = wait_for_quiet(args.max_load, args.max_wait)
    top_before = top_snapshot()
    print(f"  load average (1 min) {load_before:.2f} (waited {waited:.0f} s)\n" + "\n".join(
        "    " + ln for ln in top_before.splitlines()), flush=True)
    sides = [V, E]
    runs = {s: [] for s in sides}
    discarded = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            for attempt in range(args.retries + 1):
                last = attempt == args.retries
                if side == V:
                    res = run_vistrain_steps(dict(cfg), args, may_abort=not last)
                else:
                    res = run_effdet_steps(cfg, state, args, may_abort=not last, momentum_bn=momentum_bn)
                share = res["other_cpu_share"]
                busy = share is not None and share > args.max_other
                mark = ("" if not busy else f"  DISCARDED after {res['timed_steps']} steps: machine busy" if not last
                        else "  (machine busy; kept, out of retries)")
                other = f", other processes {100 * share:.0f}% CPU" if share is not None else ""
                print(f"  run {r + 1}/{args.repeats} {side:<9} {res['img_per_s']:6.2f} img/s (median step "
                      f"{res['step_s_median']:.2f} s, {res['threads']} threads, {res['workers']} workers{other})"
                      f"{mark}", flush=True)
                if busy and not last:
                    discarded[side].append(res)
                    wait_for_idle(args.max_other, args.max_wait)
                    continue
                runs[side].append(res)
                break
    med = {s: statistics.median(r["img_per_s"] for r in runs[s]) for s in sides}
    ratio = med[V] / med[E]
    paired = statistics.median(a["img_per_s"] / b["img_per_s"] for a, b in zip(runs[V], runs[E]))
    load_after = load1()
    top_after = top_snapshot()
    print(f"  median img/s: vistrain {med[V]:.2f}, effdet {med[E]:.2f}")
    print(f"  ratio vistrain / effdet training img/s: {ratio:.3f} (target >= 1.0) "
          f"{'ok' if ratio >= 1.0 else 'BELOW TARGET'}  [run by run: {paired:.3f}]")
    print(f"  load average (1 min): {load_before:.2f} before, {load_after:.2f} after (this benchmark included)",
          flush=True)
    return {"imgsz": args.train_imgsz, "batch": args.batch, "threads": threads, "workers": args.workers,
            "warmup_steps": args.warmup, "timed_steps": args.steps, "repeats": args.repeats,
            "img_per_s_median": med, "ratio_vistrain_over_effdet": ratio, "ratio_paired_median": paired, "target": 1.0,
            "runs": runs, "discarded_runs": discarded,
            "recipe": {**RECIPE, "warmup_epochs": 0.0, "bn_momentum": momentum_bn},
            "timed": {V: "Trainer.train_epoch, on_batch_end to on_batch_end: data wait, preprocess, forward, "
                         "EffDetLoss, backward, clip, AdamW, EMA, progress bar",
                      E: "effdet_train: data wait (same vistrain DataLoader), float/255 + normalise, targets to "
                         "effdet's format, DetBenchTrain (forward, AnchorLabeler, DetectionLoss), backward, clip, "
                         "AdamW, EMA"},
            "load_average_1min": {"before": load_before, "after": load_after, "waited_s": waited},
            "top_before": top_before, "top_after": top_after}


# ============================================================================================ 3. accuracy
def evaluate(state: dict, cfg: dict) -> dict:
    """vistrain's validator on the val split with ``state`` in a vistrain efficientdet-d0 (the same for both sides)."""
    from vistrain.engine.validator import make_loader, run_validation
    from vistrain.nn.model import build_model, set_memory_format
    from vistrain.tasks.detect import DetectTask

    vcfg = {**cfg, "_mode": "val"}
    task = DetectTask()
    with quiet(False):
        data = task.build_data(vcfg, need_train=False)
    model = build_model("efficientdet-d0", num_classes=len(data.names))
    model.load_state_dict(state, strict=True)
    set_memory_format(model, vcfg["channels_last"])
    task.setup_model(model, data, vcfg, train=False)
    loader = make_loader(data.val, task, vcfg["batch"], vcfg["workers"], shuffle=False, device=torch.device("cpu"))
    metrics, losses = run_validation(model, loader, task, data.names, torch.device("cpu"), progress=False)
    res = metrics.results()
    return {"mAP50-95": res["metrics/mAP50-95(B)"], "mAP50": res["metrics/mAP50(B)"],
            "VOC_AP50": res.get("metrics/VOC_AP50(B)"), "val_box_loss": float(losses[0]),
            "val_cls_loss": float(losses[1])}


def paired_stats(a: list[float], b: list[float]) -> dict:
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else float("nan")
    mean_d = statistics.fmean(d)
    level = n > 1 and abs(mean_d) <= 2 * se
    return {"n": n, "mean_vistrain": statistics.fmean(a), "mean_effdet": statistics.fmean(b), "mean_diff": mean_d,
            "paired_se": se, "diffs": d, "level_within_2se": level}


def bench_accuracy(args, tmp: Path, out_path: Path, write) -> dict:
    import csv

    from vistrain.engine.checkpoint import load_checkpoint
    from vistrain.engine.trainer import Trainer

    threads = args.threads or resolve_threads(0, args.acc_workers)
    plan = {"imgsz": args.acc_imgsz, "batch": args.acc_batch, "epochs": args.epochs, "seeds": args.seeds,
            "workers": args.acc_workers, "threads": threads, "recipe": RECIPE,
            "evaluation": "EMA weights after the last epoch, vistrain efficientdet-d0 + vistrain validator, val split"}
    print(f"EfficientDet-D0 accuracy: {args.epochs} epochs, {args.acc_imgsz} px, batch {args.acc_batch}, seeds "
          f"{args.seeds}, {threads} torch threads, {args.acc_workers} workers", flush=True)
    result = {"plan": plan, "seeds": {}}
    for seed in args.seeds:
        row = {}
        cfg = train_cfg(args, tmp / "runs", f"acc-v{seed}", seed, args.acc_imgsz, args.acc_batch, args.epochs,
                        args.acc_workers, threads)
        init = {}
        trainer = Trainer(cfg)
        trainer.add_callback("on_train_start", lambda tr: init.update(
            state=nchw_state(tr.model), bn=bn_momentum(tr.model), groups=group_sizes(tr.optimizer.param_groups)))
        t0 = time.time()
        (best, other_v) = other_share_during(lambda: _train_quiet(trainer, args))
        v_time = time.time() - t0
        save_dir = Path(best["save_dir"])
        v_last = load_checkpoint(save_dir / "weights" / "last.pt")["model"]
        with open(save_dir / "results.csv", newline="") as f:
            last_row = list(csv.DictReader(f))[-1]
        row[V] = {**evaluate(v_last, cfg), "train_s": v_time, "other_cpu_share": other_v,
                  "last_epoch_train_loss": {"box_loss": float(last_row["train/box_loss"]),
                                            "cls_loss": float(last_row["train/cls_loss"])},
                  "best_pt_info": {"mAP50-95": best.get("metrics/mAP50-95(B)"), "mAP50": best.get("metrics/mAP50(B)"),
                                   "best_epoch": best.get("best_epoch")}}
        del trainer
        gc.collect()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
        torch.manual_seed(seed)
        with quiet(args.show_progress):
            loader = train_loader(cfg)
        t0 = time.time()
        e_info = {}
        ((e_state, e_losses), other_e) = other_share_during(lambda: effdet_train(
            init["state"], loader, cfg, args.epochs, momentum_bn=init["bn"], info=e_info))
        if e_info["optimizer_groups"] != init["groups"]:
            print(f"  WARNING: optimizer groups differ: vistrain {init['groups']}, effdet loop "
                  f"{e_info['optimizer_groups']}", flush=True)
        e_time = time.time() - t0
        del loader
        gc.collect()
        row[E] = {**evaluate(e_state, cfg), "train_s": e_time, "other_cpu_share": other_e,
                  "last_epoch_train_loss": e_losses, "optimizer_groups": e_info["optimizer_groups"],
                  "bn_momentum": init["bn"]}
        row[V]["optimizer_groups"], row[V]["bn_momentum"] = init["groups"], init["bn"]
        result["seeds"][str(seed)] = row
        print(f"  seed {seed}: mAP50-95 vistrain {row[V]['mAP50-95']:.4f} effdet {row[E]['mAP50-95']:.4f}; mAP50 "
              f"{row[V]['mAP50']:.4f} / {row[E]['mAP50']:.4f} (train {v_time / 60:.1f} / {e_time / 60:.1f} min; "
              f"last-epoch train loss box+cls {sum(row[V]['last_epoch_train_loss'].values()):.3f} / "
              f"{sum(e_losses.values()):.3f})", flush=True)
        seeds = list(result["seeds"])
        for metric in ("mAP50-95", "mAP50"):
            result[f"summary_{metric}"] = paired_stats([result["seeds"][s][V][metric] for s in seeds],
                                                       [result["seeds"][s][E][metric] for s in seeds])
        write(result)  # after every seed, so a cut-off run keeps what it finished
    for metric in ("mAP50-95", "mAP50"):
        s = result[f"summary_{metric}"]
        verdict = ("one seed: no standard error" if s["n"] < 2 else "level (within two standard errors)"
                   if s["level_within_2se"] else "NOT level")
        print(f"  {metric}: mean vistrain {s['mean_vistrain']:.4f}, effdet {s['mean_effdet']:.4f}, difference "
              f"{s['mean_diff']:+.4f} (paired standard error {s['paired_se']:.4f}): "
              f"{verdict}", flush=True)
    return result


def _train_quiet(trainer, args):
    with quiet(args.show_progress):
        return trainer.train()


# ============================================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="latency,train", help="latency, train, accuracy, or a comma list "
                   "(default latency,train; accuracy takes ~40 minutes)")
    g = p.add_argument_group("latency")
    g.add_argument("--imgsz", type=int, default=512, help="inference size (default 512, D0's own)")
    g.add_argument("--rounds", type=int, default=40, help="timed rounds; a round runs every line once (default 40)")
    g.add_argument("--warmup-rounds", type=int, default=5, help="untimed rounds first (default 5)")
    g.add_argument("--weights", default=None, help="a vistrain checkpoint for both sides (default: a fresh model)")
    g.add_argument("--image", default=None, help="image to predict (default: the first VOC val image)")
    g.add_argument("--profile", type=int, default=0, metavar="N", help="torch.profiler top ops over N images per side")
    g = p.add_argument_group("training throughput")
    g.add_argument("--train-imgsz", type=int, default=512)
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run (default 3)")
    g.add_argument("--repeats", type=int, default=3, help="runs per side, counterbalanced (default 3)")
    g.add_argument("--workers", type=int, default=2, help="loader workers, both sides (default 2)")
    g = p.add_argument_group("accuracy")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--seeds", default="0,1,2")
    g.add_argument("--acc-imgsz", type=int, default=128)
    g.add_argument("--acc-batch", type=int, default=16)
    g.add_argument("--acc-workers", type=int, default=1)
    g = p.add_argument_group("machine")
    g.add_argument("--threads", type=int, default=0, help="torch threads, both sides (0: vistrain's auto choice)")
    g.add_argument("--max-load", type=float, default=1.0, help="wait until the 1-min load average is below this")
    g.add_argument("--max-wait", type=float, default=120.0, help="longest wait for a quiet machine, seconds")
    g.add_argument("--max-other", type=float, default=0.10,
                   help="a training run during which other processes used more than this share of the CPUs is repeated")
    g.add_argument("--retries", type=int, default=2)
    p.add_argument("--show-progress", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: every part, tiny")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in ("latency,train,accuracy" if args.quick and args.part == "latency,train"
                                      else args.part).split(",") if s.strip()]
    if set(args.parts) - {"latency", "train", "accuracy"}:
        p.error("--part takes latency, train, accuracy")
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if args.quick:
        args.imgsz, args.rounds, args.warmup_rounds = 256, 3, 1
        args.train_imgsz, args.steps, args.warmup, args.repeats, args.retries, args.max_wait = 128, 2, 1, 1, 0, 0.0
        args.epochs, args.seeds = 1, [0]
    if args.out is None:
        args.out = QUICK_RESULTS if args.quick else RESULTS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path: Path = args.out
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}

    def write(part: str, value) -> None:
        previous[part] = value
        previous["benchmark"] = "EfficientDet-D0 on CPU: vistrain vs effdet, same weights (bench/efficientdet.py)"
        previous["machine"] = machine_info()
        previous[f"{part}_date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(previous, indent=1) + "\n")

    if args.quick:
        previous["note"] = "--quick smoke run: not a measurement"
    with tempfile.TemporaryDirectory(prefix="vistrain-bench-effdet-") as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("VISTRAIN_CACHE", str(tmp / "vistrain-cache"))
        with quiet(args.show_progress):
            voc_root()  # makes the built-in dataset once if needed
        for part in args.parts:
            print(f"\n=== {part} ===", flush=True)
            if part == "latency":
                write(part, bench_latency(args))
            elif part == "train":
                write(part, bench_train(args, tmp))
            else:
                bench_accuracy(args, tmp, out_path, lambda r: write("accuracy", r))
    print(f"results written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
