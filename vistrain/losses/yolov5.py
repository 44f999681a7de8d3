"""The YOLOv5 (v7.0) detection loss: anchor-ratio target assignment, CIoU box loss,
IoU-targeted objectness and (smoothed) BCE class loss.

The model stays pure: this loss gets ``num_classes``, ``anchors`` (in stride units) and ``strides``
as arguments; ``YOLOv5Loss.from_model`` reads them off a model's ``Detect`` head once.

Shapes: ``preds[i] (Tensor[B, na, H_i, W_i, 5 + nc])`` raw head outputs (xywh logits, objectness
logit, class logits); ``targets (Tensor[T, 6])`` rows of (image index in batch, class, cx, cy, w, h),
normalised 0..1 to the input image.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
import torch.nn as nn

from vistrain.losses.iou import ciou_xyxy
from vistrain.losses.sync import batch_total, world
from vistrain.ops.boxes import xywh2xyxy

# A target is also assigned to the two nearest of its four neighbour cells when its centre lies
# within this fraction of a cell from their shared edge (YOLOv5's g = 0.5).
NEIGHBOUR_BIAS = 0.5

# The objectness loss of each level is weighted by its resolution: fine levels (many, mostly empty
# cells) count more. YOLOv5's constants for 3 levels and for other counts.
_BALANCE_3 = (4.0, 1.0, 0.4)
_BALANCE_OTHER = (4.0, 1.0, 0.25, 0.06, 0.02)


def level_balance(num_levels: int) -> list[float]:
    """YOLOv5's objectness weight per level: [4.0, 1.0, 0.4] for 3 levels, else [4, 1, .25, .06, .02]."""
    table = _BALANCE_3 if num_levels == 3 else _BALANCE_OTHER
    if num_levels > len(table):
        raise ValueError(f"no default objectness balance for {num_levels} levels; pass balance=[...]")
    return list(table[:num_levels])


