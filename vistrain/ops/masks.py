"""Instance masks from a Segment head's prototypes, at the input or the original image size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 32  # masks upsampled at once (memory: CHUNK x H x W floats)


def crop_to_boxes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zero ``masks (Tensor[K, H, W])`` outside ``boxes (Tensor[K, 4])`` (x1, y1, x2, y2 in mask pixels; a
    pixel of index (i, j) is inside when x1 <= j < x2 and y1 <= i < y2)."""
    h, w = masks.shape[-2:]
    cols = torch.arange(w, device=masks.device, dtype=boxes.dtype).view(1, 1, w)
    rows = torch.arange(h, device=masks.device, dtype=boxes.dtype).view(1, h, 1)
    x1, y1, x2, y2 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return masks * ((cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2))


def masks_from_protos(coef: torch.Tensor, proto: torch.Tensor, boxes: torch.Tensor, input_hw: tuple[int, int],
                      ratio_pad: tuple | None = None, orig_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Masks of ``K`` detections -> bool ``Tensor[K, H, W]``.

    ``coef (Tensor[K, nm])`` mask coefficients, ``proto (Tensor[nm, Hp, Wp])`` the image's prototypes,
    ``boxes (Tensor[K, 4])`` x1, y1, x2, y2 in pixels of the output size.  The mask logits
    ``coef @ proto`` are upsampled (bilinear) to ``input_hw``; with ``orig_hw`` and the letterbox's
    ``ratio_pad = ((rx, ry), (left, top))`` the padding is cut off and the rest resized to the original
    image.  A pixel is in the mask when its logit is > 0 and it lies inside the detection's box.
    """
    h, w = orig_hw if orig_hw is not None else input_hw
    out = torch.zeros(len(coef), h, w, dtype=torch.bool, device=proto.device)
    if not len(coef):
        return out
    nm, hp, wp = proto.shape
    for s in range(0, len(coef), CHUNK):
        logits = (coef[s:s + CHUNK].float() @ proto.float().view(nm, -1)).view(-1, 1, hp, wp)
        logits = F.interpolate(logits, size=tuple(input_hw), mode="bilinear", align_corners=False)
        if orig_hw is not None:
            (rx, ry), (left, top) = ratio_pad
            top, left = int(round(top)), int(round(left))
            uh, uw = max(1, round(h * ry)), max(1, round(w * rx))
            logits = F.interpolate(logits[..., top:top + uh, left:left + uw], size=(h, w), mode="bilinear",
                                   align_corners=False)
        out[s:s + CHUNK] = crop_to_boxes(logits[:, 0] > 0, boxes[s:s + CHUNK].to(proto.device).float())
    return out
