"""Box ops against torchvision, YOLOv5 decoding against its definition, NMS against per-class nms, masks
from prototypes against torch's own whole-image upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from vistrain.ops.boxes import decode_yolov5, non_max_suppression, xywh2xyxy, xyxy2xywh


def test_box_formats_match_torchvision():
    torch.manual_seed(0)
    b = torch.rand(50, 4) * 100
    assert torch.allclose(xywh2xyxy(b), torchvision.ops.box_convert(b, "cxcywh", "xyxy"))
    assert torch.allclose(xyxy2xywh(xywh2xyxy(b)), b, atol=1e-4)


def test_decode_yolov5_cell_and_anchor():
    nc, na = 2, 3
    p = torch.zeros(1, na, 4, 4, 5 + nc)  # sigmoid(0) = 0.5: centre at cell + 0.5, size = anchor
    anchors = torch.tensor([[[1.0, 2.0], [2.0, 1.0], [3.0, 3.0]]])
    out = decode_yolov5([p], anchors, torch.tensor([8.0]))
    assert out.shape == (1, na * 16, 5 + nc)
    first = out[0, 0]
    assert torch.allclose(first[:4], torch.tensor([4.0, 4.0, 8.0, 16.0]))  # cell (0,0): centre 0.5*8
    cell_x1_y2 = out[0, 2 * 4 + 1]  # anchor 0, row 2, column 1
    assert torch.allclose(cell_x1_y2[:2], torch.tensor([12.0, 20.0]))
    assert torch.allclose(first[4:], torch.full((1 + nc,), 0.5))  # objectness and class probabilities


def test_nms_equals_per_class_torchvision_nms():
    torch.manual_seed(1)
    n, nc = 200, 3
    xy = torch.rand(n, 2) * 200
    wh = torch.rand(n, 2) * 60 + 5
    obj = torch.rand(n, 1)
    cls = torch.rand(n, nc)
    decoded = torch.cat((xy, wh, obj, cls), 1)[None]
    out = non_max_suppression(decoded, conf=0.1, iou=0.5)[0]
    score, label = (cls * obj).max(1)
    keep = score > 0.1
    boxes = xywh2xyxy(decoded[0, keep, :4])
    expected = []
    for c in range(nc):
        m = label[keep] == c
        idx = torchvision.ops.nms(boxes[m], score[keep][m], 0.5)
        expected += [(tuple(boxes[m][i].tolist()), float(score[keep][m][i]), c) for i in idx]
    got = [(tuple(r[:4].tolist()), float(r[4]), int(r[5])) for r in out]
    assert sorted(got, key=lambda t: -t[1]) == sorted(expected, key=lambda t: -t[1])
    agnostic = non_max_suppression(decoded, conf=0.1, iou=0.5, agnostic=True)[0]
    assert len(agnostic) <= len(out)
    assert len(non_max_suppression(decoded, conf=0.1, iou=0.5, max_det=5)[0]) == 5
    only = non_max_suppression(decoded, conf=0.1, iou=0.5, classes=[1])[0]
    assert set(only[:, 5].int().tolist()) == {1}


def _masks_by_whole_image_upsampling(coef, proto, boxes, input_hw, ratio_pad=None, orig_hw=None):
    """The definition in masks_from_protos' docstring, spelled out with F.interpolate on whole images."""
    import torch.nn.functional as F

    nm, hp, wp = proto.shape
    logits = F.interpolate((coef @ proto.view(nm, -1)).view(-1, 1, hp, wp), size=input_hw, mode="bilinear",
                           align_corners=False)
    if orig_hw is not None:
        (rx, ry), (left, top) = ratio_pad
        top, left = int(round(top)), int(round(left))
        h, w = orig_hw
        logits = logits[..., top:top + max(1, round(h * ry)), left:left + max(1, round(w * rx))]
        logits = F.interpolate(logits, size=orig_hw, mode="bilinear", align_corners=False)
    h, w = logits.shape[-2:]
    cols, rows = torch.arange(w).view(1, 1, w).float(), torch.arange(h).view(1, h, 1).float()
    x1, y1, x2, y2 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (logits[:, 0] > 0) & (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)