def smooth_bce_targets(eps: float = 0.0) -> tuple[float, float]:
    """Class BCE targets with label smoothing ``eps``: (positive, negative) = (1 - eps/2, eps/2)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


def ciou(pred_xywh: torch.Tensor, target_xywh: torch.Tensor) -> torch.Tensor:
    """Complete IoU of matched pairs ``Tensor[M, 4]`` (cx, cy, w, h) -> ``Tensor[M]`` (see :func:`ciou_xyxy`)."""
    return ciou_xyxy(xywh2xyxy(pred_xywh), xywh2xyxy(target_xywh))


class LevelTargets(NamedTuple):
    """The positives of one level, ``M`` rows (a target repeated over its matched anchors and cells).

    ``image, anchor, gj, gi (Tensor[M] long)`` index ``preds[i][image, anchor, gj, gi]``;
    ``box (Tensor[M, 4])`` the target's (x, y) offset from cell (gi, gj) and (w, h), in grid
    units; ``cls (Tensor[M] long)``; ``anchor_wh (Tensor[M, 2])`` the matched anchor in grid units.
    """

    image: torch.Tensor
    anchor: torch.Tensor
    gj: torch.Tensor
    gi: torch.Tensor
    box: torch.Tensor
    cls: torch.Tensor
    anchor_wh: torch.Tensor


def _neighbour_mask(gxy: torch.Tensor, grid_wh: torch.Tensor, g: float) -> torch.Tensor:
    """``gxy (Tensor[M, 2])`` centres in grid units -> ``Tensor[5, M]`` bool: (own cell, left, up,
    right, down). A neighbour is used when the centre is within ``g`` of that edge and the
    neighbour cell exists (the centre is more than one cell from the image border)."""
    inv = grid_wh - gxy  # distance to the right / bottom border
    left, up = ((gxy % 1 < g) & (gxy > 1)).T
    right, down = ((inv % 1 < g) & (inv > 1)).T
    return torch.stack((torch.ones_like(left), left, up, right, down))


def build_targets(shapes: list[torch.Size], targets: torch.Tensor, anchors: torch.Tensor,
                  anchor_t: float = 4.0, g: float = NEIGHBOUR_BIAS) -> list[LevelTargets]:
    """Assign targets to anchors and cells of each level, as YOLOv5 v7.0 does.

    ``shapes[i]`` is ``preds[i].shape`` (B, na, H, W, no); ``targets (Tensor[T, 6])`` as in the module
    doc; ``anchors (Tensor[nl, na, 2])`` in stride (= grid) units. A target matches an anchor when
    both its width and height ratios r to the anchor satisfy ``max(r, 1/r) < anchor_t``; each
    match goes to the target's own cell and to the two nearest neighbour cells (left/right,
    up/down) whose edge lies within ``g`` cells of the target centre.
    """
    device = targets.device
    na, nt = anchors.shape[1], targets.shape[0]
    # (na, T, 7): every target once per anchor, with the anchor index appended
    anchor_idx = torch.arange(na, device=device, dtype=targets.dtype).view(na, 1, 1).expand(na, nt, 1)
    targets_a = torch.cat((targets[None].expand(na, nt, 6), anchor_idx), 2)
    offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device, dtype=targets.dtype) * g
    out = []
    for level, shape in enumerate(shapes):
        h, w = int(shape[2]), int(shape[3])
        level_anchors = anchors[level].to(device=device, dtype=targets.dtype)
        scale = torch.tensor([1, 1, w, h, w, h, 1], device=device, dtype=targets.dtype)
        t = targets_a * scale  # boxes in grid units of this level
        ratio = t[..., 4:6] / level_anchors[:, None]  # (na, T, 2)
        t = t[torch.max(ratio, 1 / ratio).amax(2) < anchor_t]  # (M0, 7)
        gxy = t[:, 2:4]
        use = _neighbour_mask(gxy, torch.tensor([w, h], device=device, dtype=t.dtype), g)  # (5, M0)
        t = t[None].expand(5, -1, -1)[use]
        shift = offsets[:, None].expand(-1, use.shape[1], -1)[use]
        gxy, gwh = t[:, 2:4], t[:, 4:6]
        cell = (gxy - shift).long()
        gi = cell[:, 0].clamp(0, w - 1)
        gj = cell[:, 1].clamp(0, h - 1)
        cell = torch.stack((gi, gj), 1).to(t.dtype)
        a = t[:, 6].long()
        out.append(LevelTargets(t[:, 0].long(), a, gj, gi, torch.cat((gxy - cell, gwh), 1), t[:, 1].long(),
                                level_anchors[a]))
    return out


class YOLOv5Loss:
    """YOLOv5 v7.0 loss. ``__call__(preds, targets) -> (loss, Tensor[3])``: the total
    ``(box + obj + cls) * B`` to back-propagate, and the detached (box, obj, cls) components.

    ``anchors (Tensor[nl, na, 2])`` in units of each level's stride; ``strides (Tensor[nl])``.
    Gains are the hyperparameters of a 3-level, 80-class, 640-px model, scaled here as YOLOv5's
    train.py does: box x 3/nl, cls x nc/80 x 3/nl, obj x (imgsz/640)^2 x 3/nl.
    """

    def __init__(self, num_classes: int, anchors: torch.Tensor, strides: torch.Tensor, box: float = 0.05,
                 obj: float = 1.0, cls: float = 0.5, anchor_t: float = 4.0, label_smoothing: float = 0.0,
                 imgsz: int = 640, balance: list[float] | None = None, cls_pw: float = 1.0, obj_pw: float = 1.0):
        anchors = torch.as_tensor(anchors, dtype=torch.float32).detach().clone()
        if anchors.ndim != 3 or anchors.shape[-1] != 2:
            raise ValueError(f"anchors must be Tensor[nl, na, 2] in stride units, got shape {tuple(anchors.shape)}")
        self.nc = int(num_classes)
        self.nl, self.na = anchors.shape[:2]
        self.anchors = anchors
        self.strides = torch.as_tensor(strides, dtype=torch.float32).detach().clone()
        if self.strides.numel() != self.nl:
            raise ValueError(f"{self.strides.numel()} strides for {self.nl} anchor levels")
        level_scale = 3.0 / self.nl
        self.box_gain = box * level_scale
        self.cls_gain = cls * self.nc / 80.0 * level_scale
        self.obj_gain = obj * (imgsz / 640.0) ** 2 * level_scale
        self.anchor_t = float(anchor_t)
        self.balance = list(balance) if balance is not None else level_balance(self.nl)
        if len(self.balance) != self.nl:
            raise ValueError(f"balance has {len(self.balance)} weights for {self.nl} levels")
        self.cls_pos, self.cls_neg = smooth_bce_targets(label_smoothing)
        self.cls_pw, self.obj_pw = float(cls_pw), float(obj_pw)
        self.gr = 1.0  # objectness target = (1 - gr) + gr * IoU

    @classmethod
    def from_model(cls, model: nn.Module, hyp: Mapping[str, Any] | None = None) -> "YOLOv5Loss":
        """Read ``nc``, ``anchors`` and ``stride`` off ``model``'s anchor-based ``Detect`` head.
        ``hyp`` may hold any keyword of ``__init__`` (box, obj, cls, anchor_t, label_smoothing,
        imgsz, balance, cls_pw, obj_pw); other keys are ignored."""
        from vistrain.nn.modules import Detect

        head = next((m for m in model.modules() if isinstance(m, Detect)), None)
        if head is None:
            raise ValueError(f"{type(model).__name__} has no anchor-based Detect head")
        if not bool((head.stride > 0).all()):
            raise ValueError("Detect head strides are unset (0); build the model with vistrain.build_model")
        keys = ("box", "obj", "cls", "anchor_t", "label_smoothing", "imgsz", "balance", "cls_pw", "obj_pw")
        kwargs = {k: v for k, v in (hyp or {}).items() if k in keys}
        return cls(head.nc, head.anchors.detach().cpu(), head.stride.detach().cpu(), **kwargs)

    def build_targets(self, preds: list[torch.Tensor], targets: torch.Tensor) -> list[LevelTargets]:
        """Per level positives (see ``build_targets``) for ``preds`` and ``targets (Tensor[T, 6])``."""
        return build_targets([p.shape for p in preds], targets.to(preds[0].device, torch.float32),
                             self.anchors.to(preds[0].device), self.anchor_t)

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(preds) != self.nl:
            raise ValueError(f"{len(preds)} prediction levels for a loss built for {self.nl}")
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(f"targets must be Tensor[T, 6] (image, class, cx, cy, w, h), got {tuple(targets.shape)}")
        if preds[0].shape[-1] != self.nc + 5:
            raise ValueError(f"predictions have {preds[0].shape[-1]} channels, expected nc + 5 = {self.nc + 5}")
        if targets.numel() and not bool(((targets[:, 1] >= 0) & (targets[:, 1] < self.nc)).all()):
            bad = targets[:, 1][(targets[:, 1] < 0) | (targets[:, 1] >= self.nc)]
            raise ValueError(f"target class {int(bad[0])} out of range for num_classes={self.nc}")
        device = preds[0].device
        level_targets = self.build_targets(preds, targets)
        obj_pw = torch.tensor([self.obj_pw], device=device)
        cls_pw = torch.tensor([self.cls_pw], device=device)
        zero = torch.zeros((), device=device)
        lbox, lobj, lcls = zero, zero, zero
        w = world()  # DDP step: the box and class terms average over the positives of every rank
        counts = batch_total(torch.tensor([float(len(t.image)) for t in level_targets], device=device)) / w
        for p, t, weight, count in zip(preds, level_targets, self.balance, counts):
            p = p.float()
            tobj = torch.zeros(p.shape[:4], device=device)
            if t.image.numel():
                ps = p[t.image, t.anchor, t.gj, t.gi]  # (M, 5 + nc)
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * t.anchor_wh
                iou = ciou(torch.cat((pxy, pwh), 1), t.box)
                lbox = lbox + ((1.0 - iou).mean() if w == 1 else (1.0 - iou).sum() / count)
                tobj[t.image, t.anchor, t.gj, t.gi] = (1.0 - self.gr) + self.gr * iou.detach().clamp(0)
                if self.nc > 1:
                    tcls = torch.full_like(ps[:, 5:], self.cls_neg)
                    tcls[torch.arange(len(t.cls), device=device), t.cls] = self.cls_pos
                    bce = nn.functional.binary_cross_entropy_with_logits(ps[:, 5:], tcls, pos_weight=cls_pw,
                                                                         reduction="mean" if w == 1 else "sum")
                    lcls = lcls + (bce if w == 1 else bce / (count * self.nc))
            lobj = lobj + weight * nn.functional.binary_cross_entropy_with_logits(p[..., 4], tobj, pos_weight=obj_pw)
        lbox, lobj, lcls = lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain
        batch_size = preds[0].shape[0]
        return (lbox + lobj + lcls) * batch_size * w, torch.stack((lbox, lobj, lcls)).detach()
