"""RetinaNet / EfficientDet anchors, box coding and post-processing, with effdet's numerics.

Coordinates: every box here is ``xyxy`` = (x1, y1, x2, y2) in input-image pixels.  (effdet stores its
anchors and ground truth as yxyx; ``make_anchors(...)[:, [1, 0, 3, 2]]`` is effdet's ``Anchors.boxes``,
bit-equal and in the same order.)  Box codes keep effdet's order (dy, dx, dh, dw), the order of the box
net's 4 channels per anchor.

Anchor order, which the head's channel layout follows: level P_min ... P_max; within a level the cells
row-major (y, then x); within a cell the ``num_scales * len(aspect_ratios)`` anchors, octave scale outer,
aspect ratio inner.  ``flatten_outputs`` brings ``cls_outs`` / ``box_outs`` (per level ``Tensor[B, A * nc,
H_l, W_l]`` / ``Tensor[B, A * 4, H_l, W_l]``) into that same order.

Level sizes are the input size halved ``level`` times with rounding up (``feature_sizes``); a level's anchor
stride is ``input size / level size`` (so 8, 16, ... when the input is a multiple of ``2 ** max_level``, and
fractional otherwise), the anchor centres ``stride / 2 + i * stride``, and an anchor's side
``anchor_scale * stride * 2 ** (octave / num_scales) * aspect``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torchvision

ASPECT_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
BOX_CODE_EPS = 1e-7  # added to the sides before encoding (no division by zero, no log(0))


def feature_sizes(image_size: Sequence[int], max_level: int) -> list[tuple[int, int]]:
    """``[(H_0, W_0), ..., (H_max, W_max)]``: the input (h, w) halved ``level`` times, rounding up."""
    h, w = int(image_size[0]), int(image_size[1])
    sizes = [(h, w)]
    for _ in range(max_level):
        h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def _aspect_xy(aspect) -> tuple[float, float]:
    """An aspect ratio given as (x, y) multipliers, or as one number r: (sqrt(r), 1 / sqrt(r))."""
    if isinstance(aspect, Sequence):
        return float(aspect[0]), float(aspect[1])
    ax = math.sqrt(float(aspect))
    return ax, 1.0 / ax


def make_anchors(image_size: Sequence[int], min_level: int = 3, max_level: int = 7, num_scales: int = 3,
                 aspect_ratios=ASPECT_RATIOS, anchor_scale: float | Sequence[float] = 4.0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The anchors of an input of ``image_size`` (h, w): ``Tensor[N, 4]`` float32 xyxy pixels, in the order
    of the module docstring.  Computed in float64 and rounded once, as effdet does (bit-equal to its
    ``Anchors.boxes`` with the columns swapped to xyxy).  ``anchor_scale`` may be one number per level."""
    h, w = int(image_size[0]), int(image_size[1])
    n_levels = max_level - min_level + 1
    scales = list(anchor_scale) if isinstance(anchor_scale, Sequence) else [anchor_scale] * n_levels
    if len(scales) != n_levels:
        raise ValueError(f"anchor_scale: {len(scales)} values for {n_levels} levels")
    aspects = [_aspect_xy(a) for a in aspect_ratios]
    sizes = feature_sizes((h, w), max_level)
    out = []
    for level in range(min_level, max_level + 1):
        fh, fw = sizes[level]
        sy, sx = h / float(fh), w / float(fw)  # the level's stride
        half_x, half_y = [], []
        for octave in range(num_scales):
            octave_mult = 2 ** (octave / float(num_scales))
            scale = scales[level - min_level]
            for ax, ay in aspects:  # same float64 operation order as effdet: bit-equal after rounding
                half_x.append(scale * sx * octave_mult * ax / 2.0)
                half_y.append(scale * sy * octave_mult * ay / 2.0)
        cy = np.arange(sy / 2, h, sy)  # numpy's arange: effdet's centres, to the last bit
        cx = np.arange(sx / 2, w, sx)
        if len(cy) != fh or len(cx) != fw:
            raise ValueError(f"image_size {image_size}: level {level} centres do not fill its {fh}x{fw} grid")
        half_x, half_y = np.asarray(half_x), np.asarray(half_y)
        cyy, cxx = cy[:, None, None], cx[None, :, None]  # [fh, 1, 1], [1, fw, 1]; anchors on the last axis
        shape = (fh, fw, len(half_x))
        boxes = np.stack([np.broadcast_to(cxx - half_x, shape), np.broadcast_to(cyy - half_y, shape),
                          np.broadcast_to(cxx + half_x, shape), np.broadcast_to(cyy + half_y, shape)], -1)
        out.append(boxes.reshape(-1, 4))
    return torch.from_numpy(np.concatenate(out, 0)).float().to(device)


