"""Pure box functions. Boxes are ``Tensor[N, 4]``; ``xyxy`` = (x1, y1, x2, y2), ``xywh`` = (cx, cy, w, h).

IoU and NMS come from ``torchvision.ops``; what is written here is only format conversion and
the YOLO decoding, each checked against torchvision in the tests.
"""

from __future__ import annotations

import torch
import torchvision


def xywh2xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes (Tensor[..., 4])`` centre/size -> corners."""
    xy, wh = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def xyxy2xywh(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes (Tensor[..., 4])`` corners -> centre/size."""
    return torch.cat(((boxes[..., :2] + boxes[..., 2:4]) / 2, boxes[..., 2:4] - boxes[..., :2]), -1)


def decode_yolov5(preds: list[torch.Tensor], anchors: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Raw anchor-based head outputs -> ``Tensor[B, N, 5 + nc]`` of (cx, cy, w, h) in input pixels,
    objectness and class probabilities (sigmoid applied).

    ``preds[i] (Tensor[B, na, H_i, W_i, 5 + nc])``; ``anchors (Tensor[nl, na, 2])`` in stride units;
    ``strides (Tensor[nl])``. Centre offsets span (-0.5, 1.5) cells and sizes (0, 4) anchors, as
    in YOLOv5 v6+.
    """
    out = []
    for p, anchor, stride in zip(preds, anchors, strides):
        b, na, h, w, no = p.shape
        yv, xv = torch.meshgrid(torch.arange(h, device=p.device, dtype=torch.float32),
                                torch.arange(w, device=p.device, dtype=torch.float32), indexing="ij")
        grid = torch.stack((xv, yv), -1).view(1, 1, h, w, 2)
        anchor_px = (anchor.to(p.device) * stride).view(1, na, 1, 1, 2)
        y = p.float().sigmoid()  # a new tensor: the box columns are rewritten in place
        y[..., :2] = (y[..., :2] * 2 - 0.5 + grid) * stride
        y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * anchor_px
        out.append(y.view(b, -1, no))
    return torch.cat(out, 1)


def make_anchor_points(shapes: list[tuple[int, int]], strides, offset: float = 0.5,
                       device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of every level, row-major per level and levels in order, for anchor-free heads.

    ``shapes`` the (H, W) of each level -> ``points (Tensor[N, 2])`` (x, y) in grid units of that level
    and ``stride (Tensor[N, 1])``; pixels are ``points * stride``.
    """
    points, stride_rows = [], []
    for (h, w), s in zip(shapes, strides):
        ys = torch.arange(h, device=device, dtype=dtype) + offset
        xs = torch.arange(w, device=device, dtype=dtype) + offset
        yv, xv = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((xv, yv), -1).view(-1, 2))
        stride_rows.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_rows)


def dfl_distances(logits: torch.Tensor, reg_max: int) -> torch.Tensor:
    """``logits (Tensor[..., 4 * reg_max])`` -> expected distances ``Tensor[..., 4]`` in bins (softmax over each
    side's ``reg_max`` bins, weighted by the bin index 0..reg_max-1)."""
    p = logits.unflatten(-1, (4, reg_max)).softmax(-1)
    return p @ torch.arange(reg_max, device=logits.device, dtype=p.dtype)


def distances_to_xyxy(dist: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(left, top, right, bottom) distances from ``points (Tensor[..., 2])`` -> corners ``Tensor[..., 4]``."""
    return torch.cat((points - dist[..., :2], points + dist[..., 2:]), -1)


def flatten_levels(preds: list[torch.Tensor]) -> torch.Tensor:
    """Per-level ``Tensor[B, C, H_i, W_i]`` -> ``Tensor[B, sum H_i W_i, C]`` (levels in order, row-major)."""
    return torch.cat([p.flatten(2) for p in preds], 2).transpose(1, 2)


def decode_dfl(preds: list[torch.Tensor], strides, reg_max: int = 16) -> torch.Tensor:
    """Raw anchor-free head outputs (``DetectDFL``: per level ``Tensor[B, 4 * reg_max + nc, H_i, W_i]``) ->
    ``Tensor[B, N, 4 + nc]`` of (cx, cy, w, h) in input pixels and class probabilities (sigmoid applied)."""
    x = flatten_levels(preds).float()
    points, stride = make_anchor_points([p.shape[2:] for p in preds], strides, device=x.device)
    dist = dfl_distances(x[..., :4 * reg_max], reg_max)
    xyxy = distances_to_xyxy(dist, points) * stride
    return torch.cat((xyxy2xywh(xyxy), x[..., 4 * reg_max:].sigmoid()), -1)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """``torchvision.ops.nms`` within each group -> kept indices, best first.  As ``torchvision.ops.batched_nms``'s
    coordinate trick (each group's boxes shifted apart, one NMS call), but shifted by the boxes' span from their
    minimum, so that boxes reaching past the image (negative coordinates) cannot meet another group's: torchvision
    shifts by ``max + 1``, which assumes coordinates >= 0.  Traces into ONNX (one NonMaxSuppression)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    lo = boxes.min()
    shift = groups.to(boxes.dtype) * (boxes.max() - lo + 1)
    return torchvision.ops.nms(boxes - lo + shift[:, None], scores, iou)


def non_max_suppression(decoded: torch.Tensor, conf: float = 0.25, iou: float = 0.45, classes: list[int] | None = None,
                        agnostic: bool = False, max_det: int = 300, max_nms: int = 30000, objectness: bool = True,
                        nc: int | None = None) -> list[torch.Tensor]:
    """Decoded predictions -> per image ``Tensor[K, 6 + E]`` of (x1, y1, x2, y2, score, class, extra...), best first.

    ``decoded (Tensor[B, N, 4 + nc + E])`` with an objectness column after the box when ``objectness``
    (``decode_yolov5``: score = objectness x class probability) or without (``decode_dfl``: score = class
    probability).  ``nc`` defaults to all remaining columns; the ``E`` extra columns after the class
    scores (mask coefficients) ride along.  One box per anchor: its best class (YOLOv5's and ultralytics'
    single-label mode).  NMS is ``torchvision.ops.batched_nms`` per class, or across classes with ``agnostic``.
    """
    c0 = 5 if objectness else 4
    nc = decoded.shape[-1] - c0 if nc is None else nc
    results = []
    for x in decoded:
        if objectness:
            x = x[x[:, 4] > conf]  # class probabilities are <= 1, so score > conf needs objectness > conf
            scores_all = x[:, 5:5 + nc] * x[:, 4:5]
        else:
            scores_all = x[:, 4:4 + nc]
        score, cls = scores_all.max(1)
        keep = score > conf
        if classes is not None:
            keep &= torch.isin(cls, torch.as_tensor(classes, device=cls.device))
        x, boxes, score, cls = x[keep], xywh2xyxy(x[keep, :4]), score[keep], cls[keep]
        if score.numel() > max_nms:
            top = score.topk(max_nms).indices
            x, boxes, score, cls = x[top], boxes[top], score[top], cls[top]
        idx = batched_nms(boxes, score, torch.zeros_like(cls) if agnostic else cls, iou)[:max_det]
        results.append(torch.cat((boxes[idx], score[idx, None], cls[idx, None].float(), x[idx, c0 + nc:]), 1))
    return results

