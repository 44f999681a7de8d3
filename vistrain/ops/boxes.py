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


def non_max_suppression(decoded: torch.Tensor, conf: float = 0.25, iou: float = 0.45, classes: list[int] | None = None,
                        agnostic: bool = False, max_det: int = 300, max_nms: int = 30000) -> list[torch.Tensor]:
    """``decoded (Tensor[B, N, 5 + nc])`` from ``decode_yolov5`` -> per image ``Tensor[K, 6]`` of
    (x1, y1, x2, y2, score, class), score = objectness x class probability, best first.

    One box per anchor: its best class (as YOLOv5's single-label mode). NMS is
    ``torchvision.ops.batched_nms`` per class, or across classes with ``agnostic``.
    """
    results = []
    for x in decoded:
        x = x[x[:, 4] > conf]  # class probabilities are <= 1, so score > conf needs objectness > conf
        scores_all = x[:, 5:] * x[:, 4:5]
        score, cls = scores_all.max(1)
        keep = score > conf
        if classes is not None:
            keep &= torch.isin(cls, torch.as_tensor(classes, device=cls.device))
        boxes, score, cls = xywh2xyxy(x[keep, :4]), score[keep], cls[keep]
        if score.numel() > max_nms:
            top = score.topk(max_nms).indices
            boxes, score, cls = boxes[top], score[top], cls[top]
        idx = torchvision.ops.batched_nms(boxes, score, torch.zeros_like(cls) if agnostic else cls, iou)[:max_det]
        results.append(torch.cat((boxes[idx], score[idx, None], cls[idx, None].float()), 1))
    return results
