"""Box ops against torchvision, YOLOv5 decoding against its definition, NMS against per-class nms."""

from __future__ import annotations

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
