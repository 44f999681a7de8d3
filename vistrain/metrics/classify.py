"""Classification metrics: top-1 / top-5 accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ClassifyMetrics:
    """Accumulates predictions batch by batch.

    ``update(logits (Tensor[B, C]), targets (Tensor[B]))``; then ``top1``, ``top5``,
    ``per_class`` (recall of each class, NaN for a class absent from the targets) and
    ``matrix`` (``np.ndarray[C, C]``, rows = predicted class, columns = true class, as
    ultralytics plots it).
    """

    num_classes: int
    matrix: np.ndarray = field(init=False)
    correct1: int = 0
    correct5: int = 0
    seen: int = 0

    def __post_init__(self):
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices.cpu()
        targets = targets.cpu()
        hits = topk == targets[:, None]
        self.correct1 += int(hits[:, 0].sum())
        self.correct5 += int(hits.any(1).sum())
        self.seen += len(targets)
        np.add.at(self.matrix, (topk[:, 0].numpy(), targets.numpy()), 1)

    @property
    def top1(self) -> float:
        return self.correct1 / max(self.seen, 1)

    @property
    def top5(self) -> float:
        return self.correct5 / max(self.seen, 1)

    @property
    def per_class(self) -> np.ndarray:
        support = self.matrix.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(support > 0, np.diag(self.matrix) / np.maximum(support, 1), np.nan)

    def results(self) -> dict[str, float]:
        return {"metrics/accuracy_top1": self.top1, "metrics/accuracy_top5": self.top5}

    def fitness(self) -> float:
        """What "best" means for classification: top-1 accuracy."""
        return self.top1