def flatten_outputs(cls_outs: Sequence[torch.Tensor], box_outs: Sequence[torch.Tensor],
                    num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level head outputs -> ``(Tensor[B, N, nc], Tensor[B, N, 4])`` in anchor order.  ``num_classes``
    defaults to the class channels / anchors per cell (the box channels tell the anchors per cell)."""
    b = cls_outs[0].shape[0]
    a = box_outs[0].shape[1] // 4
    nc = cls_outs[0].shape[1] // a if num_classes is None else num_classes
    cls = torch.cat([c.permute(0, 2, 3, 1).reshape(b, -1, nc) for c in cls_outs], 1)
    box = torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1, 4) for x in box_outs], 1)
    return cls, box


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor, eps: float = BOX_CODE_EPS) -> torch.Tensor:
    """``boxes``, ``anchors`` (``Tensor[..., 4]`` xyxy, broadcastable) -> ``Tensor[..., 4]`` codes
    (dy, dx, dh, dw): centre offset over the anchor's side, log of the side ratio; sides get ``eps`` added
    (effdet's FasterRcnnBoxCoder without scale factors, as effdet's labeler uses it)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    ax1, ay1, ax2, ay2 = anchors.unbind(-1)
    h, w, ha, wa = y2 - y1, x2 - x1, ay2 - ay1, ax2 - ax1
    cy, cx, cya, cxa = y1 + h / 2.0, x1 + w / 2.0, ay1 + ha / 2.0, ax1 + wa / 2.0
    h, w, ha, wa = h + eps, w + eps, ha + eps, wa + eps
    return torch.stack(((cy - cya) / ha, (cx - cxa) / wa, torch.log(h / ha), torch.log(w / wa)), -1)


def decode_boxes(codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``codes`` (dy, dx, dh, dw) ``Tensor[..., 4]`` on ``anchors`` (xyxy, broadcastable) -> xyxy boxes
    (effdet's ``decode_box_outputs``: no epsilon, no clamping of dh / dw)."""
    dy, dx, dh, dw = codes.unbind(-1)
    ax1, ay1, ax2, ay2 = anchors.unbind(-1)
    cya, cxa = (ay1 + ay2) / 2, (ax1 + ax2) / 2
    ha, wa = ay2 - ay1, ax2 - ax1
    w, h = torch.exp(dw) * wa, torch.exp(dh) * ha
    cy, cx = dy * ha + cya, dx * wa + cxa
    return torch.stack((cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0), -1)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes1 (Tensor[..., M, 4])`` with ``boxes2 (Tensor[..., N, 4])`` (xyxy) ->
    ``Tensor[..., M, N]``; pairs that do not intersect get 0 (also empty boxes).  The operations and their
    order are effdet's IouSimilarity, so the values are bit-equal to it."""
    a = [c.unsqueeze(-1) for c in boxes1.unbind(-1)]  # 4 x [..., M, 1]
    b = [c.unsqueeze(-2).contiguous() for c in boxes2.unbind(-1)]  # 4 x [..., 1, N]: N innermost, contiguous
    inter = torch.minimum(a[3], b[3]).sub_(torch.maximum(a[1], b[1])).clamp_(min=0)  # in place: fewer passes
    inter.mul_(torch.minimum(a[2], b[2]).sub_(torch.maximum(a[0], b[0])).clamp_(min=0))
    union = ((a[3] - a[1]) * (a[2] - a[0]) + (b[3] - b[1]) * (b[2] - b[0])).sub_(inter)
    return inter.div_(union).nan_to_num_(0.0)  # 0 / union is 0 (0 / 0: two empty boxes, NaN -> 0)


def batched_soft_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None = None,
                     sigma: float = 0.5, min_score: float = 0.001,
                     max_det: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian soft-NMS (Bodla et al. 2017) within each group (class) -> ``(indices, scores)`` of at most
    ``max_det`` boxes, best first.  Repeatedly the best remaining box of a group is kept and every other box
    of its group has its score multiplied by ``exp(-IoU ** 2 / sigma)``; boxes whose score drops to
    ``min_score`` or below leave (effdet's ``batched_soft_nms`` defaults; as there, the best box of all is
    kept even if it starts below ``min_score``).  All groups advance together, one kept box per group per
    step; a group's kept scores never increase, so ``max_det`` steps find the ``max_det`` best overall."""
    device = boxes.device
    k = scores.numel()
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device), scores.new_zeros(0)
    groups = torch.zeros(k, dtype=torch.long, device=device) if groups is None else groups.long()
    scores = scores.float()
    active0 = scores > min_score
    active0[scores.argmax()] = True
    idx = active0.nonzero().squeeze(1)
    g_ids, g = torch.unique(groups[idx], return_inverse=True)
    order = torch.argsort(g, stable=True)
    idx, g = idx[order], g[order]
    counts = torch.bincount(g, minlength=len(g_ids))
    slot = torch.arange(len(idx), device=device) - (torch.cumsum(counts, 0) - counts)[g]
    n_g, width = len(g_ids), int(counts.max())
    pad_idx = torch.full((n_g, width), -1, dtype=torch.long, device=device)
    pad_idx[g, slot] = idx
    s = torch.zeros(n_g, width, device=device)
    s[g, slot] = scores[idx]
    b = torch.zeros(n_g, width, 4, device=device, dtype=boxes.dtype)
    b[g, slot] = boxes[idx]
    active = pad_idx >= 0
    rows = torch.arange(n_g, device=device)
    kept_idx, kept_score = [], []
    for _ in range(max_det):
        live = active.any(1)
        if not live.any():
            break
        best = torch.where(active, s, torch.full_like(s, -1.0)).argmax(1)  # [G]
        r = rows[live]
        kept_idx.append(pad_idx[r, best[r]])
        kept_score.append(s[r, best[r]])
        iou = box_iou(b[rows, best][:, None], b)[:, 0]  # [G, W]
        s = s * torch.exp(-iou.pow(2) / sigma)
        active[rows, best] = False
        active &= s > min_score
    kept_idx, kept_score = torch.cat(kept_idx), torch.cat(kept_score)
    top = torch.argsort(kept_score, descending=True, stable=True)[:max_det]
    return kept_idx[top], kept_score[top]


def decode_outputs(cls_outs: Sequence[torch.Tensor], box_outs: Sequence[torch.Tensor],
                   anchors: torch.Tensor) -> torch.Tensor:
    """Raw EfficientDet outputs -> ``Tensor[B, N, 4 + nc]``: every anchor's box (x1, y1, x2, y2 in input pixels,
    decoded on ``anchors``, ``make_anchors`` of the input size) and class probabilities (sigmoid), in anchor
    order.  What an exported EfficientDet returns; ``select_detections`` turns it into detections."""
    cls, box = flatten_outputs(cls_outs, box_outs)
    if anchors.shape[0] != cls.shape[1]:
        raise ValueError(f"{anchors.shape[0]} anchors for {cls.shape[1]} predictions per image: anchors of another "
                         f"input size?")
    boxes = decode_boxes(box.float(), anchors.to(box.device))
    return torch.cat((boxes, cls.float().sigmoid()), -1)


def select_detections(decoded: torch.Tensor, conf: float = 0.001, iou: float = 0.5, max_det: int = 100,
                      classes: Sequence[int] | None = None, agnostic: bool = False, topk: int = 5000,
                      soft_nms: bool = False, soft_nms_sigma: float = 0.5, soft_nms_min_score: float = 0.001,
                      image_size: Sequence[int] | None = None) -> list[torch.Tensor]:
    """``decode_outputs``' ``Tensor[B, N, 4 + nc]`` -> per image ``Tensor[K, 6]`` (x1, y1, x2, y2, score, class)
    best first, in input pixels; score = sigmoid probability, class 0-based; K <= ``max_det``, no padding rows.

    As effdet's ``DetBenchPredict``: the ``topk`` best (anchor, class) scores of an image over all levels, then
    class-wise NMS at IoU ``iou`` (``torchvision.ops.batched_nms``) or, with ``soft_nms``, Gaussian soft-NMS
    (``batched_soft_nms``; the kept boxes carry their decayed scores; ``iou`` is not used), and the ``max_det``
    best.  Options effdet does not have: ``conf`` drops scores below it, ``classes`` keeps only those classes,
    ``agnostic`` suppresses across classes, and ``image_size`` (h, w) clips boxes to the image before NMS (effdet
    clips only when given ``img_info``; without it, as here by default, boxes may reach past the image).  With
    ``conf=0`` and the other options at their defaults the detections equal effdet's (its 1-based classes
    minus 1, its zero padding rows dropped)."""
    b, n, c = decoded.shape
    nc = c - 4
    flat = decoded[..., 4:].reshape(b, -1)
    keep_cls = None if classes is None else torch.as_tensor(list(classes), device=decoded.device)
    out = []
    for i in range(b):
        if conf > 0:  # the scores >= conf first, then their top k: the same set, without a top-k over all N x nc
            flat_idx = (flat[i] >= conf).nonzero().squeeze(1)
            if len(flat_idx) > topk:
                flat_idx = flat_idx[flat[i, flat_idx].topk(topk).indices]
            sc = flat[i, flat_idx]
        else:
            sc, flat_idx = flat[i].topk(min(topk, n * nc))
        a_idx, cl = flat_idx // nc, flat_idx % nc
        bx = decoded[i, a_idx, :4]
        if image_size is not None:
            lim = torch.tensor([image_size[1], image_size[0]] * 2, dtype=bx.dtype, device=bx.device)
            bx = bx.clamp(min=0).minimum(lim)
        keep = sc >= conf
        if keep_cls is not None:
            keep &= torch.isin(cl, keep_cls)
        if not bool(keep.all()):
            bx, sc, cl = bx[keep], sc[keep], cl[keep]
        grp = torch.zeros_like(cl) if agnostic else cl
        if soft_nms:
            j, sc_j = batched_soft_nms(bx, sc, grp, soft_nms_sigma, soft_nms_min_score, max_det)
            ok = sc_j >= conf
            j, sc_j = j[ok], sc_j[ok]
        else:
            j = torchvision.ops.batched_nms(bx, sc, grp, iou)[:max_det]
            sc_j = sc[j]
        out.append(torch.cat((bx[j], sc_j[:, None], cl[j, None].to(bx.dtype)), 1))
    return out


def postprocess(cls_outs: Sequence[torch.Tensor], box_outs: Sequence[torch.Tensor], anchors: torch.Tensor,
                **settings) -> list[torch.Tensor]:
    """Raw EfficientDet outputs -> detections: ``select_detections(decode_outputs(...), **settings)``."""
    return select_detections(decode_outputs(cls_outs, box_outs, anchors), **settings)
