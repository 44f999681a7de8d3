"""Complete IoU of matched box pairs, for the box losses and the task-aligned assigner."""

from __future__ import annotations

import torch
import torchvision

MIN_WH = 1e-7  # smallest predicted box side in the CIoU


def ciou_xyxy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Complete IoU of matched pairs ``Tensor[M, 4]`` (x1, y1, x2, y2) -> ``Tensor[M]`` in (-1.5, 1].

    Computed as ``1 - torchvision.ops.complete_box_iou_loss`` (whose aspect-ratio weight ``alpha`` is held
    constant in the backward pass, as in the CIoU paper, YOLOv5 and YOLOv8).
    """
    # torchvision's aspect term divides by the box heights without an epsilon: a predicted box of zero
    # size (an underflowed sigmoid, a large learning rate) would give NaN gradients, so sides stay > 0
    pred = torch.cat((pred[:, :2], torch.maximum(pred[:, 2:4], pred[:, :2] + MIN_WH)), 1)
    return 1.0 - torchvision.ops.complete_box_iou_loss(pred, target, reduction="none")
