"""Helpers shared by the benchmark scripts: machine load, other processes' CPU share, step clocks,
keeping the run offline and quiet.  Linux-first (``/proc``); elsewhere the CPU share reads None."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np

try:
    import resource
except ImportError:  # not on Windows
    resource = None


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


class StopRun(Exception):
    """Raised from a batch-end callback once the timed steps are done."""


def run_trainer_steps(cfg: dict, args, may_abort: bool, on_start=None) -> dict:
    """Train vistrain's Trainer on ``cfg`` until ``StepClock`` has its timed steps; throughput and what was seen.

    ``on_start(trainer, seen)`` runs at ``on_train_start`` (to record the optimizer, say).
    """
    import gc

    import torch

    from vistrain.engine.trainer import Trainer

    trainer = Trainer(cfg)
    clock = StepClock(args, may_abort)
    seen = {}
    if on_start is not None:
        trainer.add_callback("on_train_start", lambda tr: on_start(tr, seen))

    def on_batch_end(tr) -> None:
        seen["threads"] = torch.get_num_threads()
        seen["workers"] = tr.train_loader.num_workers
        if clock.step_end():
            raise StopRun

    trainer.add_callback("on_batch_end", on_batch_end)
    try:
        with quiet(args.show_progress):
            trainer.train()
    except StopRun:
        pass
    if len(clock.stamps) <= args.warmup:
        raise RuntimeError(f"vistrain ran only {len(clock.stamps)} steps: the training split is too small")
    seen["children"] = len(getattr(clock.cpu, "pids", [0])) - 1
    del trainer
    gc.collect()
    return {**clock.result(cfg["batch"]), **seen}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()



# ---------------------------------------------------------------------------------------------- offline
def block_internet() -> None:
    """Refuse internet connections and DNS look-ups in this process (and its forked dataloader workers).

    Unix-domain sockets stay usable: torch's dataloader passes tensors' file descriptors over them.
    """
    inet = (socket.AF_INET, socket.AF_INET6)
    orig_connect, orig_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(*_a, **_k):
        raise OSError("bench: network access is blocked")

    def connect(self, address):
        if self.family in inet:
            refuse()
        return orig_connect(self, address)

    def connect_ex(self, address):
        if self.family in inet:
            refuse()
        return orig_connect_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.getaddrinfo = refuse
    socket.gethostbyname = refuse


def quiet(show: bool):
    """Silence progress bars and INFO logs of every framework unless ``--show-progress``."""
    if show:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    sink = stack.enter_context(open(os.devnull, "w"))
    stack.enter_context(contextlib.redirect_stderr(sink))
    stack.enter_context(contextlib.redirect_stdout(sink))
    loggers = [logging.getLogger(n) for n in ("vistrain", "ultralytics", "yolov5")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    stack.callback(lambda: [lg.setLevel(lv) for lg, lv in zip(loggers, levels)])
    return stack
