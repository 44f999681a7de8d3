"""Small engine helpers: logging, devices, seeds, run folders, EMA."""

from __future__ import annotations

import copy
import errno
import logging
import math
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger("vistrain")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (so redirection and capture keep working)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def setup_logging(verbose: bool = True) -> None:
    """Plain messages to stdout, once per process (library users keep control of their handlers)."""
    if getattr(setup_logging, "_done", False):
        LOGGER.setLevel(logging.INFO if verbose else logging.WARNING)
        return
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO if verbose else logging.WARNING)
    LOGGER.propagate = False
    setup_logging._done = True


class UserError(RuntimeError):
    """An error whose message is meant for the user as it is (a bad path, a bad file, a bad value).

    The CLI prints ``str(e)`` on one line and exits with ``exit_code`` (2 for bad input) without a
    traceback.
    """

    exit_code = 2


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what torch.save's C++ writer raises when the disk fills up mid-write (it does not keep the errno)
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "failed writing")


def is_disk_full(e: BaseException) -> bool:
    """An ``OSError`` ENOSPC/EDQUOT, or torch.save's RuntimeError for a write that came up short."""
    if isinstance(e, OSError):
        return e.errno in DISK_FULL_ERRNOS
    return isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_WRITE_FAILED)


def disk_error_words(e: OSError) -> str | None:
    """'no space left on device', 'read-only file system', ... for the disk errors a user can fix, else None."""
    return {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied"}.get(e.errno)


def disk_error_message(e: OSError, path: str | Path | None = None) -> str | None:
    """One line for a full, read-only or forbidden disk (``None`` for any other error)."""
    what = disk_error_words(e)
    path = path if path is not None else e.filename
    if what is None:
        return None
    if e.errno in DISK_FULL_ERRNOS:
        return f"{what} while writing {path}; free some space and run again" if path else what
    if e.errno == errno.EROFS:
        return f"{what} while writing {path}; choose a writable project=" if path else what
    return f"{what}: {path}" if path else what  # (EACCES may come from reading as well as writing)


def select_device(device: str | int | None) -> torch.device:
    """``None``/'' -> cuda:0 if available else cpu; ``0`` -> cuda:0; 'cpu', 'cuda', 'cuda:1'."""
    if device is None or str(device).strip() == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    s = str(device).strip().lower()
    if re.fullmatch(r"\d+(,\d+)*", s):
        s = f"cuda:{s.split(',')[0]}"
    if s.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device}: CUDA is not available on this machine; use device=cpu")
    try:
        return torch.device(s)
    except RuntimeError:
        raise UserError(f"device={device}: not a device; use cpu, cuda, cuda:N or N") from None


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.use_deterministic_algorithms(False)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: each worker's numpy/random follow torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    from vistrain.utils.threads import limit_worker_threads

    limit_worker_threads()  # one torch thread, no OpenCV pool: workers do not oversubscribe the cores


def increment_path(path: str | Path, exist_ok: bool = False) -> Path:
    """``runs/classify/train`` -> the first of ``train``, ``train2``, ``train3`` ... that is free."""
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    for n in range(2, 10_000):
        candidate = path.with_name(f"{path.name}{n}")
        if not candidate.exists():
            return candidate
    raise UserError(f"{path}: too many runs with this name; choose another name=")


def de_parallel(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


class ModelEMA:
    """Exponential moving average of a model's float state (weights and BN statistics).

    The decay ramps up as ``decay * (1 - exp(-updates / tau))`` so early averages follow the
    fast-changing weights instead of the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = copy.deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay = decay
        self.tau = tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
