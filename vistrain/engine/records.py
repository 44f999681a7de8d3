"""What a training run records: results.csv rows and the validation line, results.png, and the checkpoints
(``last.pt``, ``best.pt``, ``epochN.pt``) with the state that makes resume exact; the methods ``Trainer`` inherits."""

from __future__ import annotations

import csv
import time
import warnings
from typing import Any

import torch

from vistrain.engine.checkpoint import save_checkpoint
from vistrain.engine.run import public_args
from vistrain.engine.utils import LOGGER, UserError, de_parallel

RESULTS_PLOT_EVERY_S = 60.0  # results.png is redrawn after an epoch at most this often (about 1 s a time), and at the end


def csv_values(row: dict[str, Any]) -> dict[str, Any]:
    """A results.csv row as written: floats to 6 significant digits."""
    return {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}


class NotValidated:
    """The metrics of an epoch that ``val=False`` did not validate: the task's metric names, NaN values."""

    def __init__(self, empty):
        self.names = list(empty.results())

    def results(self) -> dict[str, float]:
        return {k: float("nan") for k in self.names}

    def fitness(self) -> float:
        return float("nan")


class RunRecords:
    """results.csv, results.png and checkpoints of a ``Trainer`` (which sets every attribute used here)."""

    def results_row(self, train_losses: torch.Tensor, metrics, val_losses: torch.Tensor) -> dict[str, Any]:
        """This epoch's results.csv row (also stored in the checkpoint, so resume can restore a row a crash lost)."""
        row = {"epoch": self.epoch + 1}
        if self.freezer.prefixes:
            row["frozen"] = int(self.phase == 1)  # 1: epochs with freeze= applied (phase 1), 0: phase 2
        row.update({f"train/{n}": float(v) for n, v in zip(self.task.loss_names, train_losses)})
        row.update({f"train/{n}": float(v) for n, v in zip(getattr(self.task, "train_metric_names", ()),
                                                            self.train_metric_means)})
        row.update({k: float(v) for k, v in metrics.results().items()})
        row.update({f"val/{n}": float(v) for n, v in zip(self.task.loss_names, val_losses)})
        row.update({f"lr/pg{j}": lr for j, lr in enumerate(self.epoch_lrs)})
        row["time"] = round(time.time() - self.t_start + self.elapsed_before, 2)
        return row

    def log_epoch(self, row: dict[str, Any], metrics, val_losses: torch.Tensor) -> None:
        """Append ``row`` to results.csv, print the validation line, redraw results.png now and then."""
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(csv_values(row))
        vloss = "  ".join(f"{n} {float(v):.4g}" for n, v in zip(self.task.loss_names, val_losses))
        if isinstance(metrics, NotValidated):
            LOGGER.info(f"{'val':>10}  val=False: after the last epoch  ({self.train_speed:.1f} img/s train)")
        elif hasattr(metrics, "summary_lines"):  # detect / segment: the header and the 'all' row of val's table
            for line in metrics.summary_lines(per_class=False):
                LOGGER.info(line)
            LOGGER.info(f"{'val loss':>22}  {vloss}  ({self.train_speed:.1f} img/s train)")
        else:
            shown = "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.results().items())
            LOGGER.info(f"{'val':>10}  {shown}  val {vloss}  ({self.train_speed:.1f} img/s train)")
        if self.cfg["plots"] and time.time() - getattr(self, "results_plotted_at", 0.0) >= RESULTS_PLOT_EVERY_S:
            self.plot_results()

    def plot_results(self) -> None:
        from vistrain.utils.plotting import plot_results

        if self.csv.exists():
            plot_results(self.csv)
        self.results_plotted_at = time.time()

    @property
    def elapsed_before(self) -> float:
        return float(self.resume_ckpt.get("elapsed", 0.0)) if self.resume_ckpt else 0.0

    def checkpoint_dict(self) -> dict[str, Any]:
        model = de_parallel(self.model)
        infer = self.ema.ema if self.ema else model
        return {
            "version": 1, "epoch": self.epoch, "best_fitness": self.best_fitness, "best_epoch": self.best_epoch,
            "model": {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
                      for k, v in infer.state_dict().items()},  # NCHW on disk, whatever the training layout
            "train_model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            "ema_updates": self.ema.updates if self.ema else 0, "last_opt_step": self.last_opt_step,
            # gradients of batches waiting for the next optimizer step (accumulation spans epochs)
            "grads": {k: p.grad.detach().cpu().contiguous() for k, p in model.named_parameters()
                      if p.grad is not None},
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "model_yaml": model.yaml, "task": self.task.name, "names": list(self.names),
            "imgsz": self.cfg["imgsz"], "train_args": public_args(self.cfg),
            "metrics": {k: float(v) for k, v in self.metrics.results().items()},
            "elapsed": time.time() - self.t_start + self.elapsed_before,
            "rng": torch.get_rng_state(), "threads": torch.get_num_threads(),
            "results_row": dict(getattr(self, "epoch_row", {})),
            "task_state": self.task.state() if hasattr(self.task, "state") else {},
            "phase": {"phase": self.phase, "start": self.phase_start, "ni_base": self.ni_base},
        }

    def save_checkpoints(self, improved: bool) -> None:
        ckpt = self.checkpoint_dict()
        save_checkpoint(ckpt, self.wdir / "last.pt")
        if improved:
            save_checkpoint(ckpt, self.wdir / "best.pt")
        period = self.cfg.get("save_period") or 0
        if period > 0 and (self.epoch + 1) % period == 0:
            save_checkpoint(ckpt, self.wdir / f"epoch{self.epoch + 1}.pt")

    def load_training_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["train_model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema:
            self.ema.ema.load_state_dict(ckpt["model"])
            self.ema.updates = int(ckpt.get("ema_updates", 0))
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.resume_last_opt_step = int(ckpt.get("last_opt_step", -1))
        params = dict(self.model.named_parameters())
        for k, g in (ckpt.get("grads") or {}).items():
            params[k].grad = torch.empty_like(params[k]).copy_(g)  # in the parameter's memory layout
        self.resumed_grads = bool(ckpt.get("grads"))
        self.best_fitness, self.best_epoch = ckpt.get("best_fitness"), int(ckpt.get("best_epoch", -1))
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"])
        if self.start_epoch >= self.epochs:
            raise UserError(f"resume: the run already finished its {self.epochs} epochs; start a new run, or "
                            f"resume with a larger epochs=")
        self.scheduler.last_epoch = self.start_epoch - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended on resume
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def tidy_resumed_run(self, ckpt: dict) -> None:
        """Remove the temp files of saves that a killed run left in weights/, and make results.csv list exactly
        the epochs up to the checkpoint's: rows of later epochs (not saved) go, the checkpoint's own row comes
        back from the checkpoint if a crash lost it."""
        for pattern in ("last.pt.*.tmp", "best.pt.*.tmp"):
            for tmp in self.wdir.glob(pattern):
                tmp.unlink(missing_ok=True)
        done = int(ckpt["epoch"]) + 1
        rows, fields = [], None
        if self.csv.exists():
            with open(self.csv, newline="") as f:
                reader = csv.DictReader(f)
                rows, fields = list(reader), reader.fieldnames
        kept = {}
        for r in rows:  # a row cut short by a full disk has missing (None) fields: dropped
            if None not in r and None not in r.values() and str(r.get("epoch", "")).isdigit():
                if int(r["epoch"]) <= done:
                    kept[int(r["epoch"])] = r
        saved = ckpt.get("results_row")
        if done not in kept and saved:
            kept[done] = csv_values(saved)
        if [kept[e] for e in sorted(kept)] == rows:
            return
        fields = fields or list(saved or {})
        tmp = self.csv.with_name(self.csv.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept[e] for e in sorted(kept))
        tmp.replace(self.csv)
        LOGGER.info(f"resume: results.csv now lists the epochs up to {done}, the last one saved")
