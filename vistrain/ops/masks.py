"""Instance masks from a Segment head's prototypes, at the input or the original image size."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 32  # whole-image masks upsampled at once (memory: CHUNK x H x W floats)


def crop_to_boxes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zero ``masks (Tensor[K, H, W])`` outside ``boxes (Tensor[K, 4])`` (x1, y1, x2, y2 in mask pixels; a
    pixel of index (i, j) is inside when x1 <= j < x2 and y1 <= i < y2)."""
    h, w = masks.shape[-2:]
    cols = torch.arange(w, device=masks.device, dtype=boxes.dtype).view(1, 1, w)
    rows = torch.arange(h, device=masks.device, dtype=boxes.dtype).view(1, h, 1)
    x1, y1, x2, y2 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return masks * ((cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2))


def bilinear_weights(n_out: int, n_in: int) -> torch.Tensor:
    """``Tensor[n_out, n_in]``: the weights by which ``F.interpolate(..., mode="bilinear",
    align_corners=False)`` makes each of ``n_out`` samples from ``n_in`` along one axis (taken from torch
    itself: the interpolation of the unit vectors)."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(0)  # [1, n_in channels, n_in]: channel c is unit vector c
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


@functools.lru_cache(maxsize=64)
def _axis(n_proto: int, n_input: int, start: int = 0, n_used: int | None = None, n_out: int | None = None):
    """One axis of the upsampling: prototypes -> input (-> the part ``start:start + n_used`` resized to
    ``n_out``) as one ``Tensor[n_out, n_proto]`` (float32), with each row's first and last nonzero column.
    Cached (read-only results): a validation set's images mostly share a few sizes and letterboxes."""
    w = bilinear_weights(n_input, n_proto)
    if n_out is not None:
        w = bilinear_weights(n_out, n_used) @ w[start:start + n_used]
    nz = (w != 0).numpy()
    first = nz.argmax(1)
    last = w.shape[1] - 1 - nz[:, ::-1].argmax(1)
    return w.float(), first.tolist(), last.tolist()


def _span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """The pixel indices ``i`` with ``lo <= i < hi`` and ``0 <= i < n`` as ``range(a, b)`` bounds."""
    a = min(max(math.ceil(lo), 0), n) if math.isfinite(lo) else (0 if lo < 0 else n)
    b = min(max(math.ceil(hi), 0), n) if math.isfinite(hi) else (n if hi > 0 else 0)
    return a, max(a, b)


# a box's own path costs rows x band x (band + cols) multiply-adds, resizing whole images about H x W + h x w
# interpolated pixels, each worth ~100 multiply-adds in time (2-core CPU, one thread: 343 us for a 320 px box
# against 633 us for a 320 px image); whole images win only where the output is much larger than the input
PIXEL_COST = 64.0


def box_pixels(boxes, h: int, w: int) -> np.ndarray:
    """The pixels a mask of each box may cover, as ``ndarray[K, 4]`` of half-open index ranges ``(c0, r0, c1,
    r1)``: columns ``j`` with ``x1 <= j < x2`` and rows ``i`` with ``y1 <= i < y2`` inside the image (empty
    ranges have ``c1 <= c0`` or ``r1 <= r0``; NaN boxes cover nothing)."""
    b = np.asarray(boxes.detach().float().cpu() if isinstance(boxes, torch.Tensor) else boxes, np.float64).reshape(-1, 4)
    lim = np.array([w, h, w, h], np.float64)
    return np.nan_to_num(np.clip(np.ceil(b), 0, lim), nan=0).astype(np.int64)


