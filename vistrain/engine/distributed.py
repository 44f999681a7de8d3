"""Several processes, one training run: ``torchrun`` starts them, ``torch.distributed`` (DDP) joins them.

Nothing here launches processes by itself or keeps rank in a module global: the rank, local rank and world size are
what torchrun put in the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), read once by the trainer.
``vistrain train device=0,1`` (or ``device=cpu nproc=2``) re-runs the same command line under
``python -m torch.distributed.run`` (torchrun) and waits for it; torchrun's own options give multi-node runs.

What makes N processes train as one: every rank draws its share of each global batch (:class:`ShardedEpochSampler`:
the permutation of (seed, epoch), rank ``r`` taking places ``r, r + N, ...``), DDP averages the gradients, and the
losses' batch-wide normalisers (number of positives, target-score sums) are summed over the ranks during a training
step (:mod:`vistrain.losses.sync`), so with ``sync_bn=True`` a step on N x ``batch / N`` images equals one on
``batch`` images in one process.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from vistrain.engine.utils import LOGGER, UserError, select_device

# how long a rank waits for the others at a collective (rank 0 validates and saves while the others wait);
# a rank that dies is noticed at once by torchrun, which stops the others
TIMEOUT_S = int(os.environ.get("VISTRAIN_DIST_TIMEOUT", "1800"))


class DistEnv(NamedTuple):
    rank: int
    local_rank: int
    world_size: int


def dist_env() -> DistEnv:
    """This process's place in a torchrun job (``0, 0, 1`` outside one)."""
    env = os.environ
    return DistEnv(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def device_ids(device: Any) -> list[int]:
    """``'0,1'`` -> ``[0, 1]``; other device strings -> ``[]``."""
    s = str(device if device is not None else "").strip().replace(" ", "")
    return [int(i) for i in s.split(",")] if re.fullmatch(r"\d+(,\d+)*", s) else []


def rank_device(device: Any, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` on its machine: ``device=0,1`` gives local rank 1 ``cuda:1``;
    ``cpu`` stays ``cpu``; an empty device or ``cuda`` gives ``cuda:LOCAL_RANK`` where CUDA is available."""
    ids = device_ids(device)
    if ids:
        if local_rank >= len(ids):
            raise UserError(f"device={device}: {len(ids)} GPU(s) for local rank {local_rank}; give one GPU per "
                            f"process (torchrun --nproc_per_node {len(ids)})")
        return select_device(str(ids[local_rank]))
    s = str(device or "").strip().lower()
    if s in ("", "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return select_device(device)


def init_distributed(device: Any, env: DistEnv) -> torch.device:
    """Join the torchrun job (NCCL on GPUs, gloo on CPUs) with a timeout; returns this rank's device."""
    dev = rank_device(device, env.local_rank)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=TIMEOUT_S),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return dev


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (a plain Python value)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any one (a decision all ranks must take together)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def peer_failed(e: BaseException) -> bool:
    """Whether ``e`` is a collective that broke because another rank of the job went away."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    words = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out")
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in words)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` (detached) averaged over the ranks."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` normalising with the statistics of the whole batch, all ranks together, on CPU (gloo), where
    torch's ``SyncBatchNorm`` refuses to run (CUDA only).  Mean and variance are summed over the ranks in two passes
    (the sum, then the squared deviations from the mean) with the differentiable ``all_reduce`` of torch's
    functional collectives, so the gradients flow to every rank's inputs; outside a DDP training step it is
    BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import torch.distributed._functional_collectives as funcol

        def all_reduce(t: torch.Tensor) -> torch.Tensor:  # (differentiable: its backward sums the gradients)
            return funcol.wait_tensor(funcol.all_reduce(t, "sum", dist.group.WORLD))

        c = x.shape[1]
        count = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat((x.sum((0, 2, 3)), count)))
        n = sums[-1]
        mean = sums[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce(centred.pow(2).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(float(n) - 1, 1.0)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` synchronised over the ranks: torch's SyncBatchNorm on GPUs,
    :class:`CPUSyncBatchNorm` on CPUs (weights and statistics kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device=device)
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if getattr(child, key, None) is not None:
                    setattr(new, key, getattr(child, key))  # the same tensors (parameters keep requires_grad)
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model


# ---------------------------------------------------------------------------------------------- launching torchrun
def processes_wanted(cfg: dict) -> int:
    """How many processes a training ``cfg`` asks for: the GPUs in ``device=0,1``, else ``nproc`` (1 = this
    process).  ``resume=`` takes the interrupted run's device and nproc unless given again."""
    cfg = dict(cfg)
    if cfg.get("resume"):
        from vistrain.engine.checkpoint import load_checkpoint
        from vistrain.engine.trainer import find_last_checkpoint

        path = find_last_checkpoint(cfg.get("project") or "runs") if cfg["resume"] is True else cfg["resume"]
        given = set(cfg.get("_user_keys", ()))
        if Path(path).is_file():  # (a missing one: the trainer's message)
            saved = load_checkpoint(path).get("train_args") or {}
            cfg.update({k: saved.get(k) for k in ("device", "nproc") if k not in given})
    ids = device_ids(cfg.get("device"))
    if len(ids) > 1:
        return len(ids)
    return max(int(cfg.get("nproc") or 1), 1)


def check_batch(cfg: dict, nproc: int) -> None:
    """``batch`` (and ``unfreeze_batch``) is the total over the processes: it must split evenly; the GPUs of
    ``device=0,1`` must exist (checked before any process starts)."""
    for i in device_ids(cfg.get("device")):
        if not torch.cuda.is_available():
            raise UserError(f"device={cfg['device']}: CUDA is not available on this machine; use device=cpu "
                            f"(nproc=N for N CPU processes)")
        if i >= torch.cuda.device_count():
            raise UserError(f"device={cfg['device']}: GPU {i} does not exist; this machine has "
                            f"{torch.cuda.device_count()} (0..{torch.cuda.device_count() - 1})")
    for key in ("batch", "unfreeze_batch"):
        if nproc > 1 and cfg.get(key) and cfg[key] % nproc:
            near = cfg[key] // nproc * nproc or nproc
            raise UserError(f"{key}={cfg[key]} is the batch of all {nproc} processes together; give a multiple of "
                            f"{nproc} ({key}={near})")


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """torchrun (``torch.distributed.run``) ``--standalone --nproc_per_node N -m vistrain ARGV``, through
    :func:`torchrun_main` (one machine; for several, run torchrun yourself with ``--nnodes --node_rank
    --rdzv_endpoint``)."""
    return [sys.executable, "-m", "vistrain.engine.distributed", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "vistrain", *argv]


def torchrun_main(argv: list[str]) -> int:
    """torchrun itself, ending with one line instead of its traceback when a rank fails (the rank printed its own
    message above); returns the first failed rank's exit status (2 for bad input), or 1 for a signal."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"exit status {failure.exitcode}" if failure.exitcode > 0 else f"signal {failure.signal_name()}"
        print(f"vistrain: rank {rank} failed ({how}); torchrun stopped the other processes", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def launch(argv: list[str], nproc: int, results_json: str | Path | None = None) -> int:
    """Run ``vistrain ARGV`` in ``nproc`` processes under torchrun, here; returns torchrun's exit status (a rank
    that fails stops the others; torchrun names it and its error).  ``results_json``: where rank 0 writes the
    final metrics (``vistrain.train`` reads them back)."""
    cmd = torchrun_command(argv, nproc)
    LOGGER.info(f"DDP: {nproc} processes: torchrun {shlex.join(cmd[3:])}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if results_json:
        env[RESULTS_ENV] = str(results_json)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # python -m vistrain.engine.distributed TORCHRUN-ARGS (what launch runs)
    sys.exit(torchrun_main(sys.argv[1:]))


RESULTS_ENV = "VISTRAIN_RESULTS_JSON"


def cli_args(kwargs: dict[str, Any]) -> list[str]:
    """``vistrain.train`` keywords as ``key=value`` command-line arguments (for :func:`launch`)."""
    out = []
    for k, v in kwargs.items():
        if isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        out.append(f"{k}={v}")
    return out
