"""ResNet-50 training-step throughput: vistrain's Trainer vs. a bare torchvision loop (CPU).

    .venv/bin/python bench/classify.py            # full run: batch 16, 224 px, ~10 minutes on 2 cores
    .venv/bin/python bench/classify.py --quick    # smoke run: 64 px, a few steps, < 1 minute

Both sides train the same architecture (ResNet-50, 4 classes, random init) on the same throwaway
ImageFolder (written to a temp dir), with the same batch, image size, dataloader workers, CPU
threads and optimizer (SGD, lr 0.01, momentum 0.937, Nesterov, weight decay 5e-4), with
``deterministic=False`` on both sides.  vistrain runs through ``Trainer(cfg).train()`` with
``nbs=batch`` (an optimizer step every batch, like the bare loop), ``warmup_epochs=0``,
``plots=False`` and otherwise its defaults (EMA on, clip_grad 10, colour jitter hsv 0.2, channels_last:
NHWC weights and activations, which the bare loop does not use); a second vistrain line,
"vistrain (NCHW)", has ``channels_last=False``: the same memory layout as the bare loop.

A "step" is everything between the end of one batch and the end of the next: waiting for the
batch from the dataloader, forward, loss, backward, optimizer step (vistrain: plus grad clipping,
EMA update, progress bar; measured between ``on_batch_end`` callbacks).  The first ``--warmup``
steps of every run are not timed (worker start-up, allocator warm-up); the next ``--steps`` are.
The runs alternate in one process, in counterbalanced order (torchvision, vistrain, vistrain-NCHW,
then the reverse, ...), and each side reports the median of its per-run throughputs.  vistrain's run is stopped right after
its timed steps (from the callback), so validation and checkpointing never enter the timing.

Other processes on the machine skew the numbers: the script first waits (up to ``--max-wait``
seconds) for the 1-minute load average to drop below ``--max-load``, and reports, for every run,
the share of the CPUs used by processes outside this benchmark during the timed steps; a run where
that share is above ``--max-other`` (10 %) is discarded and repeated (at most ``--retries`` times,
after waiting for the load average again).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepClock, cpu_name, keep_freed_memory, load1, wait_for_idle, wait_for_quiet  # noqa: E402

NUM_CLASSES = 4
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.937, 5e-4
RESULTS = Path(__file__).resolve().parent / "results" / "classify.json"
QUICK_RESULTS = RESULTS.with_name("classify-quick.json")  # smoke runs never overwrite a measurement


class _StopRun(Exception):
    """Raised from vistrain's on_batch_end callback once the timed steps are done."""


