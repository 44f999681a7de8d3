"""EfficientDet / RetinaNet loss: anchor labeling by IoU, sigmoid focal loss for classes, Huber or smooth-L1
on the encoded box targets.

``EffDetLoss(nc, ...)(preds, targets) -> (loss * batch size, Tensor[2] detached (box_loss, cls_loss))``.
``preds`` = ``(cls_outs, box_outs)`` as the EfficientDet model returns them (per level
``Tensor[B, A * nc, H_l, W_l]`` and ``Tensor[B, A * 4, H_l, W_l]``); ``targets (Tensor[T, 6])`` rows (image
index in batch, class 0-based, cx, cy, w, h) normalised 0..1 to the input image.  Ground-truth boxes in
pixels are ``xywh2xyxy(normalised) * (W, H, W, H)``.

Presets:

* ``effdet`` (effdet's ``DetBenchTrain`` with its default config; value and gradients equal to it):
  an anchor is positive if its best IoU with an object is >= 0.5, else negative; every object is also
  force-matched to its best anchor (the first of equals; on an anchor claimed by several objects the first
  object wins), which overrides the IoU rule (an empty box, overlapping no anchor, claims none: effdet
  would give it anchor 0).  Class loss: sigmoid focal loss, alpha 0.25, gamma 1.5 (effdet's
  non-legacy form, no label smoothing) summed over anchors and classes.  Box loss: Huber (delta 0.1) of the
  predicted codes against the positives' encoded targets, summed over the coordinates whose target is not
  exactly 0 (effdet's mask), divided by 4 (the mean over the 4 coordinates).  Both divided by
  ``num_pos + 1`` (positive anchors of the batch, +1 so an empty batch stays finite); total =
  cls + 50 * box.
* ``tutorial`` (RetinaNet, Lin et al. 2017, as Detectron trains it): positive at IoU >= 0.5, negative below
  0.4, anchors in between ignored (no class loss), every object force-matched to its best anchor as above
  (Detectron and torchvision's "low-quality matches" do the same; the paper does not say).  Focal alpha
  0.25, gamma 2.0.  Box loss smooth-L1 (beta 1/9) summed over all 4 coordinates of the positives, weight 1:
  RetinaNet's regression loss is a sum over the coordinates with loss weight 1, not effdet's mean over
  them times 50.  Normaliser ``num_pos + 1`` as effdet's (the paper normalises by the positives; the +1
  only keeps an image-free batch finite).

Any preset value can be overridden: ``match_iou``, ``unmatch_iou``, ``force_match``, ``alpha``, ``gamma``,
``delta`` (Huber delta / smooth-L1 beta), ``box_loss_weight``.

Items: ``box_loss`` = ``box_loss_weight`` x the box loss (effdet's ``box_loss`` times 50 under the effdet
preset), ``cls_loss`` = the class loss; their sum is effdet's total ``loss``.

The anchors are those of the input size: the constructor's ``image_size`` (h, w) when its level sizes are
those of the predictions, else P_min's size x ``2 ** min_level`` (exact for inputs that are multiples of
the stride, as letterboxed validation batches are), cached per size and device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vistrain.losses.sync import batch_total, world
from vistrain.losses.yolov8 import pad_targets
from vistrain.ops.boxes import xywh2xyxy
from vistrain.ops.retina import ASPECT_RATIOS, box_iou, encode_boxes, feature_sizes, flatten_outputs, make_anchors

PRESETS = {
    "effdet": {"match_iou": 0.5, "unmatch_iou": 0.5, "force_match": True, "alpha": 0.25, "gamma": 1.5,
               "box_loss": "huber", "delta": 0.1, "box_loss_weight": 50.0, "coord_mean": True},
    "tutorial": {"match_iou": 0.5, "unmatch_iou": 0.4, "force_match": True, "alpha": 0.25, "gamma": 2.0,
                 "box_loss": "smooth_l1", "delta": 1.0 / 9.0, "box_loss_weight": 1.0, "coord_mean": False},
}
IOU_CHUNK = 1 << 24  # IoU matrix elements computed at once (images x objects x anchors)


def match_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, valid: torch.Tensor, match_iou: float = 0.5,
                  unmatch_iou: float = 0.5, force_match: bool = True) -> torch.Tensor:
    """``anchors (Tensor[N, 4])``, ``gt_boxes (Tensor[B, M, 4])`` xyxy pixels, ``valid (Tensor[B, M])`` ->
    ``Tensor[B, N]`` long: per anchor the index of its object (>= 0), -1 negative, -2 ignored.

    An anchor takes the object of its highest IoU (the first of equals): matched if that IoU >= ``match_iou``,
    negative if < ``unmatch_iou``, ignored in between.  With ``force_match`` every valid object then also
    claims the anchor of its own highest IoU (the first of equals), the lowest object index winning an anchor
    claimed twice: effdet's ArgMaxMatcher with ``force_match_for_each_row``, as one IoU matrix per image.
    Unlike effdet, an object that overlaps no anchor at all (an empty box) claims nothing (effdet gives it
    anchor 0, whatever that is, and a regression target of log(1e-7))."""
    b, m = valid.shape
    n = anchors.shape[0]
    out = torch.full((b, n), -1, dtype=torch.long, device=anchors.device)
    if m == 0 or not bool(valid.any()):
        return out
    step = max(1, IOU_CHUNK // (m * n))
    for i in range(0, b, step):
        sl = slice(i, i + step)
        iou = box_iou(gt_boxes[sl], anchors).masked_fill_(~valid[sl, :, None], -1.0)  # [b, M, N]
        best, arg = iou.max(1)
        match = torch.where(best >= match_iou, arg, torch.where(best < unmatch_iou, -1, -2))
        if force_match:
            rows = torch.arange(m, device=anchors.device).expand_as(valid[sl])
            top, col = iou.max(2)
            claim = torch.full_like(match, m).scatter_reduce_(1, col, torch.where(top > 0, rows, m), "amin")
            match = torch.where(claim < m, claim, match)
        out[sl] = match
    return out


class EffDetLoss:
    """The EfficientDet / RetinaNet detection loss (see the module docstring)."""

    names = ("box_loss", "cls_loss")

    def __init__(self, num_classes: int, image_size: Sequence[int] | int | None = None, *, min_level: int = 3,
                 max_level: int = 7, num_scales: int = 3, aspect_ratios=ASPECT_RATIOS,
                 anchor_scale: float | Sequence[float] = 4.0, preset: str = "effdet",
                 box_loss_weight: float | None = None, alpha: float | None = None, gamma: float | None = None,
                 delta: float | None = None, match_iou: float | None = None, unmatch_iou: float | None = None,
                 force_match: bool | None = None):
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}: expected one of {', '.join(PRESETS)}")
        p = dict(PRESETS[preset])
        given = {"box_loss_weight": box_loss_weight, "alpha": alpha, "gamma": gamma, "delta": delta,
                 "match_iou": match_iou, "unmatch_iou": unmatch_iou, "force_match": force_match}
        p.update({k: v for k, v in given.items() if v is not None})
        if p["unmatch_iou"] > p["match_iou"]:
            raise ValueError(f"unmatch_iou {p['unmatch_iou']} > match_iou {p['match_iou']}")
        self.nc, self.preset, self.hyp = int(num_classes), preset, p
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.anchor_kwargs = {"min_level": min_level, "max_level": max_level, "num_scales": num_scales,
                              "aspect_ratios": aspect_ratios, "anchor_scale": anchor_scale}
        self._anchors: dict = {}

    # --- anchors ------------------------------------------------------------------------------
    def input_size(self, level_sizes: list[tuple[int, int]]) -> tuple[int, int]:
        """The (h, w) input size behind predictions whose levels are ``level_sizes`` (see module docstring)."""
        lo, hi = self.anchor_kwargs["min_level"], self.anchor_kwargs["max_level"]
        if len(level_sizes) != hi - lo + 1:
            raise ValueError(f"{len(level_sizes)} prediction levels, expected P{lo}-P{hi}")

        def fits(size):
            return feature_sizes(size, hi)[lo:] == level_sizes

        if self.image_size is not None and fits(self.image_size):
            return self.image_size
        size = (level_sizes[0][0] << lo, level_sizes[0][1] << lo)
        if not fits(size):
            raise ValueError(f"prediction level sizes {level_sizes} fit no input size")
        return size

    def anchors(self, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (size, str(device))
        if key not in self._anchors:
            self._anchors[key] = make_anchors(size, **self.anchor_kwargs, device=device)
        return self._anchors[key]

    # --- loss ---------------------------------------------------------------------------------
    def focal_loss(self, logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Element-wise sigmoid focal loss ``alpha_t * (1 - p_t) ** gamma * CE``; ``positive`` bool targets.
        Written on ``s = -x`` for positives, ``x`` for negatives: ``1 - p_t = sigmoid(s)`` and
        ``CE = softplus(s)``, accurate also where effdet's ``1 - p_t`` rounds to 0 (a few ulp from effdet's value)."""
        alpha, gamma = self.hyp["alpha"], self.hyp["gamma"]
        s = torch.where(positive, -logits, logits)
        alpha_t = torch.where(positive, alpha, 1.0 - alpha)
        return alpha_t * torch.sigmoid(s).pow(gamma) * torch.nn.functional.softplus(s)

    def box_terms(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed box loss over positives' codes ``pred``, ``target (Tensor[P, 4])``, before normalising."""
        d = self.hyp["delta"]
        err = (pred - target).abs()
        if self.hyp["box_loss"] == "huber":  # effdet: only coordinates whose target is not 0 count
            quad = err.clamp(max=d)
            return ((0.5 * quad.pow(2) + d * (err - quad)) * (target != 0.0)).sum()
        return torch.where(err < d, 0.5 * err.pow(2) / d, err - 0.5 * d).sum()

    def __call__(self, preds, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls_outs, box_outs = preds
        size = self.input_size([tuple(int(v) for v in c.shape[-2:]) for c in cls_outs])
        cls, box = flatten_outputs(cls_outs, box_outs, self.nc)
        cls, box = cls.float(), box.float()
        b, n, _ = cls.shape
        anchors = self.anchors(size, cls.device)
        if anchors.shape[0] != n:
            raise ValueError(f"{n} predictions per image, {anchors.shape[0]} anchors at input size {size}")
        gt_cls, gt_xywh, valid = pad_targets(targets.to(cls.device).float(), b)
        if len(targets) and not 0 <= float(targets[:, 1].min()) <= float(targets[:, 1].max()) < self.nc:
            raise ValueError(f"target classes must be in 0..{self.nc - 1}")
        scale = torch.tensor([size[1], size[0], size[1], size[0]], device=cls.device, dtype=torch.float32)
        gt_boxes = xywh2xyxy(gt_xywh) * scale
        match = match_anchors(anchors, gt_boxes, valid, self.hyp["match_iou"], self.hyp["unmatch_iou"],
                              self.hyp["force_match"])
        pos_b, pos_n = (match >= 0).nonzero(as_tuple=True)
        pos_m = match[pos_b, pos_n]
        w = world()  # DDP step: (positives of the whole batch + 1) / ranks
        norm = pos_b.numel() + 1.0 if w == 1 else (batch_total(torch.tensor(float(pos_b.numel()))) + 1.0) / w

        positive = torch.zeros_like(cls, dtype=torch.bool)
        positive[pos_b, pos_n, gt_cls[pos_b, pos_m].long()] = True
        focal = self.focal_loss(cls, positive)
        if self.hyp["unmatch_iou"] < self.hyp["match_iou"]:  # an ignore band exists
            focal = focal * (match != -2)[..., None]
        cls_loss = focal.sum() / norm

        target = encode_boxes(gt_boxes[pos_b, pos_m], anchors[pos_n])
        box_loss = self.box_terms(box[pos_b, pos_n], target) / (norm * 4.0 if self.hyp["coord_mean"] else norm)
        terms = torch.stack((box_loss * self.hyp["box_loss_weight"], cls_loss))
        return terms.sum() * b * w, terms.detach()
