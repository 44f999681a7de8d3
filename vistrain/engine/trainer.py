"""The training engine, shared by every task: ``train -> epoch -> step`` with callbacks.

The trainer knows nothing of classification or detection: the task plug-in (``vistrain.tasks``)
supplies datasets, the loss, metrics and plots.  Rank and world size live here, read from the environment
torchrun sets (``vistrain.engine.distributed``), not in module globals: in a DDP run every rank trains on its share
of each batch; rank 0 alone validates, logs, plots, saves and runs the epoch-end callbacks.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from vistrain.engine import distributed as ddp
from vistrain.engine.checkpoint import load_checkpoint, strip_training_state
from vistrain.engine.freeze import Freezer, check_phase_keys, parse_freeze
from vistrain.engine.records import NotValidated, RunRecords
from vistrain.engine.run import (build_run_model, check_writable, get_task_for, prepare_run, public_args,
                                 resolve_model_source)
from vistrain.engine.schedule import first_step_batch, warmup_accumulate, warmup_iterations
from vistrain.engine.utils import LOGGER, ModelEMA, UserError, init_seeds, select_device
from vistrain.engine.validator import make_loader, run_validation
from vistrain.losses.sync import synced
from vistrain.nn.model import set_memory_format
from vistrain.utils.threads import apply_threads
from vistrain.tasks.base import val_batch_size

EVENTS = ("on_train_start", "on_epoch_start", "on_batch_end", "on_epoch_end", "on_train_end")
RANK0_EVENTS = ("on_epoch_end", "on_train_end")  # in a DDP run: on rank 0 only, which holds the metrics
# keys a user may change when resuming; everything else comes from the interrupted run
RESUME_OVERRIDABLE = ("epochs", "time", "patience", "device", "nproc", "workers", "threads", "plots", "verbose")


def find_last_checkpoint(project: str | Path = "runs") -> Path:
    candidates = sorted(Path(project).glob("*/*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"resume=True: no {project}/TASK/NAME/weights/last.pt found; give resume=path/to/last.pt")
    return candidates[-1]


class Trainer(RunRecords):
    """``Trainer(cfg).train()`` trains, validates each epoch, checkpoints, and returns final metrics."""

    def __init__(self, cfg: dict[str, Any], callbacks: dict[str, list[Callable]] | None = None):
        self.callbacks: dict[str, list[Callable]] = defaultdict(list)
        for event, fns in (callbacks or {}).items():
            self.callbacks[event].extend(fns)
        self.rank, self.local_rank, self.world_size = ddp.dist_env()
        self.main = self.rank == 0  # the rank that validates, logs and saves
        self.resume_ckpt = None
        if cfg.get("resume"):
            path = find_last_checkpoint(cfg.get("project") or "runs") if cfg["resume"] is True else Path(cfg["resume"])
            self.resume_ckpt = load_checkpoint(path)
            if "train_args" not in self.resume_ckpt or "optimizer" not in self.resume_ckpt:
                raise UserError(f"resume={path}: not a vistrain last.pt with training state")
            given = set(cfg.get("_user_keys", ()))
            cfg = {**self.resume_ckpt["train_args"], **{k: cfg[k] for k in RESUME_OVERRIDABLE if k in given},
                   "resume": str(path), "_resume_dir": str(path.parent.parent)}
            if "threads" not in given and self.resume_ckpt.get("threads"):
                # the interrupted run's thread count: CPU kernels split their sums by thread, so another count
                # (another workers=, another machine) would change the weights in the last bits, and then more
                cfg["threads"] = int(self.resume_ckpt["threads"])
            LOGGER.info(f"resume: {path} (epoch {self.resume_ckpt['epoch'] + 1} done)")
        self.cfg = cfg

    def add_callback(self, event: str, fn: Callable) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; events: {EVENTS}")
        self.callbacks[event].append(fn)

    def run_callbacks(self, event: str) -> None:
        if not self.main and event in RANK0_EVENTS:
            return
        for fn in self.callbacks.get(event, ()):
            fn(self)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        check_phase_keys(cfg)
        self.threads = apply_threads(cfg)
        if self.world_size > 1:
            self.setup_distributed()
        init_seeds(cfg["seed"], cfg["deterministic"])
        task_name, model_yaml, ckpt = resolve_model_source(cfg)
        self.task = get_task_for(cfg, task_name)
        if cfg.get("_resume_dir"):  # the folder last.pt is in, wherever the run was moved to
            self.save_dir = Path(cfg["_resume_dir"])
            if self.main:
                check_writable(self.save_dir)
        elif self.main:
            _, self.save_dir = prepare_run(cfg, self.task, "train")
        if self.world_size == 1:
            self.device = select_device(cfg.get("device"))
        elif not cfg.get("_resume_dir"):
            self.save_dir = ddp.broadcast_object(getattr(self, "save_dir", None))  # rank 0 numbered the folder
        self.wdir = self.save_dir / "weights"
        if self.main:
            self.wdir.mkdir(parents=True, exist_ok=True)
            (self.save_dir / "args.yaml").write_text(yaml.safe_dump(public_args(cfg), sort_keys=False))

        if not self.main:
            ddp.barrier()  # rank 0 scans the data first (and writes the label cache the others then read)
        self.data = self.task.build_data(cfg)
        if self.main and self.world_size > 1:
            ddp.barrier()
        for line in self.data.summary:
            LOGGER.info(line)
        self.names = self.data.names
        model_yaml = self.resume_ckpt["model_yaml"] if self.resume_ckpt else model_yaml
        self.model = build_run_model(cfg, model_yaml, None if self.resume_ckpt else ckpt, len(self.names))
        self.model.to(self.device)
        set_memory_format(self.model, cfg["channels_last"])
        if hasattr(self.task, "setup_model"):  # e.g. detection: autoanchor, the loss's anchors and strides
            self.task.setup_model(self.model, self.data, cfg, train=self.resume_ckpt is None)
        self.setup_phase()
        if self.world_size > 1 and cfg["sync_bn"]:
            ddp.convert_sync_batchnorm(self.model, self.device)
        if self.main and cfg["plots"] and hasattr(self.task, "plot_labels") and not self.resume_ckpt:
            self.task.plot_labels(self.data.train, self.names, self.save_dir)
        self.amp = bool(cfg["amp"]) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        self.train_loader = self.make_train_loader()
        self.val_loader = make_loader(self.data.val, self.task, val_batch_size(cfg, training=True), cfg["workers"],
                                      shuffle=False, device=self.device) if self.main else None
        self.epochs = cfg["epochs"]
        self.batch_size = self.train_loader.batch_size * self.world_size  # the whole batch, all ranks together
        self.accumulate = max(round(self.nbs / self.batch_size), 1)
        self.build_schedule()
        self.ema = ModelEMA(self.model) if cfg["ema"] else None
        self.start_epoch, self.best_fitness, self.best_epoch = 0, None, -1
        self.csv = self.save_dir / "results.csv"
        if self.resume_ckpt:
            if self.main:
                self.tidy_resumed_run(self.resume_ckpt)
            self.load_training_state(self.resume_ckpt)
        elif self.csv.exists() and self.main:
            self.csv.unlink()
        self.wrap_ddp()

    def setup_distributed(self) -> None:
        """Join the torchrun job; check that the batch splits evenly over the ranks; quiet ranks other than 0."""
        cfg = self.cfg
        self.device = ddp.init_distributed(cfg.get("device"), ddp.DistEnv(self.rank, self.local_rank,
                                                                           self.world_size))
        ddp.check_batch(cfg, self.world_size)
        if not self.main:
            LOGGER.setLevel("ERROR")
        LOGGER.info(f"DDP: {self.world_size} processes ({'NCCL' if self.device.type == 'cuda' else 'gloo'}), "
                    f"batch {cfg['batch']} = {self.world_size} x {cfg['batch'] // self.world_size}"
                    + (", SyncBatchNorm" if cfg["sync_bn"] else ""))

    def wrap_ddp(self) -> None:
        """``self.forward_model``: what a training step calls; DDP around ``self.model`` in a DDP run (built
        again when phase 2 unfreezes parameters: DDP reduces the gradients of those that train when it is built).
        Everything else (EMA, freezing, checkpoints) uses ``self.model`` itself."""
        self.forward_model = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def make_train_loader(self):
        """Shuffled, seeded batches (in order for rectangular batches, whose shapes follow the order); every
        sample a function of (seed, epoch, index), so resume repeats the uninterrupted run."""
        cfg = self.cfg
        batch = cfg["unfreeze_batch"] if self.phase == 2 and cfg.get("unfreeze_batch") else cfg["batch"]
        return make_loader(self.data.train, self.task, batch, cfg["workers"],
                           shuffle=not getattr(self.data.train, "rect", False), seed=cfg["seed"], device=self.device,
                           epoch_keys=True, num_replicas=self.world_size, rank=self.rank)

    @property
    def nbs(self) -> int:
        """Nominal batch size of the phase: ``nbs``, or with nbs=0 the batch (a step per batch, decay as given)."""
        return self.cfg["nbs"] or self.batch_size

    def optimizer_choice(self) -> tuple[str, float, float]:
        """(name, lr0, momentum): optimizer=auto chooses once, from the run's first-phase batch, for the run."""
        if getattr(self, "_optimizer_choice", None) is None:
            cfg = self.cfg
            name, lr, momentum = cfg["optimizer"], cfg["lr0"], cfg["momentum"]
            if name == "auto":
                batch = min(cfg["batch"], max(len(self.data.train), 1))  # the loader's batch in phase 1
                iterations = math.ceil(len(self.data.train) / max(batch, cfg["nbs"] or batch)) * self.epochs
                lr_fit = round(0.002 * 5 / (4 + len(self.names)), 6)
                name, lr, momentum = ("SGD", 0.01, 0.9) if iterations > 10000 else ("AdamW", lr_fit, 0.9)
                given = set(cfg.get("_user_keys", ()))  # an lr0 / momentum given (or sampled by tune) is kept
                lr, momentum = (cfg["lr0"] if "lr0" in given else lr), (cfg["momentum"] if "momentum" in given
                                                                          else momentum)
                self.cfg["warmup_bias_lr"] = 0.0 if name == "AdamW" else cfg["warmup_bias_lr"]
                LOGGER.info(f"optimizer=auto: {name} lr0={lr} momentum={momentum} ({iterations} iterations)")
            self._optimizer_choice = (name, lr, momentum)
        return self._optimizer_choice

    def build_schedule(self) -> None:
        """The phase's optimizer and lr schedule.  Phase 2 with ``unfreeze_lr0`` starts a fresh schedule from it
        over the remaining epochs; without, it takes the lr the run-wide schedule has reached."""
        restart = self.phase == 2 and self.cfg.get("unfreeze_lr0") is not None
        self.optimizer = self.build_optimizer(self.cfg["unfreeze_lr0"] if restart else None)
        self.lf = self.lr_lambda(self.phase_start if restart else 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)

    # ------------------------------------------------------------------ phases (freeze= / freeze_epochs=)
    def setup_phase(self) -> None:
        """Freeze ``freeze=`` (a bad value: one line naming the valid parts) unless the run resumes in phase 2.
        Phase 1: epochs ``0 .. freeze_epochs - 1`` with the parts frozen (all epochs when freeze_epochs is 0);
        phase 2: the rest, everything trains, with ``unfreeze_batch`` / ``unfreeze_lr0``."""
        cfg = self.cfg
        self.freezer = Freezer(parse_freeze(cfg.get("freeze"), self.model))
        two_phases = bool(self.freezer.prefixes) and 0 < (cfg.get("freeze_epochs") or 0) < cfg["epochs"]
        self.unfreeze_epoch = cfg["freeze_epochs"] if two_phases else None
        if self.freezer.prefixes and cfg.get("freeze_epochs", 0) >= cfg["epochs"]:
            LOGGER.warning(f"freeze_epochs={cfg['freeze_epochs']} >= epochs={cfg['epochs']}: frozen the whole run")
        state = (self.resume_ckpt or {}).get("phase") or {}
        self.phase, self.phase_start, self.ni_base = (int(state.get(k, d)) for k, d in
                                                      (("phase", 1), ("start", 0), ("ni_base", 0)))
        if self.phase == 1 and self.freezer.prefixes:
            n = self.freezer.freeze(self.model)
            total = sum(p.numel() for p in self.model.parameters())
            parts = self.freezer.prefixes
            shown = ", ".join(parts) if len(parts) <= 6 else f"{', '.join(parts[:3])}, ..., {parts[-1]}"
            until = f" for epochs 1-{self.unfreeze_epoch}" if self.unfreeze_epoch else ""
            LOGGER.info(f"freeze={cfg['freeze']}: {shown} frozen{until} ({n:,} of {total:,} parameters, "
                        f"BatchNorm statistics fixed)")

    def start_phase2(self) -> None:
        """Unfreeze everything; a fresh optimizer (no state carried over, as the tutorial's new Adam) and lr
        schedule for phase 2's lr; a new train loader when phase 2 has its own batch."""
        self.ni_base += len(self.train_loader) * (self.epoch - self.phase_start)
        self.phase, self.phase_start = 2, self.epoch
        self.freezer.unfreeze(self.model)
        self.optimizer.zero_grad(set_to_none=True)  # (none pending: phase 1 ended with a step)
        if self.cfg.get("unfreeze_batch") and self.cfg["unfreeze_batch"] != self.cfg["batch"]:
            self.train_loader = self.make_train_loader()
        self.batch_size = self.train_loader.batch_size * self.world_size
        self.wrap_ddp()
        self.accumulate = max(round(self.nbs / self.batch_size), 1)
        self.build_schedule()
        self.scheduler.last_epoch = self.epoch - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": it only sets this epoch's lr
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        LOGGER.info(f"\nepoch {self.epoch + 1}: phase 2, every layer trains: batch {self.batch_size} "
                    f"(x{self.accumulate} accumulation), lr {self.optimizer.param_groups[0]['lr']:.4g}, a fresh "
                    f"optimizer{' and schedule' if self.cfg.get('unfreeze_lr0') is not None else ''}")

    def flush_gradients(self) -> None:
        """Step phase 1's optimizer on gradients accumulated since its last step, so none are lost at the switch."""
        if any(p.grad is not None for p in self.model.parameters()):
            self.optimizer_step()
            self.last_opt_step = self.ni_base + len(self.train_loader) * (self.epoch + 1 - self.phase_start) - 1

    def build_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        """Three groups: 0 weights with decay, 1 norm and other 1-D weights (no decay), 2 biases (no decay);
        trainable (not frozen) parameters only.  ``lr``: phase 2's own lr (default: lr0, or optimizer=auto's)."""
        cfg = self.cfg
        name, lr0, momentum = self.optimizer_choice()
        self.lr0 = lr0 if lr is None else lr
        lr = self.lr0
        decay = cfg["weight_decay"] * self.batch_size * self.accumulate / self.nbs
        groups: list[list[nn.Parameter]] = [[], [], []]
        norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
        for module in self.model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                # no decay for norm weights and other 1-D weights (BiFPN fusion weights), as timm and effdet
                groups[2 if pname == "bias" else 1 if isinstance(module, norm_types) or p.ndim <= 1 else 0].append(p)
        param_groups = [{"params": groups[0], "weight_decay": decay}, {"params": groups[1], "weight_decay": 0.0},
                        {"params": groups[2], "weight_decay": 0.0}]
        if name == "SGD":
            opt = torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=cfg["nesterov"])
        elif name in ("Adam", "AdamW"):
            opt = getattr(torch.optim, name)(param_groups, lr=lr, betas=(momentum, 0.999))
        else:
            raise UserError(f"optimizer={name}: use SGD, Adam, AdamW or auto")
        return opt

    def lr_lambda(self, start: int = 0) -> Callable[[int], float]:
        """lr / lr0 at epoch ``x`` of a schedule that starts at epoch ``start`` and ends with the run."""
        lrf, epochs, gamma = self.cfg["lrf"], max(self.epochs - start, 1), self.cfg.get("lr_step_gamma")
        if gamma:
            return lambda x: gamma ** max(x - start, 0)  # torch's StepLR(step_size=1, gamma)
        if self.cfg["cos_lr"]:
            return lambda x: ((1 - math.cos((x - start) * math.pi / epochs)) / 2) * (lrf - 1) + 1
        return lambda x: max(1 - (x - start) / epochs, 0) * (1.0 - lrf) + lrf

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        try:
            results = self._train()
        finally:
            if self.world_size > 1:
                ddp.cleanup()
        out = os.environ.get(ddp.RESULTS_ENV)
        if out and self.main and self.world_size > 1:  # for vistrain.train(), which started torchrun
            Path(out).write_text(json.dumps(results, default=str))
        return results

    def _train(self) -> dict[str, Any]:
        self.setup()
        cfg = self.cfg
        nb = len(self.train_loader)
        warmup_epochs = min(cfg["warmup_epochs"], self.unfreeze_epoch or cfg["warmup_epochs"])  # in phase 1 only
        self.warmup_iters = warmup_iterations(warmup_epochs, self.epochs, nb)
        self.time_limit = cfg["time"] * 3600 if cfg.get("time") else None
        self.t_start = time.time()
        self.stop = False
        self.last_opt_step = getattr(self, "resume_last_opt_step", -1)
        self.check_optimizer_steps(nb)
        LOGGER.info(f"train: {len(self.data.train)} images, val: {len(self.data.val)} images, {len(self.names)} "
                    f"classes, imgsz {cfg['imgsz']}, batch {self.batch_size} (x{self.accumulate} accumulation), "
                    f"device {self.device}" + (f", {self.threads} CPU threads" if self.device.type == "cpu" else "")
                    + f"\nLogging results to {self.save_dir}")
        self.run_callbacks("on_train_start")
        # gradients accumulate across epoch boundaries (an optimizer step every `accumulate` batches of
        # the whole run, as YOLOv5 and ultralytics do): zeroed here (unless resumed with pending ones, which
        # the checkpoint carries) and after each step only
        if not getattr(self, "resumed_grads", False):
            self.optimizer.zero_grad(set_to_none=True)
        epoch = self.start_epoch
        for epoch in range(self.start_epoch, self.epochs):
            self.epoch = epoch
            if self.phase == 1 and epoch == self.unfreeze_epoch:
                self.start_phase2()
            self.run_callbacks("on_epoch_start")
            if hasattr(self.task, "epoch_start") and self.task.epoch_start(self):
                self.train_loader = self.make_train_loader()
            train_losses = self.train_epoch()
            if self.phase == 1 and epoch + 1 == self.unfreeze_epoch:
                self.flush_gradients()  # phase 1's optimizer takes the batches since its last step
            self.epoch_lrs = [g["lr"] for g in self.optimizer.param_groups]  # the lrs this epoch ended with
            self.scheduler.step()
            if self.main:
                self.end_epoch(train_losses)
            if self.world_size > 1:
                self.stop = ddp.broadcast_object(self.stop)  # (the others wait here while rank 0 validates)
            if self.stop:
                break
        if not self.main:
            return {"save_dir": str(self.save_dir), "rank": self.rank}
        return self.final()

    def end_epoch(self, train_losses: torch.Tensor) -> None:
        """Validate (with ``val=False`` only after the last epoch), save, log; decide whether to stop (patience,
        time)."""
        cfg, epoch = self.cfg, self.epoch
        validate = cfg.get("val", True) or self.stop or epoch + 1 == self.epochs or self.time_runs_out()
        if validate:
            val_model = self.ema.ema if self.ema else self.model
            metrics, val_losses = run_validation(val_model, self.val_loader, self.task, self.names, self.device,
                                                 self.amp)
        else:  # the row keeps its columns, without values
            metrics = NotValidated(self.task.new_metrics(self.names))
            val_losses = torch.full((len(self.task.loss_names),), float("nan"))
        self.metrics = metrics
        fitness = metrics.fitness()
        improved = validate and (self.best_fitness is None or fitness > self.best_fitness)
        if improved:
            self.best_fitness, self.best_epoch = fitness, epoch
        self.epoch_row = self.results_row(train_losses, metrics, val_losses)
        self.save_checkpoints(improved)  # before the csv row: results.csv lists only epochs that were saved
        self.log_epoch(self.epoch_row, metrics, val_losses)
        self.run_callbacks("on_epoch_end")
        if validate and cfg["patience"] and epoch - self.best_epoch >= cfg["patience"]:
            LOGGER.info(f"early stop: no improvement in the last {cfg['patience']} epochs "
                        f"(best epoch {self.best_epoch + 1})")
            self.stop = True
        if not self.stop and self.time_runs_out():
            LOGGER.info(f"time limit: {cfg['time']} h reached after epoch {epoch + 1}")
            self.stop = True

    def time_runs_out(self) -> bool:
        """Whether another epoch as long as the average so far would pass the ``time`` limit."""
        if not self.time_limit:
            return False
        elapsed = time.time() - self.t_start
        return elapsed + elapsed / (self.epoch + 1 - self.start_epoch) > self.time_limit

    def train_epoch(self) -> torch.Tensor:
        cfg, nb = self.cfg, len(self.train_loader)
        self.model.train()
        self.freezer.bn_eval(self.model)  # frozen parts' BatchNorm statistics stay as they are
        self.train_loader.sampler.set_epoch(self.epoch)  # order and augmentation: functions of (seed, epoch, index)
        mean_loss = torch.zeros(len(self.task.loss_names))
        counted = 0  # batches in the running means (a skipped non-finite batch is not)
        train_metric_names = getattr(self.task, "train_metric_names", ())
        self.train_metric_means = torch.zeros(len(train_metric_names))
        names = " ".join(f"{n:>9}" for n in self.task.loss_names)
        LOGGER.info(f"\n{'Epoch':>10}{'GPU_mem':>10} {names} {'img/s':>9}")
        bar = tqdm(enumerate(self.train_loader), total=nb, dynamic_ncols=True, mininterval=0.5,
                   bar_format="{l_bar}{bar:10}{r_bar}", disable=not self.main)
        t0, seen = time.time(), 0
        for i, batch in bar:
            ni = self.ni_base + i + nb * (self.epoch - self.phase_start)  # batches since the run began
            if self.phase == 1 and ni <= self.warmup_iters:
                self.warmup(ni)
            batch = self.task.preprocess(batch, self.device)
            with torch.autocast(self.device.type, enabled=self.amp), synced(self.world_size > 1):
                preds = self.forward_model(batch["img"])
                loss, items = self.task.loss(preds, batch)  # (DDP: normalised by the whole batch's counts)
            if not self.loss_is_finite(loss):
                continue
            self.scaler.scale(loss).backward()
            if ni - self.last_opt_step >= self.accumulate:
                self.optimizer_step()
                self.last_opt_step = ni
            mean_loss = (mean_loss * counted + items.detach().float().cpu()) / (counted + 1)
            if train_metric_names:
                batch_metrics = self.task.train_metrics(preds, batch).float().cpu()
                self.train_metric_means = (self.train_metric_means * counted + batch_metrics) / (counted + 1)
            counted += 1
            seen += batch["img"].shape[0] * self.world_size
            mem = f"{torch.cuda.memory_reserved() / 2**30:.3g}G" if self.device.type == "cuda" else "0G"
            values = " ".join(f"{float(v):>9.4g}" for v in mean_loss)
            bar.set_description(f"{self.epoch + 1:>4}/{self.epochs:<5}{mem:>10} {values} "
                                f"{seen / max(time.time() - t0, 1e-9):>9.1f}")
            self.run_callbacks("on_batch_end")
            over_time = bool(self.time_limit) and time.time() - self.t_start > self.time_limit
            if over_time if self.world_size == 1 else self.time_limit and ddp.any_rank(over_time, self.device):
                LOGGER.info(f"time limit: {cfg['time']} h reached during epoch {self.epoch + 1}")
                self.stop = True
                break
            if self.epoch == self.start_epoch and i < 3 and cfg["plots"] and self.main:
                self.task.plot_batch(batch, self.names, self.save_dir / f"train_batch{i}.jpg")
        bar.close()
        self.train_speed = seen / max(time.time() - t0, 1e-9)
        if self.world_size > 1:  # the whole batch's means (each rank's terms are its share of them)
            mean_loss = ddp.mean_over_ranks(mean_loss.to(self.device)).cpu()
            if train_metric_names:
                self.train_metric_means = ddp.mean_over_ranks(self.train_metric_means.to(self.device)).cpu()
        return mean_loss

    def warmup(self, ni: int) -> None:
        """Ramp lr from 0 (bias group: from warmup_bias_lr), momentum from warmup_momentum, accumulation from 1."""
        cfg, xi = self.cfg, [0, self.warmup_iters]
        self.accumulate = warmup_accumulate(ni, self.warmup_iters, self.nbs, self.batch_size)
        for j, group in enumerate(self.optimizer.param_groups):
            start = cfg["warmup_bias_lr"] if j == 2 else 0.0
            group["lr"] = float(np.interp(ni, xi, [start, group["initial_lr"] * self.lf(self.epoch)]))
            if "momentum" in group:
                group["momentum"] = float(np.interp(ni, xi, [cfg["warmup_momentum"], cfg["momentum"]]))

    def check_optimizer_steps(self, nb: int) -> None:
        """Stop before the first epoch when the run would never step the optimizer (too few batches for the
        gradient accumulation ``nbs / batch``): it would 'complete' and save an untrained best.pt."""
        cfg, bs, s = self.cfg, self.batch_size, self.phase_start  # (batch indices counted from the phase's start)
        if first_step_batch(self.start_epoch - s, self.epochs - s, nb, self.warmup_iters if self.phase == 1 else -1,
                            self.nbs, bs, self.last_opt_step - self.ni_base) is not None:
            return
        total = (self.epochs - self.start_epoch) * nb
        acc = max(round(self.nbs / bs), 1)
        why = (f"no optimizer step would be taken: {total} batch(es) of {bs} in {self.epochs - self.start_epoch} "
               f"epoch(s) ({len(self.data.train)} train images), but with nbs={self.nbs} the optimizer steps "
               f"once every {acc} batches (nbs / batch")
        if self.resume_ckpt:
            raise UserError(f"{why}); resume with a larger epochs=")
        no_warmup = f", no warmup at epochs={self.epochs} warmup_epochs={cfg['warmup_epochs']}"
        raise UserError(f"{why}{no_warmup if not self.warmup_iters else ''}); lower nbs (nbs={bs * max(total, 1)} "
                        f"or less), or give more images or epochs (epochs >= 2 with warmup_epochs > 0 steps from "
                        f"the first batch)")

    MAX_BAD_STEPS = 10  # non-finite losses / gradients in a row before training stops

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        """A NaN/inf loss is skipped (no backward, no step) so the weights stay finite; many in a row stop
        the run with a message instead of training on garbage."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.world_size > 1:  # every rank skips the batch, or none: DDP's backward is a collective
            finite = not ddp.any_rank(not finite, self.device)
        if finite:
            self.bad_steps = 0
            return True
        self.bad_steps = getattr(self, "bad_steps", 0) + 1
        self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
        if self.skipped_steps == 1:
            LOGGER.warning(f"non-finite loss ({float(loss.detach().float().sum())}) in epoch {self.epoch + 1}: batch "
                           f"skipped (the count is in the final summary)")
        if self.bad_steps >= self.MAX_BAD_STEPS:
            raise UserError(f"training diverged: the loss was NaN/inf for {self.bad_steps} batches in a row in epoch "
                            f"{self.epoch + 1}; lower lr0 (now {self.lr0}), lengthen warmup_epochs, or check the data")
        return False

    def optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.cfg["clip_grad"]:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.cfg["clip_grad"])
            if not self.amp and not bool(torch.isfinite(norm)):  # (AMP's scaler skips such steps itself)
                self.optimizer.zero_grad(set_to_none=True)
                self.loss_is_finite(norm)  # counted and reported like a non-finite loss
                return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)
            self.freezer.copy_frozen(self.model, self.ema.ema)

    def final(self) -> dict[str, Any]:
        """Validate best.pt, print the per-class report, write plots; return the final metrics."""
        best = self.wdir / "best.pt"
        hours = (time.time() - self.t_start) / 3600
        LOGGER.info(f"\n{self.epoch - self.start_epoch + 1} epochs completed in {hours:.3f} hours.")
        if getattr(self, "skipped_steps", 0):
            LOGGER.warning(f"{self.skipped_steps} batches skipped for a non-finite loss or gradient")
        model = self.ema.ema if self.ema else self.model
        if best.exists():
            strip_training_state(best)  # the run is over: best.pt is for inference and fine-tuning; last.pt resumes
            model.load_state_dict(load_checkpoint(best)["model"])
        metrics, val_losses = run_validation(model, self.val_loader, self.task, self.names, self.device, self.amp,
                                             plot_dir=self.save_dir if self.cfg["plots"] else None)
        LOGGER.info(f"Validating {best} (best epoch {self.best_epoch + 1}):")
        for line in self.task.report(metrics, self.names):
            LOGGER.info(line)
        if self.cfg["plots"]:
            self.plot_results()
            self.task.plot_metrics(metrics, self.names, self.save_dir)
        LOGGER.info(f"Results saved to {self.save_dir}")
        self.run_callbacks("on_train_end")
        results = {**metrics.results(), "fitness": metrics.fitness(), "best_epoch": self.best_epoch + 1,
                   "epochs_done": self.epoch + 1, "train_img_s": getattr(self, "train_speed", None),
                   "save_dir": str(self.save_dir)}
        results.update({f"val/{n}": float(v) for n, v in zip(self.task.loss_names, val_losses)})
        return results
