"""CPU threads: torch's intra-op thread count, OpenMP's wait policy, and the data-loader workers' threads.

PyTorch's CPU kernels run on an OpenMP team (libgomp in the Linux wheels).  A libgomp thread that finishes its
share of a parallel region spins (up to ``GOMP_SPINCOUNT``, 300,000 by default) waiting for the others before it
sleeps.  When another process holds a core, the thread it waits for is not running, and the team spins away the
time slices it gets: on 2 cores beside other work, yolov8n-seg forward+backward steps with 2 threads ran 7-24x slower
than with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once).  The price: on an idle machine a team of 2 threads
ran 30% slower passive than spinning (compute alone, no loader workers); 1 thread is the same either way, and
the auto thread count on 2 CPUs with workers is 1 (``bench/README.md``, ``threads.py``).  A user who has the
machine to themselves can set ``OMP_WAIT_POLICY=ACTIVE`` (or ``GOMP_SPINCOUNT``); vistrain then leaves it alone.

libgomp reads ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, when it is loaded, which is at ``import torch``:
:func:`set_wait_policy` must run before that, and does nothing once torch is loaded (``torch.set_num_threads``
still works at any time).  The ``vistrain`` command and the API functions set it before they import torch;
a program that imports torch first keeps whatever policy its environment gave.

This module imports neither torch nor cv2 at import time, so that the command line can use it first.
"""

from __future__ import annotations

import os
import sys

# what vistrain sets when the environment says nothing about the wait policy
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
_USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_wait_policy() -> bool:
    """Make OpenMP threads sleep instead of spinning when they wait (``OMP_WAIT_POLICY=PASSIVE``), unless the
    environment already sets ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME`` (the user's choice wins).

    Returns True when the setting can take effect: torch (and with it libgomp) is not loaded yet.  Once it is,
    the environment is left alone.
    """
    if "torch" in sys.modules:
        return False
    if not any(k in os.environ for k in _USER_KNOBS):
        os.environ.update(WAIT_POLICY)
    return True


def resolve_threads(threads: int | None, workers: int = 0) -> int:
    """The intra-op thread count for ``threads`` (the key): N > 0 is N; 0 (auto) is ``$OMP_NUM_THREADS`` when
    the environment sets it (a positive integer), else the CPUs this process may use minus one per data-loader
    worker, keeping at least half of them (and 1): 1 thread on 2 CPUs with workers (measured there: yolov8n-seg
    training 1.2x faster than 2 threads on an idle machine, 1.1-1.6x beside other work; bench/README.md), 14 on
    16 CPUs with 2 workers, 8 with 8 or more, all of them without workers (only 2 CPUs were measured)."""
    if threads:
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = cpu_count()
    return max(1, cpus - min(max(int(workers or 0), 0), cpus // 2))


def apply_threads(cfg: dict) -> int:
    """Set torch's intra-op threads from ``cfg["threads"]`` (see :func:`resolve_threads`); returns the count.
    Workers count in train and val (and a cfg without a mode); predict loads in the main process."""
    import torch

    workers = 0 if cfg.get("_mode") in ("predict", "summary", "data") else cfg.get("workers", 0)
    n = resolve_threads(cfg.get("threads"), workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def limit_worker_threads() -> None:
    """In a data-loader worker process: one torch thread and no OpenCV thread pool, so that the workers and the
    main process's torch threads do not oversubscribe the cores (torch's own worker loop also sets 1 torch thread;
    OpenCV's pool, which ``cv2.resize``/``warpAffine`` use, it leaves at one thread per CPU per worker)."""
    import torch

    torch.set_num_threads(1)
    try:
        import cv2
    except ImportError:  # cv2 is a dependency; a stripped install just keeps its default
        return
    cv2.setNumThreads(0)  # 0: OpenCV runs its functions sequentially in the calling thread
