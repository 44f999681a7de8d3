"""Image classification: ImageFolder data, cross-entropy, top-1/top-5, probabilities out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vistrain.engine.utils import LOGGER, UserError
from vistrain.metrics.classify import ClassifyMetrics
from vistrain.tasks.base import DataBundle, take_fraction


class ClassifyTask:
    name = "classify"
    loss_names = ("loss",)
    metric_keys = ("metrics/accuracy_top1", "metrics/accuracy_top5")

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def default_model(self) -> str:
        return "yolov5n-cls"

    # --- data ---------------------------------------------------------------------------
    def build_data(self, cfg: dict, need_train: bool = True) -> DataBundle:
        from vistrain.data.classify import (ClassifyDataset, DatasetError, format_skip_summary,
                                            resolve_classify_data)

        self.label_smoothing = float(cfg.get("label_smoothing") or 0.0)
        root = cfg.get("data")
        if not root:
            from vistrain.data.synthetic import ensure_dataset

            root = str(ensure_dataset() / "classify")
            LOGGER.info(f"data: the built-in synthetic shapes dataset at {root}")
        path = Path(root)
        if not path.exists():
            raise UserError(f"data={root}: folder does not exist; give an ImageFolder root (root/CLASS/*.jpg) "
                            f"or leave data= empty for the built-in dataset")
        try:
            train_idx, val_idx = resolve_classify_data(path, split=cfg.get("split", 0.8), seed=cfg.get("seed", 0),
                                                       workers=max(1, cfg.get("workers", 2)))
        except DatasetError as e:
            raise UserError(str(e)) from None
        summary = format_skip_summary(train_idx, "train") + format_skip_summary(val_idx, "val")
        imgsz = cfg["imgsz"]
        train = None
        if need_train:
            samples, lines = take_fraction(train_idx.samples, cfg.get("fraction", 1.0))
            summary += lines
            train = ClassifyDataset(samples, imgsz, augment=cfg.get("augment", True),
                                    fliplr=cfg.get("fliplr", 0.5), hsv=cfg.get("hsv", 0.2), seed=cfg.get("seed", 0))
        val = ClassifyDataset(val_idx.samples, imgsz, augment=False)
        if len(val) == 0:
            raise UserError(f"data={root}: no validation images found")
        if need_train and len(train) == 0:
            raise UserError(f"data={root}: no training images found")
        return DataBundle(train, val, list(train_idx.names), summary, source=str(path))

    def collate_fn(self, samples: list) -> dict[str, Any]:
        imgs, labels = zip(*samples)
        return {"img": torch.stack(imgs), "cls": torch.as_tensor(labels, dtype=torch.long)}

    def preprocess(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        nb = device.type == "cuda"
        return {"img": batch["img"].to(device, non_blocking=nb), "cls": batch["cls"].to(device, non_blocking=nb)}

    # --- loss and metrics ---------------------------------------------------------------
    def loss(self, preds: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy; returns ``(loss to backpropagate, Tensor[1] for the log)``."""
        loss = F.cross_entropy(preds.float(), batch["cls"], label_smoothing=self.label_smoothing)
        return loss, loss.detach().reshape(1)

    train_metric_names = ("accuracy_top1",)

    def train_metrics(self, preds: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Top-1 accuracy of a training batch (augmented, train mode), for the train/val curves."""
        return (preds.detach().argmax(1) == batch["cls"]).float().mean().reshape(1)

    def new_metrics(self, names: list[str]) -> ClassifyMetrics:
        return ClassifyMetrics(len(names))

    def update_metrics(self, metrics: ClassifyMetrics, preds: torch.Tensor, batch: dict[str, Any],
                       decoded: bool = False) -> None:
        """Score logits, or probabilities (``decoded``: an exported model's); the ranking is the same."""
        metrics.update(preds, batch["cls"])

    def decode(self, preds: torch.Tensor) -> torch.Tensor:
        """Logits ``Tensor[B, C]`` -> class probabilities (softmax): what an exported classifier returns."""
        return preds.float().softmax(1)

    def report(self, metrics: ClassifyMetrics, names: list[str]) -> list[str]:
        lines = [f"{'class':>20} {'images':>8} {'top1_acc':>9}",
                 f"{'all':>20} {metrics.seen:>8} {metrics.top1:>9.3f}   top5_acc {metrics.top5:.3f}"]
        support = metrics.matrix.sum(0)
        for i, (name, acc) in enumerate(zip(names, metrics.per_class)):
            lines.append(f"{name:>20} {support[i]:>8} {acc:>9.3f}")
        return lines

    # --- plots --------------------------------------------------------------------------
    def plot_batch(self, batch: dict[str, Any], names: list[str], path: Path, preds: Any = None) -> None:
        from vistrain.data.classify import denormalize
        from vistrain.utils.plotting import plot_image_grid

        imgs = denormalize(batch["img"][:16].detach().float().cpu())
        labels = [names[int(c)] for c in batch["cls"][:16]]
        if preds is not None:
            probs = preds[:16].float().softmax(1)
            conf, idx = probs.max(1)
            labels = [f"{names[int(i)]} {float(c):.2f}" for c, i in zip(conf, idx)]
        plot_image_grid(imgs, labels, path)

    def plot_metrics(self, metrics: ClassifyMetrics, names: list[str], save_dir: Path) -> None:
        from vistrain.utils.plotting import plot_confusion_matrix

        plot_confusion_matrix(metrics.matrix, names, save_dir / "confusion_matrix.png")

    # --- prediction ---------------------------------------------------------------------
    def predict_stride(self, model) -> None:
        return None  # classifiers resize and centre-crop to a square

    def predict_preprocess(self, image, imgsz: int, stride: int | None = None) -> tuple[torch.Tensor, None]:
        from vistrain.data.classify import eval_transform

        return eval_transform(image, imgsz), None

    def predict_postprocess(self, probs: torch.Tensor, cfg: dict, metas: list) -> list[torch.Tensor]:
        """``decode``'s probabilities ``Tensor[B, C]`` -> one probability vector ``Tensor[C]`` per image."""
        return list(probs.float().cpu())

    def make_result(self, path: str, names: list[str], image, out: torch.Tensor):
        from vistrain.engine.results import Result

        return Result(path, names, (image.height, image.width), probs=out, orig_img=image)

    def describe(self, result, cfg: dict) -> str:
        return ", ".join(f"{n} {c:.2f}" for n, c in result.topk(cfg["topk"]))

    def write_predictions(self, results: list, save_dir: Path, cfg: dict) -> None:
        from vistrain.engine.predictor import write_classify_predictions

        write_classify_predictions(results, save_dir, cfg["topk"], cfg["save_json"])
