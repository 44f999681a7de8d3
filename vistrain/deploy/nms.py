"""``export nms=True``: the final detections inside the exported graph.

``NMSModel`` runs ``InferenceModel`` (model + ``decode``) and then the selection that ``task.select`` does in
Python, written for a whole batch at once with tensor operations only, so that it traces into ONNX (one
``NonMaxSuppression``), TorchScript and OpenVINO with a dynamic batch (and size):

- candidates: YOLO: each anchor's best class, score > ``conf`` (YOLOv5: objectness x class probability);
  EfficientDet: the ``topk`` (5000) best (anchor, class) scores >= ``conf`` of each image;
- ``classes`` keeps only those classes; NMS at ``iou`` within each (image, class), or each image with ``agnostic``
  (one NMS call over the batch: every group's boxes shifted apart, as ``ops.boxes.batched_nms``);
- per image the ``max_det`` best, as ``Tensor[B, max_det, 6 + E]`` (x1, y1, x2, y2, score, class, E extra columns:
  mask coefficients), best first, rows past an image's detections all zero.

The settings are fixed at export (they are written into the metadata).  Not in the graph: YOLO's ``max_nms``
cap (30,000 candidates per image before NMS: reached only by huge inputs at tiny ``conf``) and soft-NMS.
``runtime.unpad`` turns the output back into ``task.select``'s per-image list.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def padded_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, extra: torch.Tensor | None,
               iou: float, max_det: int, agnostic: bool) -> torch.Tensor:
    """Candidates of a batch -> ``Tensor[B, max_det, 6 + E]``.  ``boxes [B, N, 4]`` (x1, y1, x2, y2),
    ``scores [B, N]`` (< 0: not a candidate), ``classes [B, N]`` (long), ``extra [B, N, E]`` or None.  No Python
    number is taken from a tensor's size, so the traced graph serves any batch and N."""
    image = torch.ones_like(classes).cumsum(0) - 1  # [B, N]: the batch index of each row
    groups = image if agnostic else image * (classes.amax() + 1) + classes
    flat_boxes, flat_scores = boxes.reshape(-1, 4), scores.reshape(-1)
    cand = (flat_scores >= 0).nonzero().squeeze(1)
    b, s = flat_boxes.index_select(0, cand), flat_scores.index_select(0, cand)
    g = groups.reshape(-1).index_select(0, cand)
    # the groups shifted apart by the candidates' span from their minimum, as ops.boxes.batched_nms (with one image,
    # the same shifted coordinates); the sentinels keep min / max defined when there is no candidate
    lo = torch.cat((b.reshape(-1), torch.full_like(flat_scores[:1], 3e38))).min()
    span = torch.cat((b.reshape(-1), torch.full_like(flat_scores[:1], -3e38))).max() - lo + 1
    keep = cand.index_select(0, torchvision.ops.nms(b - lo + (g.to(b.dtype) * span)[:, None], s, iou))
    kept = torch.zeros_like(flat_scores).scatter(0, keep, torch.ones_like(keep, dtype=flat_scores.dtype))
    ranked = torch.where(kept.reshape(scores.shape) > 0, scores, -torch.ones_like(scores))
    pad = -torch.ones_like(ranked[:, :1]).expand(-1, max_det)  # so that an image with < max_det anchors pads too
    top_scores, top = torch.cat((ranked, pad), 1).topk(max_det, dim=1)
    cols = [boxes, scores[..., None], classes[..., None].to(boxes.dtype)] + ([extra] if extra is not None else [])
    table = torch.cat(cols, -1)
    table = torch.cat((table, torch.zeros_like(table[:, :1]).expand(-1, max_det, -1)), 1)  # [B, N + max_det, C]
    row_len = torch.ones_like(table[..., 0], dtype=torch.long).sum(1, keepdim=True)  # N + max_det, as a tensor
    first = (torch.ones_like(top).cumsum(0) - 1) * row_len  # [B, max_det]: where each image's rows start
    rows = table.reshape(-1, table.shape[-1]).index_select(0, (top + first).reshape(-1))
    rows = rows.reshape(-1, max_det, table.shape[-1])
    return rows * (top_scores >= 0).to(rows.dtype)[..., None]


