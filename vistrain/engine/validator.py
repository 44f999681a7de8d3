"""Validation: one loop for every task, and the ``val`` mode."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vistrain.engine.utils import LOGGER
from vistrain.nn.model import set_memory_format


@torch.no_grad()
def run_validation(model: nn.Module, loader, task, names: list[str], device: torch.device, amp: bool = False,
                   desc: str = "val", plot_dir: Path | None = None, progress: bool = True) -> tuple[Any, torch.Tensor]:
    """Run ``model`` over ``loader``; return ``(metrics, mean loss items Tensor[len(task.loss_names)])``.

    When ``plot_dir`` is given, the first three batches are drawn with their labels and with the predictions.
    """
    was_training = model.training
    model.eval()
    exported = getattr(model, "exported", False)  # an exported file: decoded outputs, no loss
    metrics = task.new_metrics(names)
    loss_sum = torch.zeros(len(task.loss_names), device=device)
    batches = 0
    bar = tqdm(loader, desc=f"{desc:>12}", leave=False, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for i, batch in enumerate(bar):
        batch = task.preprocess(batch, device)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            preds = model(batch["img"])
        if exported:
            task.update_metrics(metrics, preds, batch, decoded=True)
            continue
        loss_sum += task.loss(preds, batch)[1]
        batches += 1
        task.update_metrics(metrics, preds, batch)
        if plot_dir is not None and i < 3:
            task.plot_batch(batch, names, plot_dir / f"val_batch{i}_labels.jpg")
            task.plot_batch(batch, names, plot_dir / f"val_batch{i}_pred.jpg", preds=preds)
    model.train(was_training)
    return metrics, (loss_sum / max(batches, 1)).cpu()


def make_loader(dataset, task, batch: int, workers: int, shuffle: bool, seed: int = 0, device=None,
                epoch_keys: bool = False, num_replicas: int = 1, rank: int = 0):
    """A DataLoader with the task's collate, seeded shuffling and persistent workers.

    ``epoch_keys`` (training): an :class:`~vistrain.data.sampler.EpochSampler` gives the dataset
    ``SampleKey(index, epoch)``, so each sample and each epoch's order are functions of (seed, epoch, index);
    call ``loader.sampler.set_epoch(epoch)`` before each epoch.  In a DDP run (``num_replicas`` > 1, training only)
    ``batch`` is the total over the ranks: this rank loads ``batch / num_replicas`` images of its share."""
    from vistrain.data.sampler import EpochSampler
    from vistrain.engine.utils import seed_worker

    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas,
                           rank=rank) if epoch_keys else None
    n = len(sampler) if sampler is not None else len(dataset)
    batch = batch // num_replicas
    workers = min(workers, batch) if n > batch else min(workers, 1)
    return torch.utils.data.DataLoader(
        dataset, batch_size=min(batch, max(n, 1)), shuffle=shuffle and sampler is None,
        sampler=sampler, num_workers=workers,
        collate_fn=task.collate_fn, pin_memory=bool(device is not None and device.type == "cuda"),
        persistent_workers=workers > 0, worker_init_fn=seed_worker, generator=generator, drop_last=False)


def val(cfg: dict) -> dict[str, Any]:
    """The ``val`` mode: score a model (checkpoint or fresh) on the validation split of ``data``."""
    from vistrain.engine.run import prepare_run, resolve_task_and_model, user_keys

    cfg["_mode"] = "val"
    task, model, ckpt = resolve_task_and_model(cfg, need_model=True)
    if ckpt and not cfg.get("data") and ckpt.get("train_args", {}).get("data"):
        cfg["data"] = ckpt["train_args"]["data"]
    if ckpt and ckpt.get("imgsz") and "imgsz" not in user_keys(cfg):
        cfg["imgsz"] = ckpt["imgsz"]
    device, save_dir = prepare_run(cfg, task, default_name="val")
    data = task.build_data(cfg, need_train=False)
    for line in data.summary:
        LOGGER.info(line)
    names = data.names
    if ckpt and ckpt.get("names") and list(ckpt["names"]) != names:
        from vistrain.engine.utils import UserError

        raise UserError(f"data={data.source}: its classes {names} differ from the model's {list(ckpt['names'])}")
    loader = make_loader(data.val, task, cfg["batch"], cfg["workers"], shuffle=False, device=device)
    if ckpt.get("exported"):
        if not ckpt["exported"].get("dynamic_hw") and getattr(data.val, "rect", False):
            data.val.square()  # an export of fixed size: every batch letterboxed to its square
    else:
        model = set_memory_format(model.to(device), cfg["channels_last"])
        if hasattr(task, "setup_model"):
            task.setup_model(model, data, cfg, train=False)
    t0 = time.time()
    metrics, losses = run_validation(model, loader, task, names, device, plot_dir=save_dir if cfg["plots"] else None)
    results = {**metrics.results(), "fitness": metrics.fitness()}
    if not ckpt.get("exported"):  # an exported model gives no raw outputs to compute the loss on
        results.update({f"val/{k}": float(v) for k, v in zip(task.loss_names, losses)})
    for line in task.report(metrics, names):
        LOGGER.info(line)
    LOGGER.info(f"Speed: {1000 * (time.time() - t0) / max(len(data.val), 1):.1f} ms per image, "
                f"{len(data.val)} images. Results saved to {save_dir}")
    if cfg["plots"]:
        task.plot_metrics(metrics, names, save_dir)
    if cfg["save_json"]:
        (save_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        if hasattr(task, "save_json"):
            task.save_json(metrics, save_dir)
    results["save_dir"] = str(save_dir)
    return results