def masks_from_protos(coef: torch.Tensor, proto: torch.Tensor, boxes: torch.Tensor, input_hw: tuple[int, int],
                      ratio_pad: tuple | None = None, orig_hw: tuple[int, int] | None = None,
                      only: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Masks of ``K`` detections -> bool ``Tensor[K, H, W]`` (on the CPU).

    ``coef (Tensor[K, nm])`` mask coefficients, ``proto (Tensor[nm, Hp, Wp])`` the image's prototypes,
    ``boxes (Tensor[K, 4])`` x1, y1, x2, y2 in pixels of the output size.  The mask logits
    ``coef @ proto`` are upsampled (bilinear) to ``input_hw``; with ``orig_hw`` and the letterbox's
    ``ratio_pad = ((rx, ry), (left, top))`` the padding is cut off and the rest resized to the original
    image.  A pixel is in the mask when its logit is > 0 and it lies inside the detection's box (x1 <= j <
    x2, y1 <= i < y2).

    Only the box is needed, and bilinear upsampling is separable: a small box's logits are
    ``Ay[rows] @ M @ Ax[cols].T`` with the weight matrices ``Ay``, ``Ax`` of the two (composed) resizes,
    restricted to the band of prototype rows and columns they touch.  Large boxes, for which that costs
    more than resizing whole images, are upsampled whole and cropped.  Both give the same pixels up to
    float rounding (a logit within ~1e-6 of 0 may fall either way).

    ``only`` (bool ``[K]``): compute just these masks and leave the others empty (validation skips the masks
    that cannot overlap any ground truth).
    """
    h, w = (int(v) for v in (orig_hw if orig_hw is not None else input_hw))
    out = torch.zeros(len(coef), h, w, dtype=torch.bool)
    if not len(coef):
        return out
    nm, hp, wp = proto.shape
    if orig_hw is None:
        (ay, y_first, y_last), (ax, x_first, x_last) = _axis(hp, h), _axis(wp, w)
    else:
        (rx, ry), (left, top) = ratio_pad
        top, left = int(round(top)), int(round(left))
        uh, uw = max(1, round(h * ry)), max(1, round(w * rx))
        ay, y_first, y_last = _axis(hp, input_hw[0], top, uh, h)
        ax, x_first, x_last = _axis(wp, input_hw[1], left, uw, w)
    whole_cost = PIXEL_COST * (input_hw[0] * input_hw[1] + (h * w if orig_hw is not None else 0))
    coef, proto = coef.detach().float(), proto.detach().float()
    m = (coef @ proto.reshape(nm, -1)).view(-1, hp, wp).cpu()
    large = []
    skip = None if only is None else (~np.asarray(only, bool)).tolist()
    for k, (x1, y1, x2, y2) in enumerate(boxes.detach().float().cpu().tolist()):
        if skip is not None and skip[k]:
            continue
        r0, r1 = _span(y1, y2, h)
        c0, c1 = _span(x1, x2, w)
        if r1 == r0 or c1 == c0:
            continue
        p0, p1 = y_first[r0], y_last[r1 - 1] + 1  # (first and last nonzero columns rise with the row)
        q0, q1 = x_first[c0], x_last[c1 - 1] + 1
        if (r1 - r0) * (q1 - q0) * (p1 - p0 + c1 - c0) > whole_cost:
            large.append(k)
            continue
        logits = ay[r0:r1, p0:p1] @ m[k, p0:p1, q0:q1] @ ax[c0:c1, q0:q1].T
        out[k, r0:r1, c0:c1] = logits > 0
    for s in range(0, len(large), CHUNK):
        idx = torch.tensor(large[s:s + CHUNK])
        logits = (coef[idx.to(coef.device)] @ proto.view(nm, -1)).view(-1, 1, hp, wp)
        logits = F.interpolate(logits, size=tuple(input_hw), mode="bilinear", align_corners=False)
        if orig_hw is not None:
            logits = F.interpolate(logits[..., top:top + uh, left:left + uw], size=(h, w), mode="bilinear",
                                   align_corners=False)
        out[idx] = crop_to_boxes(logits[:, 0] > 0, boxes[idx.to(boxes.device)].float()).cpu()
    return out
