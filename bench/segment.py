"""YOLOv8n-seg trained from scratch on the built-in shapes, vistrain vs ultralytics, in one script, on CPU.

Reported (and written to ``bench/results/segment.json``), for each side:

1. Accuracy: box and mask mAP50-95 / mAP50 of each side's final ``best`` weights on the validation
   split, scored by pycocotools (``COCOeval`` bbox and segm) against one ground truth (vistrain's
   ``annotations.json``: the label polygons rasterised by pycocotools).  The two sides' weights load into
   either model (equal state_dicts), so both go through both input pipelines, conf 0.001, iou 0.7,
   max_det 300, masks at the original image size: ``val`` (``vistrain val save_json=True``: rect batches
   padded by half a stride, as both validators do) and ``predict`` (ultralytics' predictor, letterboxed
   to imgsz without padding, ``retina_masks=True``).  The pipelines differ by ~20% on this data; each
   side is compared with the other only within one.  Each side's own validator numbers are printed too,
   for information (ultralytics' validator assigns several classes per box).
2. Training speed: images per second over the training batches of every epoch but the first (from the
   first epoch's start to each epoch's last batch; validation, checkpointing and plots not timed).  Over
   seeds: the ratio of each side's median, and the median of the per-seed ratios (a seed's two runs are
   back to back, so that one is less exposed to a shared host's speed drifting over hours).
3. Inference latency (ms, batch 1): one validation image letterboxed to ``--imgsz`` once, the same float
   tensor for both; timed: forward of the eval-mode trained model + NMS (conf 0.25, iou 0.7) + the masks
   of the kept boxes at the input size.  vistrain: ``model(x)`` + ``SegmentTask.postprocess`` +
   ``masks_from_protos``; ultralytics: ``model(x)`` + ``ultralytics.utils.nms.non_max_suppression`` +
   ``ultralytics.utils.ops.process_mask(upsample=True)``.  Both models as their predictors run them:
   Conv+BN fused (vistrain's ``fuse=True`` default, ultralytics' predictor), and vistrain's weights NHWC
   (its ``channels_last=True`` default; ultralytics keeps NCHW).  Printed for information: the unfused
   pair, and vistrain fused but NCHW (the layout's share of the difference).  Round robin, medians.
4. Validation loss (box, seg, cls, dfl) of each side's ``best`` and ``last`` weights, computed by the same code on
   the same batches (the ``val`` pipeline's), and each side's per-epoch loss curves from its ``results.csv`` (each
   side's own validator; both validate in batches of 2 x batch during training, as ultralytics does, since vistrain
   adopted it; in runs before that vistrain's were 16 images against ultralytics' 32, and the loss is normalised
   per batch, so those curves' levels are not comparable with each other).  ``--report`` compares the losses too.

Both sides train with their shipped defaults (optimizer auto, SGD/AdamW choice, lr, warmup, EMA,
augmentation, close_mosaic 10 or fewer on short runs), with the same data, epochs, imgsz, batch, workers and
torch threads (ultralytics on CPU would otherwise force workers=0 and cpu_count - 1 threads; the script
undoes both, as bench/detect.py does), deterministic off, once per seed of ``--seeds`` (0, 1, 2): accuracy
is the mean over seeds (one 10-epoch run from scratch swings by +/-30% with the seed), training speed the
median; inference uses the first seed's checkpoints.

Data: ``vistrain.data.synthetic.make_dataset(n=--n, imgsz=--imgsz)`` (the built-in shapes generator; its
``segment/data.yaml`` is read by both sides).  Offline: ``YOLO_OFFLINE=1``, settings and caches in a temp
dir, internet sockets refused for the whole run.

    .venv/bin/python bench/segment.py                 # full run (defaults below), ~50 min on 2 cores (3 seeds)
    .venv/bin/python bench/segment.py --quick         # smoke run: 60 images, 1 epoch, 128 px (~1 min)
    .venv/bin/python bench/segment.py --extend --seeds 7,8,9   # more seeds added to bench/results/segment.json
    .venv/bin/python bench/segment.py --report        # the seeds in the file compared: difference, standard error, p
    .venv/bin/python bench/segment.py --nbs 16 --out bench/results/segment-nbs16.json   # an optimizer step per batch
    .venv/bin/python bench/segment.py --epochs 24 --nbs 16 --out bench/results/segment-e24-nbs16.json   # runs that
        # converge (box mAP50-95 ~0.8, +/-0.03 per seed; ~45 min a seed on 2 cores): where accuracy is decided
    .venv/bin/python bench/segment.py --epochs 48 --nbs 16 --out bench/results/segment-e48-nbs16.json   # slow
        # starts caught up (box ~0.9, every run 0.887-0.913 so far; ~58 min a seed on 2 cores)
    .venv/bin/python bench/segment.py --device 0 --seeds 0,1,...,59 --out ...   # many seeds on a GPU (both sides)
    .venv/bin/python bench/segment.py --merge a.json b.json --out ...   # runs made side by side, in one file
    .venv/bin/python bench/segment.py --keep /tmp/seg   # keep data, runs (results.csv), weights and val outputs

Each run also stores (and prints) pycocotools' box mAP50-95 per class.

Accuracy is compared over seeds: the summary gives each difference of means with its standard error and a
permutation test's p-value, since one run's box mAP50-95 has a standard deviation of 0.006-0.011 here, larger
than the differences looked for.  A seed's two runs start from the same weights (both seed torch with it and
build the same modules in the same order; checked per run, ``same_init``) but draw their data order and
augmentation independently, so the summary also compares seeds as pairs (``paired``: mean per-seed difference,
its standard error, a sign-flip test): this sharpens the validation-loss comparison (the sides' losses
correlate ~0.6 over seeds), hardly the mAP one (~0.1).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuMonitor, block_internet, cpu_name, load1, quiet, wait_for_quiet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "segment.json"
QUICK_RESULTS = RESULTS.with_name("segment-quick.json")
V, P = "vistrain", "ultralytics"
CONF, IOU, MAX_DET = 0.25, 0.7, 300


class EpochClock:
    """Training seconds per epoch: from the epoch's start to its last batch's end."""

    def __init__(self):
        self.starts, self.ends, self.batches, self.monitor = [], [], [], CpuMonitor()

    def epoch_start(self, *_):
        if not self.starts:
            self.monitor.start()  # the loader's workers exist by now
        self.starts.append(time.perf_counter())
        self.ends.append(None)
        self.batches.append(0)

    def batch_end(self, *_):
        self.ends[-1] = time.perf_counter()
        self.batches[-1] += 1

    def result(self, n_train: int) -> dict:
        secs = [e - s for s, e in zip(self.starts, self.ends) if e is not None]
        timed = secs[1:] if len(secs) > 1 else secs
        return {"epoch_train_s": secs, "img_per_s": n_train * len(timed) / sum(timed),
                "other_cpu_share": self.monitor.share()}


def initial_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_vistrain(data_yaml: Path, project: Path, args) -> tuple[Path, dict]:
    from vistrain.config import get_config
    from vistrain.engine.trainer import Trainer

    overrides = dict(model="yolov8n-seg", data=str(data_yaml), epochs=args.epochs, imgsz=args.imgsz,
                     batch=args.batch, workers=args.workers, device=args.device, seed=args.seed, deterministic=False,
                     project=str(project), name="vistrain", exist_ok=True, amp=args.amp)
    if args.nbs:
        overrides["nbs"] = args.nbs
    cfg = get_config(overrides)
    cfg["_user_keys"] = sorted(overrides)
    torch.set_num_threads(args.threads)
    trainer = Trainer(cfg)
    init = []
    trainer.add_callback("on_train_start", lambda tr: init.append(initial_state(tr.model)))
    clock = EpochClock()
    trainer.add_callback("on_epoch_start", clock.epoch_start)
    trainer.add_callback("on_batch_end", clock.batch_end)
    with quiet(args.show_progress):
        res = trainer.train()
    return Path(res["save_dir"]) / "weights" / "best.pt", {"clock": clock, "accumulate": trainer.accumulate,
                                                           "init": init[0], "own": {
        k: float(v) for k, v in res.items() if k.startswith("metrics/")}}


def train_ultralytics(data_yaml: Path, project: Path, args) -> tuple[Path, dict]:
    from ultralytics import YOLO
    from ultralytics.models.yolo.segment import SegmentationTrainer

    workers = args.workers

    class BenchTrainer(SegmentationTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.args.workers = workers  # ultralytics sets workers=0 on CPU

        def get_model(self, *a, **k):
            model = super().get_model(*a, **k)
            init.append(initial_state(model))
            return model

    clock, held, init = EpochClock(), [], []

    def on_train_start(tr):
        held.append(tr)
        torch.set_num_threads(args.threads)  # its select_device set cpu_count - 1 threads

    model = YOLO("yolov8n-seg.yaml", task="segment")
    model.add_callback("on_train_start", on_train_start)
    model.add_callback("on_train_epoch_start", clock.epoch_start)
    model.add_callback("on_train_batch_end", clock.batch_end)
    torch.set_num_threads(args.threads)
    extra = {"nbs": args.nbs} if args.nbs else {}
    with quiet(args.show_progress):
        model.train(trainer=BenchTrainer, **extra, data=str(data_yaml), epochs=args.epochs, imgsz=args.imgsz,
                    batch=args.batch, workers=args.workers, device=args.device, seed=args.seed, deterministic=False,
                    project=str(project), name="ultralytics", exist_ok=True, pretrained=False, plots=False,
                    amp=args.amp)
    tr = held[0]
    for loader in (getattr(tr, "train_loader", None), getattr(tr, "test_loader", None)):
        if hasattr(loader, "close"):
            loader.close()
    own = {}
    m = getattr(tr, "metrics", None) or {}
    for k in ("metrics/mAP50-95(B)", "metrics/mAP50(B)", "metrics/mAP50-95(M)", "metrics/mAP50(M)"):
        if k in m:
            own[k] = float(m[k])
    torch.set_num_threads(args.threads)
    return Path(tr.best), {"clock": clock, "accumulate": tr.accumulate, "init": init[0], "own": own}


# ---------------------------------------------------------------------------------------------- accuracy
def cocoeval(annotations: Path, predictions: list) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        dt = gt.loadRes(predictions) if predictions else None
        for iou_type, x in (("bbox", "B"), ("segm", "M")):
            if dt is None:
                out[f"mAP50-95({x})"] = out[f"mAP50({x})"] = 0.0
                continue
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
            out[f"mAP50-95({x})"], out[f"mAP50({x})"] = float(ev.stats[0]), float(ev.stats[1])
            # per class (COCO's own averaging, one category at a time): area all, maxDets 100
            prec = ev.eval["precision"][:, :, :, 0, -1]  # [iou, recall, category]
            out[f"per_class_mAP50-95({x})"] = {
                gt.cats[c]["name"]: float(prec[:, :, k][prec[:, :, k] > -1].mean()) if (prec[:, :, k] > -1).any()
                else None for k, c in enumerate(ev.params.catIds)}
    return out


def _swap_weights(best: dict, tmp: Path) -> dict:
    """Each side's trained weights in both containers (the state_dicts have equal keys and shapes;
    tests/test_yolov8_oracle.py shows equal outputs): {side: (vistrain checkpoint path, ultralytics YOLO)}."""
    from ultralytics import YOLO

    from vistrain.engine.checkpoint import load_checkpoint, save_checkpoint

    v_ckpt = load_checkpoint(best[V])
    ul_own, ul_v = YOLO(str(best[P])), YOLO(str(best[P]))
    ul_v.model.load_state_dict(v_ckpt["model"], strict=True)
    ul_sd = ul_own.model.state_dict()
    ul_as_v = tmp / "ultralytics-weights-in-vistrain.pt"
    save_checkpoint({**v_ckpt, "model": {k: ul_sd[k].float() for k in v_ckpt["model"]}}, ul_as_v)
    return {V: (best[V], ul_v), P: (ul_as_v, ul_own)}


def accuracy(best: dict, data_root: Path, project: Path, args) -> tuple[dict, dict]:
    """Both checkpoints through both evaluation pipelines, every prediction list scored by pycocotools
    against vistrain's annotations.json, so that a difference in the input pipeline cannot pass for a
    difference in training (rect val batches padded by half a stride, as both validators do, score
    ~20% lower than unpadded letterboxed inputs on this data):

    - ``val``: ``vistrain val save_json=True`` (rect batches, pad 0.5 stride);
    - ``predict``: ultralytics' predictor per image (letterbox to imgsz, no padding), ``retina_masks``.

    Also returned: per side, the loss of its weights on the validation split (box, seg, cls, dfl; vistrain's
    loss, equal to ultralytics', over the ``val`` pipeline's batches): a measure of how far training got that
    spreads less from seed to seed (5-10% of its mean) than the mAP of a run just begun to detect (~30%).
    """
    import vistrain
    from pycocotools import mask as mask_utils

    weights = _swap_weights(best, project)
    data_yaml = str(data_root / "segment" / "data.yaml")
    scores: dict[str, dict] = {"val": {}, "predict": {}}
    losses: dict[str, dict] = {}
    for side, (v_pt, model) in weights.items():
        with quiet(args.show_progress):
            res = vistrain.val(model=str(v_pt), data=data_yaml, save_json=True, conf=0.001, iou=IOU, device=args.device,
                               imgsz=args.imgsz, batch=args.batch, workers=args.workers, project=str(project),
                               name=f"val-{side}", exist_ok=True)
        losses[side] = {k.split("/")[1]: float(v) for k, v in res.items() if k.startswith("val/")}
        out_dir = Path(res["save_dir"])
        annotations = out_dir / "annotations.json"
        scores["val"][side] = cocoeval(annotations, json.loads((out_dir / "predictions.json").read_text()))

        preds = []
        with quiet(args.show_progress):
            for im in json.loads(annotations.read_text())["images"]:
                r = model.predict(im["file_name"], conf=0.001, iou=IOU, imgsz=args.imgsz, max_det=MAX_DET,
                                  retina_masks=True, verbose=False, device=args.device)[0]
                if r.masks is None:
                    continue
                masks = np.asfortranarray(r.masks.data.cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
                for box, score, c, rle in zip(r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), r.boxes.cls.tolist(),
                                              mask_utils.encode(masks)):
                    preds.append({"image_id": im["id"], "category_id": int(c) + 1, "score": score,
                                  "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                  "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}})
        scores["predict"][side] = cocoeval(annotations, preds)
    return scores, losses


def last_losses(best: dict, data_root: Path, project: Path, args) -> dict:
    """Per side, the validation loss (as in :func:`accuracy`) of its ``last`` weights (the final epoch's EMA), beside
    ``best``'s: ``best`` is whichever epoch its own validator scored highest, which adds the noise of that choice."""
    import vistrain

    last = {side: Path(p).with_name("last.pt") for side, p in best.items()}
    weights = _swap_weights(last, project / "last")
    losses = {}
    for side, (v_pt, _) in weights.items():
        with quiet(args.show_progress):
            res = vistrain.val(model=str(v_pt), data=str(data_root / "segment" / "data.yaml"), conf=0.001, iou=IOU,
                               device=args.device, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
                               project=str(project), name=f"val-last-{side}", exist_ok=True, plots=False)
        losses[side] = {k.split("/")[1]: float(v) for k, v in res.items() if k.startswith("val/")}
    return losses


# ---------------------------------------------------------------------------------------------- inference
def inference(best: dict, data_root: Path, args) -> dict:
    from ultralytics import YOLO
    from ultralytics.utils import ops
    from ultralytics.utils.nms import non_max_suppression as ul_nms

    from vistrain.data.augment import letterbox
    from vistrain.data.image import load_rgb_array
    from vistrain.nn.model import build_model
    from vistrain.ops.masks import masks_from_protos
    from vistrain.tasks.segment import SegmentTask

    image = sorted((data_root / "segment" / "images" / "val").iterdir())[0]
    img, _, _ = letterbox(load_rgb_array(image), args.imgsz)
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div(255)[None]
    hw = tuple(x.shape[2:])

    from vistrain.nn.model import fuse_conv_bn, set_memory_format

    # vistrain as its predictor runs it (channels_last=true by default): fused, NHWC weights
    ours = set_memory_format(build_model(str(best[V])).eval(), True)
    ours_fused = set_memory_format(fuse_conv_bn(build_model(str(best[V])).eval()), True)
    ours_nchw = fuse_conv_bn(build_model(str(best[V])).eval())
    task = SegmentTask()
    task.setup_model(ours, None, {"box": None, "cls": 0.5, "dfl": 1.5, "overlap_mask": True, "model": "best"},
                     train=False)
    settings = {"conf": CONF, "iou": IOU, "max_det": MAX_DET, "classes": None, "agnostic": False}

    def vis_runner(m):
        def run():
            preds = m(x)
            det = task.postprocess(preds, settings)[0]
            return det, masks_from_protos(det[:, 6:], preds[2][0], det[:, :4], hw)
        return run

    theirs = YOLO(str(best[P])).model.float().eval()
    fused = YOLO(str(best[P])).model.float().eval().fuse(verbose=False)
    nc = theirs.model[-1].nc

    def ul_runner(m):
        def run():
            (y, proto), _ = m(x)
            det = ul_nms(y, CONF, IOU, nc=nc, max_det=MAX_DET)[0]
            return det, ops.process_mask(proto[0], det[:, 6:], det[:, :4], hw, upsample=True)
        return run

    runners = {V: vis_runner(ours_fused), P: ul_runner(fused), f"{V} unfused (info)": vis_runner(ours),
               f"{P} unfused (info)": ul_runner(theirs), f"{V} fused, NCHW (info)": vis_runner(ours_nchw)}
    times = {k: [] for k in runners}
    counts = {}
    with torch.inference_mode():
        for k, fn in runners.items():
            counts[k] = len(fn()[0])  # warm-up
        names = list(runners)
        for rnd in range(args.infer_rounds):
            for k in (names if rnd % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                runners[k]()
                times[k].append(time.perf_counter() - t0)
    return {k: {"ms_median": 1e3 * statistics.median(v), "detections": counts[k]} for k, v in times.items()}


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500, help="images generated (80%% train, 20%% val)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--nbs", type=int, default=None,
                   help="nominal batch size for both sides (default: each side's default, 64: one optimizer step per "
                        "4 batches of 16); --nbs 16 steps every batch, 4x the updates in the same time")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu",
                   help="training and accuracy on this device for both sides (cpu, or a GPU index such as 0, for many "
                        "seeds); inference latency is always timed on the CPU")
    p.add_argument("--amp", action="store_true", help="mixed precision on a GPU, both sides (default off on both)")
    p.add_argument("--infer-rounds", type=int, default=60)
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2],
                   help="training seeds, comma-separated: each side trains once per seed, accuracy is the mean "
                        "over seeds (one 10-epoch run from scratch varies by +/-30%%); the data is always seed 0")
    p.add_argument("--max-load", type=float, default=1.0)
    p.add_argument("--max-wait", type=float, default=600.0)
    p.add_argument("--show-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 60 images, 1 epoch, 128 px, 10 rounds")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep", type=Path, default=None,
                   help="work in this directory and keep it (data, runs, weights, val outputs) instead of a temp dir")
    p.add_argument("--report", action="store_true",
                   help="only print the per-seed comparison (means, their standard error, a permutation test) of --out")
    p.add_argument("--extend", action="store_true",
                   help="add the runs of --seeds to those already in --out (same settings, other seeds, no uncommitted "
                        "vistrain/ changes; changes since are printed and stored): accuracy and speed are then "
                        "over all seeds; inference is kept")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="FILE",
                   help="only combine result files of the same settings and other seeds (e.g. processes run side "
                        "by side on one GPU machine) into --out; inference and machine are the first file's")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.imgsz, args.infer_rounds, args.seeds = 60, 1, 128, 10, args.seeds[:1]
    args.out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    return args


