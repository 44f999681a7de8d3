"""The YOLOv8 losses: task-aligned assignment, CIoU + Distribution Focal Loss for boxes, BCE for classes,
and (segmentation) a per-instance mask BCE on the prototype masks, cropped to the box.

The model stays pure: ``DetectLoss.from_model`` reads the class count, strides and ``reg_max`` off a
``DetectDFL`` / ``Segment`` head once.

Shapes: ``preds`` as the head returns them - per level ``Tensor[B, 4 * reg_max + nc, H_i, W_i]`` (and for
``Segment`` a tuple (levels, coefficients ``Tensor[B, nm, N]``, prototypes ``Tensor[B, nm, Hp, Wp]``));
``targets (Tensor[T, 6])`` rows (image index in batch, class, cx, cy, w, h) normalised 0..1 to the input.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vistrain.losses.iou import ciou_xyxy
from vistrain.losses.sync import batch_total, world
from vistrain.losses.tal import Assignment, TaskAlignedAssigner
from vistrain.ops.boxes import dfl_distances, distances_to_xyxy, flatten_levels, make_anchor_points, xywh2xyxy
from vistrain.ops.masks import crop_to_boxes


def dfl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution Focal Loss.  ``logits (Tensor[P, 4, R])``, ``target (Tensor[P, 4])`` distances in bins,
    clipped to [0, R - 1.01] -> ``Tensor[P]``: per box, the mean over its 4 sides of the cross-entropy against
    the two bins around the target, weighted by nearness (target 3.3 = 0.7 of bin 3 + 0.3 of bin 4)."""
    r = logits.shape[-1]
    target = target.clamp(0, r - 1.01)
    lo = target.floor().long()
    w_hi = target - lo
    logp = logits.float().log_softmax(-1)
    nll_lo = -logp.gather(-1, lo[..., None]).squeeze(-1)
    nll_hi = -logp.gather(-1, (lo + 1)[..., None]).squeeze(-1)
    return (nll_lo * (1 - w_hi) + nll_hi * w_hi).mean(-1)