@pytest.mark.parametrize("pixel_cost", [None, 0.0, float("inf")], ids=["chosen", "whole-images", "boxes"])
@pytest.mark.parametrize("orig_hw", [None, (200, 333), (333, 200), (97, 61), (320, 320), (640, 480)])
def test_masks_from_protos_equal_whole_image_upsampling(orig_hw, pixel_cost, monkeypatch):
    """Only the pixels inside each box are computed (separable weights), or whole images where that is
    cheaper; either way the masks are those of upsampling the whole image twice and cropping, boxes partly
    or wholly outside the image and empty ones included."""
    from vistrain.data.augment import letterbox
    from vistrain.ops import masks
    from vistrain.ops.masks import box_pixels, masks_from_protos

    if pixel_cost is not None:
        monkeypatch.setattr(masks, "PIXEL_COST", pixel_cost)

    g = torch.Generator().manual_seed(5 if orig_hw is None else sum(orig_hw))
    input_hw = (320, 256) if orig_hw is None else (320, 320)
    proto = torch.randn(32, input_hw[0] // 4, input_hw[1] // 4, generator=g)
    coef = torch.randn(60, 32, generator=g) * 0.3
    h, w = orig_hw or input_hw
    xy = torch.rand(60, 2, generator=g) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([w * 0.1, h * 0.1])
    wh = torch.rand(60, 2, generator=g) * torch.tensor([w, h]) * 0.7
    boxes = torch.cat((xy, xy + wh), 1)
    boxes[0] = torch.tensor([3.0, 3.0, 3.0, 9.0])  # zero width
    boxes[1] = torch.tensor([-50.0, -50.0, 2 * w, 2 * h])  # beyond the image on every side
    ratio_pad = None
    if orig_hw is not None:
        ratio_pad = letterbox(np.zeros((*orig_hw, 3), np.uint8), input_hw)[1:]  # ((rx, ry), (left, top))
    got = masks_from_protos(coef, proto, boxes, input_hw, ratio_pad, orig_hw)
    ref = _masks_by_whole_image_upsampling(coef, proto, boxes, input_hw, ratio_pad, orig_hw)
    assert got.dtype == torch.bool and got.shape == ref.shape == (60, h, w)
    assert not got[0].any() and got[1].any()
    # summing in another order can flip a pixel whose logit is within float rounding of 0: none of 60 masks'
    # ~ 4 million pixels here; on a real validation set 1 of 206 million mask pixels
    assert int((got != ref).sum()) <= 2, int((got != ref).sum())
    assert ref.sum() > 10000
    # box_pixels bounds every mask (what validation relies on to skip masks that cannot meet a ground truth)
    px = box_pixels(boxes, h, w)
    for k in range(len(boxes)):
        c0, r0, c1, r1 = px[k].tolist()
        outside = ref[k].clone()
        outside[max(r0, 0):max(r1, r0), max(c0, 0):max(c1, c0)] = False
        assert not outside.any()
    only = torch.rand(60, generator=g) < 0.5
    some = masks_from_protos(coef, proto, boxes, input_hw, ratio_pad, orig_hw, only=only)
    assert torch.equal(some[only], got[only]) and not some[~only].any()


def test_batched_nms_keeps_groups_apart_with_negative_coordinates():
    """Boxes reaching past the image (x1 < 0): torchvision's coordinate trick shifts groups by max + 1, which let
    a class-1 box [-120, -120, 10, 10] (shifted to [511, 511, 641, 641]) on a class-0 box [500, 500, 630, 630]
    (IoU 0.71) and suppress it."""
    import torchvision

    from vistrain.ops.boxes import batched_nms

    boxes = torch.tensor([[500.0, 500, 630, 630], [-120.0, -120, 10, 10], [0.0, 0, 630, 630]])
    scores = torch.tensor([0.8, 0.9, 0.1])
    groups = torch.tensor([0, 1, 2])
    assert sorted(batched_nms(boxes, scores, groups, 0.5).tolist()) == [0, 1, 2]  # one box per class: all kept
    assert len(torchvision.ops.batched_nms(boxes, scores, groups, 0.5)) < 3  # what the shift by max + 1 did
    same = torch.tensor([0, 0, 0])
    assert batched_nms(boxes, scores, same, 0.5).tolist() == torchvision.ops.nms(boxes, scores, 0.5).tolist()