SAME_SETTINGS = ("n", "epochs", "imgsz", "batch", "nbs", "workers", "threads", "device", "amp")
NEW_SETTINGS = {"nbs": None, "device": "cpu", "amp": False}  # what files written before these options ran with
TRAINING_CODE = ("vistrain",)  # what a run's accuracy and speed depend on, on our side


def _git(*cmd: str) -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def code_version() -> dict:
    """The commit measured, and whether the training code differed from it (uncommitted changes)."""
    return {"commit": _git("rev-parse", "HEAD"),
            "training_code_dirty": bool(_git("status", "--porcelain", "--", *TRAINING_CODE))}


def previous_runs(args) -> dict | None:
    """With ``--extend``: the earlier result file, checked to be comparable with this invocation (else exit)."""
    if not args.extend:
        return None
    if not args.out.exists():
        raise SystemExit(f"--extend: {args.out} does not exist; run without --extend first")
    old = json.loads(args.out.read_text())
    was = {k: old["settings"].get(k, NEW_SETTINGS.get(k)) for k in SAME_SETTINGS}
    diff = {k: (was[k], getattr(args, k)) for k in SAME_SETTINGS if was[k] != getattr(args, k)}
    if diff:
        raise SystemExit(f"--extend: settings differ from {args.out} (old, new): {diff}")
    clash = sorted({r["seed"] for r in old["runs"]} & set(args.seeds))
    if clash:
        raise SystemExit(f"--extend: seeds {clash} are already in {args.out}; give other --seeds")
    if code_version()["training_code_dirty"] or any(c.get("training_code_dirty") for c in old.get("code", [])):
        raise SystemExit("--extend: uncommitted changes in vistrain/ (now or when the earlier runs were made); "
                         "commit them and run all seeds without --extend")
    for was in old.get("code", []):
        changed = _git("diff", "--stat", was["commit"], "HEAD", "--", *TRAINING_CODE) if was.get("commit") else "?"
        if changed:  # shown and stored: a reader decides whether the change can affect training
            print(f"--extend: vistrain/ changed since {str(was.get('commit'))[:10]} (seeds {was.get('seeds')}):\n"
                  f"{changed}", flush=True)
            was["changed_since"] = changed
    return old


