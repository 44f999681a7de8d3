"""The task plug-in boundary: what the engine asks of classify / detect / segment.

The trainer, validator and predictor are task-agnostic; a task is a small object that knows its
data, its loss, how its raw model outputs become metrics and predictions, and how to draw them.
The model stays pure: ``model(x)`` returns raw head tensors, and everything a loss or
post-processing needs (``num_classes``, strides, anchors) is passed in here, not read off the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class DataBundle:
    """Datasets of a run. ``names[i]`` is class ``i``; ``summary`` holds lines for the log."""

    train: Dataset | None
    val: Dataset
    names: list[str]
    summary: list[str] = field(default_factory=list)
    source: str = ""


def take_fraction(items: list, fraction: float, split: str = "train") -> tuple[list, list[str]]:
    """The ``fraction`` key: a fixed subset of ``items`` (the same every run), spread evenly over the sorted list
    so that every part of it (every class folder of an ImageFolder) keeps its share; and the log line."""
    n = len(items)
    k = max(1, round(n * fraction)) if n else 0
    if fraction >= 1 or k >= n:
        return items, []
    picked = [items[(i * n) // k] for i in range(k)]
    return picked, [f"{split}: fraction={fraction:g}: {k} of {n} images used"]


def val_batch_size(cfg: dict, training: bool) -> int:
    """Images per validation batch: ``2 x batch`` during training (as ultralytics: no gradients, so twice the
    training batch fits), ``batch`` for ``vistrain val``.  Rectangular validation batches are shaped for it."""
    return 2 * int(cfg["batch"]) if training else int(cfg["batch"])


class Metrics(Protocol):
    def update(self, *args, **kwargs) -> None: ...
    def results(self) -> dict[str, float]: ...
    def fitness(self) -> float: ...


class Task(Protocol):
    name: str                      # "classify", "detect", "segment"
    loss_names: tuple[str, ...]    # names of the loss items, e.g. ("box", "obj", "cls")
    metric_keys: tuple[str, ...]   # columns of results.csv after the losses

    def build_data(self, cfg: dict, need_train: bool = True) -> DataBundle: ...
    def default_model(self) -> str: ...
    def collate_fn(self, samples: list) -> dict[str, Any]: ...
    def preprocess(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]: ...
    def loss(self, preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]: ...
    def new_metrics(self, names: list[str]) -> Metrics: ...
    def update_metrics(self, metrics: Metrics, preds: Any, batch: dict[str, Any]) -> None: ...
    def report(self, metrics: Metrics, names: list[str]) -> list[str]: ...
    def plot_batch(self, batch: dict[str, Any], names: list[str], path: Path, preds: Any = None) -> None: ...
    def plot_metrics(self, metrics: Metrics, names: list[str], save_dir: Path) -> None: ...
    # prediction: one input picture (PIL, RGB) -> (Tensor[3, h, w], meta for postprocess)
    def predict_stride(self, model: Any) -> int | None: ...  # None: square inputs
    def predict_preprocess(self, image, imgsz: int, stride: int | None = None) -> tuple[torch.Tensor, Any]: ...
    def predict_postprocess(self, preds: Any, cfg: dict, metas: list) -> list[Any]: ...
    def make_result(self, path: str, names: list[str], image, out: Any) -> Any: ...  # -> engine.results.Result
    def describe(self, result: Any, cfg: dict) -> str: ...  # one log line
    def write_predictions(self, results: list, save_dir: Path, cfg: dict) -> None: ...

    # optional hooks: ``apply_defaults(cfg, user_keys)`` (task defaults for keys the user left alone),
    # ``setup_model(model, data, cfg, train)`` (attach loss state, e.g. anchors; autoanchor before training),
    # ``epoch_start(trainer) -> bool`` (True: the train dataset changed, rebuild the loader),
    # ``state() -> dict`` (stored in checkpoints), ``save_json(metrics, save_dir)`` (val save_json=True),
    # ``plot_labels(dataset, names, save_dir)``.
    # optional: ``train_metric_names`` + ``train_metrics(preds, batch) -> Tensor`` give per-epoch
    # training-set metrics (e.g. classification accuracy) logged as train/NAME beside metrics/NAME.


def get_task(name: str) -> Task:
    """Instantiate the task plug-in called ``name``."""
    if name == "classify":
        from vistrain.tasks.classify import ClassifyTask

        return ClassifyTask()
    if name == "detect":
        from vistrain.tasks.detect import DetectTask

        return DetectTask()
    if name == "segment":
        from vistrain.tasks.segment import SegmentTask

        return SegmentTask()
    from vistrain.engine.utils import UserError

    raise UserError(f"task={name}: not available yet in this version (available: classify, detect, segment)")


def model_task(model: nn.Module) -> str:
    return getattr(model, "task", "classify")
