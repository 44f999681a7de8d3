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

try:
    import resource
except ImportError:  # not on Windows
    resource = None
import torch
import torchvision
from PIL import Image

NUM_CLASSES = 4
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.937, 5e-4
RESULTS = Path(__file__).resolve().parent / "results" / "classify.json"
QUICK_RESULTS = RESULTS.with_name("classify-quick.json")  # smoke runs never overwrite a measurement


class _StopRun(Exception):
    """Raised from vistrain's on_batch_end callback once the timed steps are done."""


# ---------------------------------------------------------------------------------------------- machine
def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait: float, poll: float = 30.0) -> tuple[float, float]:
    """Poll the 1-minute load average until it is below ``max_load``; returns (load, seconds waited)."""
    t0 = time.time()
    while True:
        load = load1()
        waited = time.time() - t0
        if load < max_load or waited >= max_wait:
            if load >= max_load:
                print(f"load average still {load:.2f} after {waited:.0f} s; measuring anyway", flush=True)
            return load, waited
        print(f"load average {load:.2f} >= {max_load}: waiting ({waited:.0f}/{max_wait:.0f} s)", flush=True)
        time.sleep(min(poll, max(max_wait - waited, 1.0)))


_CLK = os.sysconf("SC_CLK_TCK")


def _proc_times(pid: int | str) -> tuple[int, int]:
    """(ppid, utime + stime in clock ticks) of a process, from /proc/PID/stat."""
    st = Path(f"/proc/{pid}/stat").read_text()
    rest = st[st.rfind(")") + 2:].split()  # the fields after "pid (comm)"
    return int(rest[1]), int(rest[11]) + int(rest[12])


def _machine_busy() -> int:
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(vals) - vals[3] - vals[4]  # all but idle and iowait, clock ticks


def keep_freed_memory() -> None:
    """glibc: serve every allocation from the heap and never give freed memory back to the OS.

    By default glibc maps allocations above 32 MiB (and, depending on its history, smaller ones)
    with mmap and unmaps them on free, so each training step page-faults its large activation
    buffers in again (hundreds of thousands of faults per ResNet-50 step here).  How many depends on
    the allocator's history, which makes step times of otherwise identical loops differ by 10%+.
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    if not ok:
        raise SystemExit("--malloc-keep: mallopt failed (glibc only)")


class CpuMonitor:
    """How much CPU processes other than this one and its children (dataloader workers) take.

    ``start()`` scans /proc once for our children; ``share()`` then reads only /proc/stat and our own
    processes (a fraction of a millisecond) and returns the average share of all CPUs that other
    processes used since ``start()``.  Linux only; elsewhere ``share()`` is None.
    """

    def start(self) -> None:
        try:
            me = os.getpid()
            self.pids = [me]
            for d in Path("/proc").iterdir():
                if d.name.isdigit() and int(d.name) != me:
                    try:
                        if _proc_times(d.name)[0] == me:
                            self.pids.append(int(d.name))
                    except (OSError, ValueError, IndexError):
                        continue
            self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy(), self._own()
        except (OSError, ValueError, IndexError):
            self.t0 = None

    def _own(self) -> int:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += _proc_times(pid)[1]
        return total

    def share(self) -> float | None:
        if getattr(self, "t0", None) is None:
            return None
        try:
            other = (_machine_busy() - self.busy0) - (self._own() - self.own0)
        except (OSError, ValueError, IndexError):
            return None
        seconds = time.perf_counter() - self.t0
        return max(other / _CLK, 0.0) / max(seconds, 1e-9) / (os.cpu_count() or 1)


def wait_for_idle(max_other: float, max_wait: float, window: float = 10.0) -> None:
    """Wait until other processes use less than ``max_other`` of the CPUs over a ``window``-second
    sample (used before retrying a spoilt run: the load average would still count our own run)."""
    t0 = time.time()
    while True:
        mon = CpuMonitor()
        mon.start()
        time.sleep(window)
        share = mon.share()
        waited = time.time() - t0
        if share is None or share < max_other or waited >= max_wait:
            return
        print(f"other processes use {100 * share:.0f}% of the CPUs: waiting ({waited:.0f}/{max_wait:.0f} s)",
              flush=True)


class StepClock:
    """Stamps the end of every step; tells the loop when the run is complete or spoilt by other load.

    The timed window starts at the end of warm-up step ``warmup``.  After a few timed steps, a run in
    which other processes took more than ``max_other`` of the CPUs is abandoned (when ``may_abort``),
    so that a busy machine costs a retry rather than a whole slow run.
    """

    def __init__(self, args, may_abort: bool):
        self.warmup, self.need = args.warmup, args.warmup + args.steps
        self.max_other, self.may_abort = args.max_other, may_abort
        self.stamps: list[float] = []
        self.cpu = CpuMonitor()
        self.other: float | None = None
        self.abandoned = False

    def step_end(self) -> bool:
        """Call at the end of each step; True when the loop should stop."""
        n = len(self.stamps) + 1
        if n == self.warmup:
            self.cpu.start()  # the /proc scan happens before the window opens
            self.ru0 = resource.getrusage(resource.RUSAGE_SELF) if resource else None
        self.stamps.append(time.perf_counter())
        if n <= self.warmup:
            return False
        self.ru1 = resource.getrusage(resource.RUSAGE_SELF) if resource else None
        self.other = self.cpu.share()  # after the stamp: its cost falls on the next step, if any
        if n >= self.need:
            return True
        if self.may_abort and n - self.warmup >= 3 and self.other is not None and self.other > self.max_other:
            self.abandoned = True
            return True
        return False

    def result(self, batch: int) -> dict:
        """Throughput over the timed steps (from the end of the last warm-up step to the last stamp)."""
        timed = len(self.stamps) - self.warmup
        t0, t1 = self.stamps[self.warmup - 1], self.stamps[-1]
        steps = np.diff(self.stamps[self.warmup - 1:])
        ru = {}
        if getattr(self, "ru0", None) and getattr(self, "ru1", None):  # the main process only, not workers
            ru = {"main_user_s_per_step": (self.ru1.ru_utime - self.ru0.ru_utime) / timed,
                  "main_sys_s_per_step": (self.ru1.ru_stime - self.ru0.ru_stime) / timed,
                  "main_page_faults_per_step": (self.ru1.ru_minflt - self.ru0.ru_minflt) / timed}
        return {"img_per_s": timed * batch / (t1 - t0), "timed_steps": timed, "seconds": t1 - t0,
                "step_s_median": float(np.median(steps)), "step_s_max": float(steps.max()), **ru,
                "other_cpu_share": self.other, "abandoned": self.abandoned}


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
            "torch_threads": threads, "cpu_count": os.cpu_count(), "cpu": _cpu_name(),
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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