def results_csv(path: Path) -> dict:
    """A run's ``results.csv`` (vistrain's or ultralytics', the same column names) as ``{column: [per epoch]}``
    for the loss and metric columns (train/..., val/..., metrics/...: each side's own validator, from which
    it chose its ``best`` epoch), ``{}`` when it is missing."""
    import csv

    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.open()))
    cols = [c for c in (rows[0] if rows else {}) if c.strip().startswith(("train/", "val/", "metrics/"))]
    return {c.strip(): [float(r[c]) for r in rows] for c in cols}


def loss_statistics(runs: list, key: str = "val_losses") -> dict:
    """Per loss term, over the runs that recorded ``key`` (``val_losses``: best weights; ``val_losses_last``: last):
    each side's mean, vistrain - ultralytics and its standard error (Welch; unpaired, as for mAP), and the
    difference as a share of ultralytics' mean."""
    import math

    runs = [r for r in runs if r.get(key)]
    out = {}
    for k in (runs[0][key][V] if runs else {}):
        v, u = ([r[key][side][k] for r in runs] for side in (V, P))
        diff = statistics.mean(v) - statistics.mean(u)
        se = math.sqrt(statistics.variance(v) / len(v) + statistics.variance(u) / len(u)) if len(v) > 1 else None
        out[k] = {V: statistics.mean(v), P: statistics.mean(u), "diff": diff, "se": se,
                  "relative": diff / statistics.mean(u), "sd": [statistics.stdev(x) if len(x) > 1 else None
                                                               for x in (v, u)], "seeds": len(v)}
    return out


