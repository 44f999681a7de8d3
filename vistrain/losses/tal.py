"""Task-aligned assignment (TOOD / YOLOv8): which anchor points learn which ground-truth box.

For every ground truth ``g`` and anchor point ``a`` whose centre lies inside ``g`` (the candidates), the
alignment metric is ``t = s ** alpha * u ** beta`` with ``s`` the predicted probability of ``g``'s class at
``a`` and ``u`` the CIoU (clamped at 0) of ``a``'s predicted box with ``g``.  Each ground truth takes its
``topk`` candidates of highest ``t`` (a candidate whose ``t`` is 0 only where torch.topk's tie-break among
the zeros picks it, as in ultralytics); an anchor point taken by several keeps the ground truth its
prediction overlaps most.  The class target of a positive is not 1 but
``t / max_a t(g) * max_a u(g)`` (both maxima over ``g``'s positives): good predictions are asked for high
scores, poor ones for low.

Shapes: B images, N anchor points, M ground-truth slots per image (padded; ``gt_valid`` marks the real
ones), C classes.  Boxes are (x1, y1, x2, y2) in input pixels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vistrain.losses.iou import ciou_xyxy


class Assignment(NamedTuple):
    """``fg (Tensor[B, N] bool)`` positives; ``gt_index (Tensor[B, N] long)`` the ground-truth slot of each
    positive (0 for the rest); ``boxes (Tensor[B, N, 4])`` its box; ``scores (Tensor[B, N, C])`` the soft
    class targets (zero rows for negatives)."""

    fg: torch.Tensor
    gt_index: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor


class TaskAlignedAssigner:
    """``assigner(scores, boxes, points, gt_cls, gt_boxes, gt_valid) -> Assignment``.

    scores: ``Tensor[B, N, C]`` predicted class probabilities (after the sigmoid).
    boxes: ``Tensor[B, N, 4]`` predicted boxes.  points: ``Tensor[N, 2]`` anchor-point centres.
    gt_cls: ``Tensor[B, M]`` long; gt_boxes: ``Tensor[B, M, 4]``; gt_valid: ``Tensor[B, M]`` bool.
    min_side: ground-truth sides shorter than this are widened (about the box centre) to it when
    choosing candidates, so tiny objects still cover an anchor point (ultralytics 8.x uses the middle
    stride, 16; 0 gives the original YOLOv8 rule).
    """

    def __init__(self, num_classes: int, topk: int = 10, alpha: float = 0.5, beta: float = 6.0,
                 min_side: float = 0.0, eps: float = 1e-9):
        self.nc, self.topk, self.alpha, self.beta, self.min_side, self.eps = num_classes, topk, alpha, beta, min_side, eps

    def candidates(self, points: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """``Tensor[B, M, N]`` bool: anchor point strictly inside the (widened) ground-truth box."""
        if self.min_side > 0:
            centre, half = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2, (gt_boxes[..., 2:] - gt_boxes[..., :2]) / 2
            half = half.clamp(min=self.min_side / 2)
            gt_boxes = torch.cat((centre - half, centre + half), -1)
        p = points.view(1, 1, -1, 2)
        lt, rb = gt_boxes[..., None, :2], gt_boxes[..., None, 2:]
        return torch.cat((p - lt, rb - p), -1).amin(-1) > self.eps

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor, gt_cls: torch.Tensor,
                 gt_boxes: torch.Tensor, gt_valid: torch.Tensor) -> Assignment:
        b, n, _ = scores.shape
        m = gt_boxes.shape[1]
        if m == 0 or not gt_valid.any():
            return Assignment(torch.zeros(b, n, dtype=torch.bool, device=scores.device),
                              torch.zeros(b, n, dtype=torch.long, device=scores.device),
                              boxes.new_zeros(b, n, 4), scores.new_zeros(scores.shape))
        gt_cls = gt_cls.long().clamp(0, self.nc - 1)
        cand = self.candidates(points, gt_boxes) & gt_valid[..., None]  # [B, M, N]

        # metric and overlap, computed only where a candidate is
        bi, gi, ai = cand.nonzero(as_tuple=True)
        overlap = scores.new_zeros(b, m, n)
        metric = scores.new_zeros(b, m, n)
        u = ciou_xyxy(boxes[bi, ai], gt_boxes[bi, gi]).clamp(min=0).to(scores.dtype)
        s = scores[bi, ai, gt_cls[bi, gi]]
        overlap[bi, gi, ai] = u
        metric[bi, gi, ai] = s.pow(self.alpha) * u.pow(self.beta)

        # each ground truth's k anchor points of highest metric over all anchor points (non-candidates at 0),
        # of which the candidates are kept: as ultralytics, including its torch.topk call on this same
        # [B, M, N] layout, whose tie-break decides which metric-0 candidates (if any) fill a ground truth's
        # top k when fewer than k candidates have a metric above 0
        k = min(self.topk, n)
        top = metric.topk(k, dim=-1).indices  # [B, M, k]
        pos = torch.zeros_like(cand).scatter_(-1, top, True) & cand

        # an anchor point claimed by several ground truths keeps the one its prediction overlaps most (the
        # first on ties, also when all those overlaps are 0, as ultralytics)
        multi = pos.sum(1, keepdim=True) > 1  # [B, 1, N]
        best = torch.zeros_like(pos).scatter_(1, overlap.argmax(1, keepdim=True), True)
        pos = torch.where(multi, best, pos)

        fg = pos.any(1)
        gt_index = pos.to(torch.uint8).argmax(1)  # [B, N]
        target_boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))
        target_cls = gt_cls.gather(1, gt_index)
        target_scores = torch.zeros_like(scores).scatter_(-1, target_cls[..., None], 1.0) * fg[..., None]

        # soft targets: metric normalised per ground truth to its best overlap
        metric = metric * pos
        norm = metric * (overlap * pos).amax(-1, keepdim=True) / (metric.amax(-1, keepdim=True) + self.eps)
        target_scores = target_scores * norm.amax(1)[..., None]
        return Assignment(fg, gt_index, target_boxes, target_scores)