class NMSModel(nn.Module):
    """``InferenceModel`` followed by the batch selection: outputs ``Tensor[B, max_det, 6 + E]`` (segment: and the
    prototypes, as before).  ``settings`` are ``task.nms_settings``' (conf, iou, classes, agnostic, max_det)."""

    def __init__(self, net: nn.Module, task, settings: dict, topk: int = 5000):
        super().__init__()
        self.net, self.task, self.topk = net, task, int(topk)
        self.conf, self.iou = float(settings["conf"]), float(settings["iou"])
        self.max_det, self.agnostic = int(settings["max_det"]), bool(settings["agnostic"])
        classes = settings.get("classes")
        self.register_buffer("classes", torch.tensor(list(classes) if classes else [], dtype=torch.long),
                             persistent=False)
        self.segment = task.name == "segment"

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        decoded, proto = (out[0], out[1]) if self.segment else (out, None)
        boxes, scores, classes, extra = self.candidates(decoded)
        if self.classes.numel():
            scores = torch.where((classes[..., None] == self.classes).any(-1), scores, -torch.ones_like(scores))
        dets = padded_nms(boxes, scores, classes, extra, self.iou, self.max_det, self.agnostic)
        return (dets, proto) if self.segment else dets

    def candidates(self, decoded: torch.Tensor):
        """-> boxes [B, M, 4] (x1, y1, x2, y2), scores [B, M] (-1 where not a candidate), classes [B, M], extra."""
        from vistrain.ops.boxes import xywh2xyxy

        task = self.task
        if task.effdet:  # (anchor, class) pairs: each image's top k scores >= conf
            nc = decoded.shape[-1] - 4
            flat = decoded[..., 4:].flatten(1)
            flat = torch.where(flat >= self.conf, flat, -torch.ones_like(flat))
            scores, idx = flat.topk(min(self.topk, flat.shape[1]), dim=1)
            anchor = torch.div(idx, nc, rounding_mode="floor")
            n = torch.ones_like(decoded[..., 0], dtype=torch.long).sum(1, keepdim=True)  # anchors, as a tensor
            first = (torch.ones_like(anchor).cumsum(0) - 1) * n
            boxes = decoded[..., :4].reshape(-1, 4).index_select(0, (anchor + first).reshape(-1))
            return boxes.reshape(anchor.shape + (4,)), scores, idx - anchor * nc, None
        nc = task.head.nc if task.head is not None else task._nc
        c0 = 4 if task.anchor_free else 5
        cls_scores = decoded[..., c0:c0 + nc]
        if not task.anchor_free:
            cls_scores = cls_scores * decoded[..., 4:5]
        scores, classes = cls_scores.max(-1)
        scores = torch.where(scores > self.conf, scores, -torch.ones_like(scores))
        extra = decoded[..., c0 + nc:] if decoded.shape[-1] > c0 + nc else None
        return xywh2xyxy(decoded[..., :4]), scores, classes, extra


def unpad(dets: torch.Tensor, settings: dict) -> list[torch.Tensor]:
    """An ``nms=True`` file's ``Tensor[B, max_det, 6 + E]`` -> ``task.select``'s per-image list; the padding rows
    go, and so do rows the run's own ``conf``, ``classes`` and ``max_det`` would not keep (the file's, fixed at
    export, have applied already)."""
    out = []
    for d in dets:
        keep = (d[:, 4] > 0) & (d[:, 4] > settings["conf"])
        if settings.get("classes") is not None:
            keep &= torch.isin(d[:, 5].long(), torch.as_tensor(settings["classes"], device=d.device))
        out.append(d[keep][:int(settings["max_det"])])
    return out