def paired(v: list, u: list, rnd) -> dict:
    """Seeds as pairs: the mean per-seed difference v - u, its standard error (sd / sqrt(n)), a two-sided sign-flip
    permutation p-value, on how many seeds v < u, and the correlation of the two sides over seeds."""
    import math

    d = [a - b for a, b in zip(v, u)]
    mean, n, hits = statistics.mean(d), 20000, 0
    for _ in range(n):
        hits += abs(statistics.mean(x if rnd.random() < 0.5 else -x for x in d)) >= abs(mean) - 1e-12
    return {"diff": mean, "se": statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None,
            "sign_flip_p": hits / n, "below": sum(x < 0 for x in d), "seeds": len(d),
            "correlation": statistics.correlation(v, u) if len(d) > 2 and len(set(v)) > 1 and len(set(u)) > 1
            else None}


def paired_statistics(runs: list) -> dict:
    """Per pipeline and metric (mAP50-95), and per validation loss term (best and last weights), :func:`paired` of
    vistrain against ultralytics over the seeds whose two runs started from the same weights.

    They do by construction: both seed torch with ``seed`` and build the model's modules in the same order
    (tests/test_yolov8_oracle.py::test_same_seed_same_initial_weights); runs since this record say so
    (``same_init``, checked tensor by tensor), earlier ones are taken as paired.  A seed's two runs still draw
    their data order and augmentation independently, which is most of a final mAP's spread (the two sides'
    mAP correlate by ~0.1 over seeds; their validation losses by ~0.6), so pairing sharpens the loss
    comparison more than the mAP one."""
    import random

    runs, rnd, out = [r for r in runs if r.get("same_init", True)], random.Random(0), {}
    for pipeline in (runs[0]["accuracy"] if runs else {}):
        for x, kind in (("B", "box"), ("M", "mask")):
            v, u = ([r["accuracy"][pipeline][side][f"mAP50-95({x})"] for r in runs] for side in (V, P))
            out[f"{pipeline} {kind} mAP50-95"] = paired(v, u, rnd)
    for key, w in (("val_losses", "best"), ("val_losses_last", "last")):
        have = [r for r in runs if r.get(key)]
        for k in (have[0][key][V] if have else {}):
            v, u = ([r[key][side][k] for r in have] for side in (V, P))
            out[f"val {k} of {w}"] = {**paired(v, u, rnd), "relative": statistics.mean(v) / statistics.mean(u) - 1}
    return out