# ---------------------------------------------------------------------------------------------- data
def make_data(root: Path, n_train: int, n_val: int, size: int = 256, seed: int = 0) -> Path:
    """ImageFolder ``root/{train,val}/cK/*.jpg``: smooth random colour fields plus noise, JPEG q90."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = i % NUM_CLASSES
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC), dtype=np.int16)
            img = img + rng.normal(0, 12, img.shape).astype(np.int16)
            img[:, :, c % 3] += 40  # a little class signal
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


# ---------------------------------------------------------------------------------------------- runs
def run_torchvision(data: Path, args, may_abort: bool = False) -> dict:
    """The bare loop: torchvision model, ImageFolder, transforms, DataLoader, CrossEntropyLoss, SGD."""
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.imgsz),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    ds = datasets.ImageFolder(str(data / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers)
    model = torchvision.models.resnet50(num_classes=NUM_CLASSES)
    model.train()
    criterion = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)

    clock = StepClock(args, may_abort)
    it = iter(loader)
    while True:
        try:
            x, y = next(it)
        except StopIteration:  # only if the dataset is smaller than the run
            it = iter(loader)
            x, y = next(it)
        loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        if clock.step_end():
            break
    del it, loader, model, opt
    gc.collect()
    return clock.result(args.batch)


def vistrain_cfg(data: Path, project: Path, args, channels_last: bool) -> dict:
    from vistrain.config import get_config

    overrides = dict(
        model="resnet50", data=str(data), imgsz=args.imgsz, batch=args.batch, workers=args.workers, device="cpu",
        epochs=1, optimizer="SGD", lr0=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY,
        nbs=args.batch, warmup_epochs=0, channels_last=channels_last, deterministic=False, plots=False, verbose=False,
        project=str(project), name="bench", exist_ok=True, seed=0,
    )
    if args.hsv is not None:
        overrides["hsv"] = args.hsv
    if args.clip_grad is not None:
        overrides["clip_grad"] = args.clip_grad
    cfg = get_config(overrides)
    cfg["_user_keys"] = sorted(overrides)
    return cfg


def run_vistrain(data: Path, project: Path, args, channels_last: bool, may_abort: bool = False) -> dict:
    from vistrain.engine.trainer import Trainer

    trainer = Trainer(vistrain_cfg(data, project, args, channels_last))
    clock = StepClock(args, may_abort)

    def on_batch_end(tr) -> None:
        if clock.step_end():
            raise _StopRun

    trainer.add_callback("on_batch_end", on_batch_end)
    sink = open(os.devnull, "w") if not args.show_progress else None
    try:
        with contextlib.redirect_stderr(sink) if sink else contextlib.nullcontext():
            trainer.train()
    except _StopRun:
        pass
    finally:
        if sink:
            sink.close()
    if len(clock.stamps) <= args.warmup:
        raise RuntimeError(f"vistrain ran only {len(clock.stamps)} steps: the training split is too small")
    del trainer
    gc.collect()
    return clock.result(args.batch)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternated; the median is reported")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--imgsz", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="dataloader workers on both sides (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-nchw", action="store_true", help="skip the extra vistrain run with channels_last=False")
    p.add_argument("--hsv", type=float, default=None, help="vistrain colour-jitter strength (default: vistrain's)")
    p.add_argument("--clip-grad", type=float, default=None, help="vistrain clip_grad (default: vistrain's)")
    p.add_argument("--max-load", type=float, default=1.0, help="wait until the 1-min load average is below this")
    p.add_argument("--max-wait", type=float, default=600.0, help="longest wait for a quiet machine, seconds")
    p.add_argument("--max-other", type=float, default=0.10,
                   help="a run during which other processes used more than this share of the CPUs is repeated")
    p.add_argument("--retries", type=int, default=3, help="repeats of a run spoilt by other processes (default 3)")
    p.add_argument("--malloc-keep", action="store_true",
                   help="diagnostic, glibc only: keep freed memory in the process (mallopt M_MMAP_MAX=0, "
                        "M_TRIM_THRESHOLD=2 GiB) so steps do not page-fault their activations back in; "
                        "not what users run")
    p.add_argument("--show-progress", action="store_true", help="let vistrain's progress bar print")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON results (default {RESULTS}; --quick: {QUICK_RESULTS.name} beside it)")
    p.add_argument("--quick", action="store_true", help="smoke run: imgsz 64, 2+3 steps, 1 repeat, no waiting")
    args = p.parse_args(argv)
    if args.quick:
        args.imgsz, args.warmup, args.steps, args.repeats, args.max_wait, args.retries = 64, 2, 3, 1, 0.0, 0
    if args.out is None:
        args.out = QUICK_RESULTS if args.quick else RESULTS
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.malloc_keep:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"ResNet-50 training steps, batch {args.batch}, {args.imgsz} px, CPU, {threads} threads, "
          f"{args.workers} workers, {args.warmup} warm-up + {args.steps} timed steps x {args.repeats} runs per side",
          flush=True)
    sides = ["torchvision", "vistrain"] + ([] if args.no_nchw else ["vistrain (NCHW)"])
    results: dict[str, list[dict]] = {s: [] for s in sides}
    discarded: dict[str, list[dict]] = {s: [] for s in sides}

    with tempfile.TemporaryDirectory(prefix="vistrain-bench-") as tmp:
        tmp = Path(tmp)
        n_train = (args.warmup + args.steps) * args.batch  # one epoch covers a whole run
        n_train += -n_train % NUM_CLASSES
        data = make_data(tmp / "data", n_train, n_val=NUM_CLASSES * 2)
        load_before, waited = wait_for_quiet(args.max_load, args.max_wait)
        print(f"load average (1 min) before measuring: {load_before:.2f} (waited {waited:.0f} s)", flush=True)
        t_start = time.time()
        for r in range(args.repeats):
            # counterbalanced order (A B C, C B A, ...): no side always runs right after the same one
            for side in (sides if r % 2 == 0 else sides[::-1]):
                for attempt in range(args.retries + 1):
                    last = attempt == args.retries
                    if side == "torchvision":
                        res = run_torchvision(data, args, may_abort=not last)
                    else:
                        res = run_vistrain(data, tmp / "runs", args, channels_last=side == "vistrain", may_abort=not last)
                    share = res["other_cpu_share"]
                    busy = share is not None and share > args.max_other
                    other = f", other processes {100 * share:.0f}% CPU" if share is not None else ""
                    mark = ""
                    if busy:
                        mark = (f"  DISCARDED after {res['timed_steps']} steps: machine busy" if not last
                                else "  (machine busy; kept, out of retries)")
                    sys_s = f", main sys {res['main_sys_s_per_step']:.2f} s/step" if "main_sys_s_per_step" in res else ""
                    print(f"  run {r + 1}/{args.repeats} {side:<20} {res['img_per_s']:7.2f} img/s "
                          f"(median step {res['step_s_median']:.2f} s{sys_s}{other}){mark}", flush=True)
                    if busy and not last:
                        discarded[side].append(res)
                        wait_for_idle(args.max_other, args.max_wait)
                        continue
                    results[side].append(res)
                    break
        load_after = load1()
        elapsed = time.time() - t_start

    med = {s: statistics.median(r["img_per_s"] for r in results[s]) for s in sides}
    base = med["torchvision"]
    print(f"\n{'side':<22}{'img/s (median)':>15}{'runs':>24}{'vs torchvision':>16}")
    for s in sides:
        runs = " ".join(f"{r['img_per_s']:.2f}" for r in results[s])
        print(f"{s:<22}{med[s]:>15.2f}{runs:>24}{med[s] / base:>16.3f}")
    ratio = med["vistrain"] / base
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after (this benchmark included); "
          f"deterministic=False on both sides; {elapsed:.0f} s of measuring")
    verdict = "ok" if ratio >= 0.95 else "BELOW TARGET"
    print(f"ratio vistrain/torchvision: {ratio:.2f} (target >= 0.95) {verdict}")

    info = {
        "benchmark": "resnet50 training-step throughput, vistrain Trainer vs bare torchvision loop",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "vistrain_settings": {k: v for k, v in vistrain_cfg(Path("DATA"), Path("RUNS"), args, True).items()
                              if k in ("optimizer", "lr0", "momentum", "nesterov", "weight_decay", "nbs", "ema",
                                       "clip_grad", "hsv", "fliplr", "augment", "warmup_epochs", "deterministic", "channels_last",
                                       "amp", "plots")},
        "img_per_s_median": med,
        "ratio_vistrain_torchvision": ratio,
        "ratio_vistrain_nchw_torchvision": med.get("vistrain (NCHW)", float("nan")) / base,
        "target": 0.95,
        "runs": results,
        "discarded_runs": discarded,
        "load_average_1min": {"before": load_before, "after": load_after, "waited_s": waited},
        "machine": {
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "torch_threads": threads, "cpu_count": os.cpu_count(), "cpu": cpu_name(),
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.quick:
        info["note"] = "--quick smoke run: not a measurement"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