def pad_targets(targets: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``targets (Tensor[T, 6])`` -> per image slots: ``cls (Tensor[B, M])``, ``boxes (Tensor[B, M, 4])`` (the
    normalised cx, cy, w, h as given), ``valid (Tensor[B, M])`` bool; M = the most targets of one image.
    Slot order within an image is the order of its rows in ``targets``."""
    device = targets.device
    idx = targets[:, 0].long()
    counts = torch.bincount(idx, minlength=batch_size) if len(idx) else torch.zeros(batch_size, dtype=torch.long)
    m = int(counts.max()) if len(idx) else 0
    cls = torch.zeros(batch_size, m, device=device)
    boxes = torch.zeros(batch_size, m, 4, device=device)
    valid = torch.zeros(batch_size, m, dtype=torch.bool, device=device)
    if m:
        order = torch.argsort(idx, stable=True)
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(idx), device=device) - start.to(device)[idx[order]]
        cls[idx[order], slot] = targets[order, 1]
        boxes[idx[order], slot] = targets[order, 2:6]
        valid[idx[order], slot] = True
    return cls, boxes, valid


class DetectLoss:
    """``loss(preds, targets) -> (total * batch size, Tensor[3] detached (box, cls, dfl))``.

    Box: ``(1 - CIoU) * w`` and DFL ``* w`` summed over positives, with ``w`` a positive's soft class target
    summed over classes; class: BCE of every anchor point's logits against the soft targets; all three
    divided by the sum of the soft targets (at least 1) and scaled by the gains ``box``, ``cls``, ``dfl``.
    """

    names = ("box_loss", "cls_loss", "dfl_loss")

    def __init__(self, num_classes: int, strides, reg_max: int = 16, box: float = 7.5, cls: float = 0.5,
                 dfl: float = 1.5, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, min_side: float | None = None):
        self.nc, self.reg_max = num_classes, reg_max
        self.strides = [float(s) for s in strides]
        self.gains = (box, cls, dfl)
        # ultralytics 8.x widens tiny boxes to the middle stride when choosing candidates
        if min_side is None:
            min_side = self.strides[1] if len(self.strides) > 1 else self.strides[0]
        self.assigner = TaskAlignedAssigner(num_classes, topk=topk, alpha=alpha, beta=beta, min_side=min_side)

    @classmethod
    def from_model(cls, model: nn.Module, hyp: Mapping[str, Any] | None = None, **kwargs) -> DetectLoss:
        from vistrain.nn.modules import DetectDFL

        head = next(m for m in model.modules() if isinstance(m, DetectDFL))
        hyp = dict(hyp or {})
        gains = {k: float(hyp[k]) for k in ("box", "cls", "dfl") if hyp.get(k) is not None}
        return cls(head.nc, head.stride.tolist(), head.reg_max, **gains, **kwargs)

    def split(self, preds) -> tuple[list[torch.Tensor], Any]:
        """The per-level detect outputs and whatever else the head returned (segment: coefficients, prototypes)."""
        return (preds[0], preds[1:]) if isinstance(preds, tuple) else (preds, None)

    def assign(self, levels: list[torch.Tensor], targets: torch.Tensor):
        """Flattened predictions, the assignment and the ground truth: everything the loss terms need."""
        x = flatten_levels(levels)  # [B, N, 4R + nc]
        b = x.shape[0]
        distri, logits = x[..., :4 * self.reg_max], x[..., 4 * self.reg_max:]
        shapes = [tuple(p.shape[2:]) for p in levels]
        points, stride = make_anchor_points(shapes, self.strides, device=x.device, dtype=torch.float32)
        imgsz = torch.tensor(shapes[0], device=x.device, dtype=torch.float32) * self.strides[0]  # (h, w)
        gt_cls, gt_xywh, gt_valid = pad_targets(targets.to(x.device).float(), b)
        gt_boxes = xywh2xyxy(gt_xywh * imgsz[[1, 0, 1, 0]])
        pred_boxes = distances_to_xyxy(dfl_distances(distri.float(), self.reg_max), points)  # grid units
        a = self.assigner(logits.detach().sigmoid().float(), pred_boxes.detach() * stride, points * stride,
                          gt_cls, gt_boxes, gt_valid)
        return distri, logits, pred_boxes, points, stride, imgsz, a

    def detect_terms(self, distri, logits, pred_boxes, points, stride, a: Assignment) -> torch.Tensor:
        """Tensor[3]: box, cls, dfl (gains applied)."""
        norm = batch_total(a.scores.sum()).clamp(min=1) / world()  # (the whole batch's, all ranks together)
        cls_loss = F.binary_cross_entropy_with_logits(logits.float(), a.scores, reduction="sum") / norm
        if a.fg.any():
            w = a.scores[a.fg].sum(-1)
            target = a.boxes[a.fg] / stride[None].expand(a.fg.shape[0], -1, -1)[a.fg]  # grid units
            box_loss = ((1.0 - ciou_xyxy(pred_boxes[a.fg], target)) * w).sum() / norm
            pts = points[None].expand(a.fg.shape[0], -1, -1)[a.fg]
            ltrb = torch.cat((pts - target[:, :2], target[:, 2:] - pts), -1)
            dfl = (dfl_loss(distri[a.fg].view(-1, 4, self.reg_max), ltrb) * w).sum() / norm
        else:  # keep the box branch in the graph
            box_loss = dfl = distri.sum() * 0.0
        gain = torch.tensor(self.gains, device=logits.device)
        return torch.stack((box_loss, cls_loss, dfl)) * gain

    def __call__(self, preds, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels, _ = self.split(preds)
        distri, logits, pred_boxes, points, stride, _, a = self.assign(levels, targets)
        terms = self.detect_terms(distri, logits, pred_boxes, points, stride, a)
        return terms.sum() * levels[0].shape[0] * world(), terms.detach()


class SegmentLoss(DetectLoss):
    """``DetectLoss`` plus the mask loss: for each positive anchor point, its mask
    ``coefficients @ prototypes`` against its ground-truth instance's mask (BCE per pixel), averaged over
    the pixels inside the instance's box, divided by the box's area (as a fraction of the image), averaged
    over the positives and scaled by the ``box`` gain.  ``masks`` are the batch's ground-truth masks at the
    prototype resolution (or larger: the prototypes are then upsampled):
    with ``overlap`` one ``Tensor[B, H, W]`` of instance numbers (1 + the index of the instance among its
    image's rows, 0 = background), else one ``Tensor[T, H, W]`` per target row."""

    names = ("box_loss", "seg_loss", "cls_loss", "dfl_loss")

    def __init__(self, *args, overlap: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.overlap = overlap

    @classmethod
    def from_model(cls, model: nn.Module, hyp: Mapping[str, Any] | None = None, **kwargs) -> SegmentLoss:
        return super().from_model(model, hyp, overlap=bool((hyp or {}).get("overlap_mask", True)), **kwargs)

    def __call__(self, preds, targets: torch.Tensor, masks: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        levels, (coef, proto) = self.split(preds)
        distri, logits, pred_boxes, points, stride, imgsz, a = self.assign(levels, targets)
        box, cls_, dfl = self.detect_terms(distri, logits, pred_boxes, points, stride, a)
        positives = batch_total(a.fg.sum()) / world() if world() > 1 else None  # (every rank counts: a collective)
        if a.fg.any() and masks is not None:
            seg = self.mask_loss(a, coef.transpose(1, 2), proto, masks.to(proto.device), targets, imgsz, positives)
        else:
            seg = (coef.sum() + proto.sum()) * 0.0
        terms = torch.stack((box, seg * self.gains[0], cls_, dfl))
        return terms.sum() * levels[0].shape[0] * world(), terms.detach()

    def mask_loss(self, a: Assignment, coef: torch.Tensor, proto: torch.Tensor, masks: torch.Tensor,
                  targets: torch.Tensor, imgsz: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        """The mask term, averaged over ``positives`` (default: this batch's positive anchor points)."""
        masks = masks.float()
        if tuple(masks.shape[-2:]) != tuple(proto.shape[-2:]):
            proto = F.interpolate(proto, masks.shape[-2:], mode="bilinear", align_corners=False)
        mh, mw = proto.shape[-2:]
        norm_boxes = a.boxes / imgsz[[1, 0, 1, 0]]  # [B, N, 4] normalised xyxy
        areas = (norm_boxes[..., 2] - norm_boxes[..., 0]) * (norm_boxes[..., 3] - norm_boxes[..., 1])
        mask_boxes = norm_boxes * torch.tensor([mw, mh, mw, mh], device=proto.device, dtype=norm_boxes.dtype)
        image_of_row = targets[:, 0].long().to(proto.device)
        total = proto.new_zeros(())
        for i in range(len(a.fg)):
            fg = a.fg[i]
            if not fg.any():
                continue
            slot = a.gt_index[i][fg]
            if self.overlap:
                gt = (masks[i][None] == (slot + 1).view(-1, 1, 1)).float()
            else:
                gt = masks[image_of_row == i][slot]
            pred = torch.einsum("kc,chw->khw", coef[i][fg].float(), proto[i].float())
            bce = F.binary_cross_entropy_with_logits(pred, gt, reduction="none")
            total = total + (crop_to_boxes(bce, mask_boxes[i][fg]).mean((1, 2)) / areas[i][fg]).sum()
        return total / (a.fg.sum() if positives is None else positives)