def print_paired_statistics(stats: dict) -> None:
    for k, s in stats.items():
        se = f", standard error {s['se']:.4f}" if s["se"] is not None else ""
        rel = f" ({100 * s['relative']:+.1f}%)" if "relative" in s else ""
        corr = f", correlation of the sides {s['correlation']:.2f}" if s["correlation"] is not None else ""
        print(f"paired {k:<26} vistrain - ultralytics {s['diff']:+.4f}{rel}{se}, sign-flip p {s['sign_flip_p']:.2f}; "
              f"vistrain lower on {s['below']} of {s['seeds']} seeds{corr}", flush=True)


def print_loss_statistics(stats: dict, weights: str = "best") -> None:
    for k, s in stats.items():
        se = f", standard error {s['se']:.4f}" if s["se"] else ""
        print(f"val {k:<9} of {weights:<4} (lower is better) vistrain {s[V]:.4f}, ultralytics {s[P]:.4f}: {s['diff']:+.4f} "
              f"({100 * s['relative']:+.1f}%{se}) over {s['seeds']} seeds", flush=True)


def seed_statistics(runs: list) -> dict:
    """Per pipeline and metric: vistrain - ultralytics mean mAP50-95 over the seeds, its standard error (Welch),
    the two-sided p-value of a permutation test of that difference (seeds are unpaired: a seed means different
    draws on the two sides), and on how many seeds vistrain is below."""
    import math
    import random

    rnd, out = random.Random(0), {}
    for pipeline in runs[0]["accuracy"]:
        for x in ("B", "M"):
            v, u = ([r["accuracy"][pipeline][side][f"mAP50-95({x})"] for r in runs] for side in (V, P))
            diff = statistics.mean(v) - statistics.mean(u)
            se = math.sqrt(statistics.variance(v) / len(v) + statistics.variance(u) / len(u)) if len(v) > 1 else None
            pool, hits, n = v + u, 0, 20000
            for _ in range(n):
                rnd.shuffle(pool)
                hits += abs(statistics.mean(pool[:len(v)]) - statistics.mean(pool[len(v):])) >= abs(diff) - 1e-12
            out[f"{pipeline} {x}"] = {"diff": diff, "se": se, "permutation_p": hits / n,
                                      "below": sum(a < b for a, b in zip(v, u)), "seeds": len(v)}
    return out


def print_statistics(stats: dict) -> None:
    for k, s in stats.items():
        se = f", standard error {s['se']:.4f}" if s["se"] else ""
        print(f"{k.replace(' B', ' box').replace(' M', ' mask'):<14} mAP50-95 vistrain - ultralytics {s['diff']:+.4f}{se}, "
              f"permutation p {s['permutation_p']:.2f}; vistrain below on {s['below']} of {s['seeds']} seeds", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        runs = json.loads(args.out.read_text())["runs"]
        print_speed(runs)
        print_statistics(seed_statistics(runs))
        print_loss_statistics(loss_statistics(runs))
        print_loss_statistics(loss_statistics(runs, "val_losses_last"), "last")
        print_paired_statistics(paired_statistics(runs))
        return 0
    if args.merge:
        return merge(args.merge, args.out)
    old = previous_runs(args)
    with tempfile.TemporaryDirectory(prefix="vistrain-bench-seg-") as tmp:
        tmp = Path(tmp)
        if args.keep:  # runs, weights and val outputs stay under --keep
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = args.keep.resolve()
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_CONFIG_DIR"] = str(tmp / "ultralytics-config")
        os.environ["VISTRAIN_CACHE"] = str(tmp / "vistrain-cache")
        block_internet()
        with quiet(args.show_progress):
            import ultralytics
        from vistrain.data.synthetic import make_dataset, split_layout

        torch.set_num_threads(args.threads)
        root = make_dataset(tmp / "data", n=args.n, imgsz=args.imgsz, seed=0)
        n_train = split_layout(args.n, 0.2)[0]
        data_yaml = root / "segment" / "data.yaml"
        print(f"YOLOv8n-seg from scratch, device {args.device}{' (AMP)' if args.amp else ''}, {args.threads} threads, "
              f"{args.workers} workers: {n_train} train / {args.n - n_train} val images at {args.imgsz} px, "
              f"{args.epochs} epochs, batch {args.batch}, nbs {args.nbs or 'default (64)'}; "
              f"ultralytics {ultralytics.__version__}", flush=True)
        load_before, waited = wait_for_quiet(args.max_load, args.max_wait)
        print(f"load average (1 min) before measuring: {load_before:.2f} (waited {waited:.0f} s)", flush=True)

        runs = []  # per seed: {"seed", "train": {side: ...}, "accuracy": {pipeline: {side: ...}}}
        infer = old["inference"] if old else None
        for seed in args.seeds:
            args.seed = seed
            best, train, init = {}, {}, {}
            for side, fn in ((V, train_vistrain), (P, train_ultralytics)):
                t0 = time.time()
                best[side], info = fn(data_yaml, tmp / f"runs-seed{seed}", args)
                init[side] = info.pop("init")
                clock = info["clock"].result(n_train)
                train[side] = {**clock, "own_val": info["own"], "accumulate_at_end": info["accumulate"],
                               "wall_s": time.time() - t0}
                print(f"  seed {seed}: train {side:<12} {clock['img_per_s']:6.2f} img/s (epochs after the first; "
                      f"wall {time.time() - t0:.0f} s, other processes {100 * (clock['other_cpu_share'] or 0):.0f}% "
                      f"CPU, accumulate {info['accumulate']}); its own val: {info['own']}", flush=True)
            same_init = init[V].keys() == init[P].keys() and all(torch.equal(v, init[P][k]) for k, v in init[V].items())
            print(f"  seed {seed}: both sides started from the same weights: {same_init}", flush=True)
            acc, val_losses = accuracy(best, root, tmp / f"runs-seed{seed}", args)
            val_losses_last = last_losses(best, root, tmp / f"runs-seed{seed}", args)
            for side in (V, P):
                train[side]["curves"] = results_csv(Path(best[side]).parent.parent / "results.csv")
                for w, losses in (("best", val_losses), ("last", val_losses_last)):
                    print(f"  seed {seed}: val loss of {side:<12} {w:<4} " + ", ".join(
                        f"{k} {v:.4f}" for k, v in losses[side].items()), flush=True)
            for pipeline, sides in acc.items():
                for side, s in sides.items():
                    print(f"  seed {seed}: pycocotools, {pipeline:<7} pipeline, {side:<12} box mAP50-95 "
                          f"{s['mAP50-95(B)']:.4f} (mAP50 {s['mAP50(B)']:.4f})  mask mAP50-95 {s['mAP50-95(M)']:.4f} "
                          f"(mAP50 {s['mAP50(M)']:.4f})", flush=True)
                    per_class = s.get("per_class_mAP50-95(B)") or {}
                    print(f"  seed {seed}: {'':<12} {pipeline:<7} {side:<12} box mAP50-95 per class: "
                          + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in per_class.items()), flush=True)
            runs.append({"seed": seed, "train": train, "accuracy": acc, "val_losses": val_losses,
                         "val_losses_last": val_losses_last, "same_init": same_init})
            if infer is None:
                infer = inference(best, root, args)
                for side, s in infer.items():
                    print(f"  inference {side:<26} {s['ms_median']:7.1f} ms (batch 1, {args.imgsz} px; "
                          f"{s['detections']} boxes kept)", flush=True)
            summarise(args, old, runs, infer)

    return 0


def run_means(runs: list) -> tuple[dict, dict, dict]:
    """Over ``runs``: median training img/s per side, mean accuracy per pipeline and side, and the mean
    mAP50-95 differences (vistrain - ultralytics) as the result file's ratios name them."""
    img_s = {side: statistics.median(r["train"][side]["img_per_s"] for r in runs) for side in (V, P)}
    acc_mean = {pipeline: {side: {k: statistics.mean(r["accuracy"][pipeline][side][k] for r in runs)
                                  for k in runs[0]["accuracy"][pipeline][side] if not k.startswith("per_class")}
                           for side in (V, P)} for pipeline in runs[0]["accuracy"]}
    diffs = {f"{kind}_map_minus_peer_{pipeline}": acc_mean[pipeline][V][f"mAP50-95({x})"]
             - acc_mean[pipeline][P][f"mAP50-95({x})"] for pipeline in acc_mean
             for kind, x in (("box", "B"), ("mask", "M"))}
    return img_s, acc_mean, diffs


def speed_ratios(runs: list) -> list:
    """Per seed, vistrain's training img/s over ultralytics': the two sides of a seed train back to back, so their
    ratio is less exposed than the per-side medians to a shared host whose speed drifts over hours."""
    return [r["train"][V]["img_per_s"] / r["train"][P]["img_per_s"] for r in runs]


def print_speed(runs: list) -> None:
    img_s, per_seed = run_means(runs)[0], speed_ratios(runs)
    print(f"training vistrain / ultralytics: {img_s[V] / img_s[P]:.3f}x (median img/s over seeds {img_s[V]:.2f} vs "
          f"{img_s[P]:.2f}); median of the per-seed ratios {statistics.median(per_seed):.3f}x "
          f"({', '.join(f'{x:.2f}' for x in per_seed)})", flush=True)


def merge(files: list, out: Path) -> int:
    """Combine result files made with the same settings and disjoint seeds into ``out``; means, ratios and the
    seed statistics are recomputed over all runs, inference and machine are the first file's."""
    docs = [json.loads(Path(f).read_text()) for f in files]
    for f, d in zip(files[1:], docs[1:]):
        first_s, this_s = ({k: x["settings"].get(k, NEW_SETTINGS.get(k)) for k in SAME_SETTINGS} for x in (docs[0], d))
        diff = {k: (first_s[k], this_s[k]) for k in SAME_SETTINGS if first_s[k] != this_s[k]}
        if diff:
            raise SystemExit(f"--merge: settings of {f} differ from {files[0]}'s (first, this): {diff}")
    seeds = [r["seed"] for d in docs for r in d["runs"]]
    if len(seeds) != len(set(seeds)):
        raise SystemExit(f"--merge: a seed appears twice: {sorted(seeds)}")
    runs = sorted((r for d in docs for r in d["runs"]), key=lambda r: r["seed"])
    first, infer = docs[0], docs[0]["inference"]
    img_s, acc_mean, acc_ratios = run_means(runs)
    ratios = {**first["ratios"], "train_img_per_s": img_s[V] / img_s[P],
              "train_img_per_s_per_seed_median": statistics.median(speed_ratios(runs)), **acc_ratios}
    stats = seed_statistics(runs)
    result = {**first, "settings": {**first["settings"], "seeds": [r["seed"] for r in runs], "out": str(out)},
              "merged_from": [{"file": Path(f).name, "seeds": [r["seed"] for r in d["runs"]]}
                              for f, d in zip(files, docs)],
              "code": [c for d in docs for c in d.get("code", [])], "runs": runs,
              "train_img_per_s_median": img_s, "accuracy_pycocotools_mean": acc_mean, "inference": infer,
              "ratios": ratios, "seed_statistics": stats, "val_loss_statistics": loss_statistics(runs),
              "val_loss_statistics_last": loss_statistics(runs, "val_losses_last"),
              "paired_statistics": paired_statistics(runs)}
    for pipeline, sides in acc_mean.items():
        for side, s in sides.items():
            print(f"mean over {len(runs)} seeds, {pipeline:<7} pipeline, {side:<12} box mAP50-95 "
                  f"{s['mAP50-95(B)']:.4f}  mask mAP50-95 {s['mAP50-95(M)']:.4f}")
    print_speed(runs)
    print_statistics(stats)
    print_loss_statistics(result["val_loss_statistics"])
    print_loss_statistics(result["val_loss_statistics_last"], "last")
    print_paired_statistics(result["paired_statistics"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0


def summarise(args, old: dict | None, new_runs: list, infer: dict) -> None:
    """Means over all runs so far (earlier file's and this invocation's), printed and written to ``args.out``:
    called after every seed, so a long ``--seeds`` list that is stopped keeps what it finished."""
    import ultralytics

    runs = (old["runs"] if old else []) + new_runs
    seeds = [r["seed"] for r in runs]
    img_s, acc_mean, acc_ratios = run_means(runs)
    ratios = {"train_img_per_s": img_s[V] / img_s[P],
              "train_img_per_s_per_seed_median": statistics.median(speed_ratios(runs)),
              "inference_speed": infer[P]["ms_median"] / infer[V]["ms_median"],
              "inference_speed_unfused": infer[f"{P} unfused (info)"]["ms_median"]
              / infer[f"{V} unfused (info)"]["ms_median"], **acc_ratios}
    for pipeline, sides in acc_mean.items():
        for side, s in sides.items():
            print(f"mean over seeds {seeds}, {pipeline:<7} pipeline, {side:<12} box mAP50-95 "
                  f"{s['mAP50-95(B)']:.4f}  mask mAP50-95 {s['mAP50-95(M)']:.4f}", flush=True)
    print(f"vistrain / ultralytics: training {ratios['train_img_per_s']:.3f}x (median img/s over seeds), inference "
          f"{ratios['inference_speed']:.3f}x; mean mAP50-95 difference (val / predict pipeline) box "
          f"{ratios['box_map_minus_peer_val']:+.4f} / {ratios['box_map_minus_peer_predict']:+.4f}, mask "
          f"{ratios['mask_map_minus_peer_val']:+.4f} / {ratios['mask_map_minus_peer_predict']:+.4f} "
          f"(targets: >= 1.0x, >= 1.0x, >= 0, >= 0)", flush=True)
    print_speed(runs)
    stats = seed_statistics(runs)
    print_statistics(stats)
    loss_stats, loss_stats_last = loss_statistics(runs), loss_statistics(runs, "val_losses_last")
    print_loss_statistics(loss_stats)
    print_loss_statistics(loss_stats_last, "last")
    paired_stats = paired_statistics(runs)
    print_paired_statistics(paired_stats)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["seeds"] = seeds
    out = {"benchmark": "yolov8n-seg from scratch on the built-in shapes: vistrain vs ultralytics "
                        f"(training on {args.device}{', AMP' if args.amp else ''}; inference on the CPU)",
           "settings": settings, "code": (old.get("code", [{"commit": None, "seeds": old["settings"]["seeds"]}])
                                          if old else []) + [{**code_version(), "seeds": [r["seed"] for r in new_runs]}],
           "runs": runs, "train_img_per_s_median": img_s, "accuracy_pycocotools_mean": acc_mean,
           "inference": infer, "ratios": ratios, "seed_statistics": stats, "val_loss_statistics": loss_stats,
           "val_loss_statistics_last": loss_stats_last, "paired_statistics": paired_stats, "load_after": load1(),
           "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__, "ultralytics": ultralytics.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {args.out}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
