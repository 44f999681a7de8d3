"""YOLOv8 losses: DFL, the task-aligned assigner (against a brute-force version), and the detect and
segment losses against ultralytics' v8DetectionLoss / v8SegmentationLoss on the same predictions."""

from __future__ import annotations

import itertools
import math
import types

import pytest
import torch
import torch.nn.functional as F

import vistrain
from vistrain.losses.iou import ciou_xyxy
from vistrain.losses.tal import TaskAlignedAssigner
from vistrain.losses.yolov8 import DetectLoss, SegmentLoss, dfl_loss, pad_targets
from vistrain.ops.masks import crop_to_boxes


def test_dfl_loss_is_interpolated_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 16, generator=g)
    target = torch.rand(5, 4, generator=g) * 15
    target[0, 0], target[1, 1] = 0.0, 20.0  # clipped to 0 and 14.99
    got = dfl_loss(logits, target)
    t = target.clamp(0, 14.99)
    lo = t.floor()
    ce = lambda k: F.cross_entropy(logits.reshape(-1, 16), k.long().reshape(-1), reduction="none").view(5, 4)  # noqa: E731
    ref = (ce(lo) * (lo + 1 - t) + ce(lo + 1) * (t - lo)).mean(1)
    torch.testing.assert_close(got, ref)


def test_pad_targets_slots_in_row_order():
    t = torch.tensor([[1, 2, .5, .5, .2, .2], [0, 1, .1, .1, .1, .1], [1, 0, .3, .3, .1, .1], [3, 4, .9, .9, .1, .1]])
    cls, boxes, valid = pad_targets(t, 4)
    assert cls.shape == (4, 2) and valid.tolist() == [[True, False], [True, True], [False, False], [True, False]]
    assert cls[1].tolist() == [2, 0] and cls[0, 0] == 1 and cls[3, 0] == 4
    assert torch.equal(boxes[1, 1], t[2, 2:])
    cls, boxes, valid = pad_targets(torch.zeros(0, 6), 2)
    assert cls.shape == (2, 0) and boxes.shape == (2, 0, 4)


def brute_force_assign(scores, boxes, points, gt_cls, gt_boxes, gt_valid, topk, alpha, beta, min_side, eps=1e-9):
    """The task-aligned assignment written out with loops over images, ground truths and anchor points.

    A ground truth's positives are its candidates among its ``topk`` highest metrics; candidates of metric 0
    are left out here (which of them ultralytics' torch.topk call takes among the tied zeros is its
    tie-break's business: ``test_assigner_equals_ultralytics_on_ties`` checks that case against ultralytics)."""
    b, n, c = scores.shape
    m = gt_boxes.shape[1]
    fg = torch.zeros(b, n, dtype=torch.bool)
    gt_index = torch.zeros(b, n, dtype=torch.long)
    target_scores = torch.zeros(b, n, c)
    for i in range(b):
        metric = [[0.0] * n for _ in range(m)]
        overlap = [[0.0] * n for _ in range(m)]
        cand = [[False] * n for _ in range(m)]
        pos = [[False] * n for _ in range(m)]
        for g in range(m):
            if not gt_valid[i, g]:
                continue
            x1, y1, x2, y2 = gt_boxes[i, g].tolist()
            cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, max((x2 - x1) / 2, min_side / 2), max((y2 - y1) / 2, min_side / 2)
            for a in range(n):
                px, py = points[a].tolist()
                if min(px - (cx - hw), py - (cy - hh), (cx + hw) - px, (cy + hh) - py) > eps:
                    cand[g][a] = True
                    u = max(float(ciou_xyxy(boxes[i, a][None], gt_boxes[i, g][None])), 0.0)
                    s = float(scores[i, a, int(gt_cls[i, g])])
                    overlap[g][a], metric[g][a] = u, s ** alpha * u ** beta
            ranked = sorted((a for a in range(n) if cand[g][a] and metric[g][a] > 0), key=lambda a: -metric[g][a])
            for a in ranked[:topk]:
                pos[g][a] = True
        for a in range(n):
            claims = [g for g in range(m) if pos[g][a]]
            if len(claims) > 1:  # keep the ground truth with the highest overlap (over all of them)
                best = max(range(m), key=lambda g: (overlap[g][a], -g))
                for g in range(m):
                    pos[g][a] = g == best
        for g in range(m):
            mets = [metric[g][a] for a in range(n) if pos[g][a]]
            ovs = [overlap[g][a] for a in range(n) if pos[g][a]]
            for a in range(n):
                if pos[g][a]:
                    fg[i, a] = True
                    gt_index[i, a] = g
                    target_scores[i, a, int(gt_cls[i, g])] = metric[g][a] * max(ovs) / (max(mets) + eps)
    return fg, gt_index, target_scores


@pytest.mark.parametrize("seed,min_side", [(0, 0.0), (1, 0.0), (2, 16.0), (3, 16.0), (4, 0.0)])
def test_assigner_equals_brute_force(seed, min_side):
    g = torch.Generator().manual_seed(seed)
    b, c, m = 2, 3, 4
    # a 6 x 6 grid of stride 8 (48 px) and a 3 x 3 grid of stride 16
    pts = [(x * 8 + 4, y * 8 + 4) for y, x in itertools.product(range(6), range(6))]
    pts += [(x * 16 + 8, y * 16 + 8) for y, x in itertools.product(range(3), range(3))]
    points = torch.tensor(pts, dtype=torch.float32)
    n = len(points)
    centre = points[None] + torch.randn(b, n, 2, generator=g) * 4
    half = torch.rand(b, n, 2, generator=g) * 14 + 2
    boxes = torch.cat((centre - half, centre + half), -1)
    scores = torch.rand(b, n, c, generator=g)
    gxy = torch.rand(b, m, 2, generator=g) * 36 + 6
    gwh = torch.rand(b, m, 2, generator=g) * 26 + 4  # several tiny ones (< 16) and overlapping ones
    gt_boxes = torch.cat((gxy - gwh / 2, gxy + gwh / 2), -1)
    gt_cls = torch.randint(0, c, (b, m), generator=g)
    gt_valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assigner = TaskAlignedAssigner(c, topk=5, alpha=0.5, beta=6.0, min_side=min_side)
    a = assigner(scores, boxes, points, gt_cls, gt_boxes, gt_valid)
    fg, gt_index, target_scores = brute_force_assign(scores, boxes, points, gt_cls, gt_boxes, gt_valid,
                                                     5, 0.5, 6.0, min_side)
    assert a.fg.sum() > 8  # the case is not trivial
    # every brute-force positive is one; beyond them only metric-0 candidates that torch.topk's tie-break
    # took (no box or class weight: their soft class target is 0)
    assert not (fg & ~a.fg).any()
    assert not a.scores[a.fg & ~fg].any()
    assert torch.equal(a.gt_index[fg], gt_index[fg])
    torch.testing.assert_close(a.scores, target_scores, rtol=1e-5, atol=1e-7)
    assert torch.equal(a.boxes[fg], gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))[fg])
    assert not a.scores[~a.fg].any()


def test_assigner_equals_ultralytics_on_ties(ul_tal):
    """Early in training many candidates have metric 0 (their predicted box's CIoU with the ground truth is
    clamped at 0), so a small object has fewer than topk candidates above 0; which metric-0 candidates then
    fill its top k is torch.topk's tie-break, and an anchor point claimed by two ground truths that it overlaps
    by 0 goes to the first ground truth.  Both must be ultralytics' choices: such positives carry no box or
    class weight but count fully in the mask loss (and in its normaliser)."""
    g = torch.Generator().manual_seed(0)
    b, c, m, imgsz = 4, 3, 6, 96
    strides = (8, 16, 32)
    pts = [((x + 0.5) * s, (y + 0.5) * s) for s in strides for y in range(imgsz // s) for x in range(imgsz // s)]
    points = torch.tensor(pts)
    n = len(points)
    centre = points[None] + torch.randn(b, n, 2, generator=g) * 12  # many predictions miss: CIoU <= 0
    half = torch.rand(b, n, 2, generator=g) * 10 + 1
    boxes = torch.cat((centre - half, centre + half), -1)
    scores = torch.rand(b, n, c, generator=g) * 0.1
    gxy = torch.rand(b, m, 2, generator=g) * 70 + 13
    gwh = torch.rand(b, m, 2, generator=g) * 30 + 4  # small objects: few candidates each, some overlapping
    gt_boxes = torch.cat((gxy - gwh / 2, gxy + gwh / 2), -1)
    gt_cls = torch.randint(0, c, (b, m), generator=g)
    gt_valid = torch.arange(m)[None] < torch.tensor([[6], [4], [2], [5]])
    gt_boxes = gt_boxes * gt_valid[..., None]  # padded slots are zeros, as in a batch
    ours = TaskAlignedAssigner(c, topk=10, alpha=0.5, beta=6.0, min_side=16.0)(
        scores, boxes, points, gt_cls, gt_boxes, gt_valid)
    theirs = ul_tal(topk=10, num_classes=c, alpha=0.5, beta=6.0, stride=list(strides))
    _, t_boxes, t_scores, t_fg, t_idx = theirs(scores, boxes, points, gt_cls[..., None], gt_boxes,
                                                gt_valid[..., None].float())
    # the case has what it is for: metric-0 candidates inside small ground truths
    u = ciou_xyxy(boxes[:, None].expand(b, m, n, 4).reshape(-1, 4), gt_boxes[:, :, None].expand(b, m, n, 4).reshape(-1, 4))
    u = u.clamp(min=0).view(b, m, n)
    assert int(((u == 0) & gt_valid[..., None]).sum()) > 100
    assert torch.equal(ours.fg, t_fg)
    assert torch.equal(ours.gt_index[ours.fg], t_idx[t_fg])
    assert torch.equal(ours.boxes[ours.fg], t_boxes[t_fg])
    torch.testing.assert_close(ours.scores, t_scores, rtol=1e-5, atol=1e-7)
    assert int(ours.fg.sum()) > 20 and bool((ours.scores.sum(-1)[ours.fg] == 0).any())  # weightless positives


def test_assigner_without_ground_truth():
    assigner = TaskAlignedAssigner(2)
    a = assigner(torch.rand(1, 5, 2), torch.rand(1, 5, 4), torch.rand(5, 2), torch.zeros(1, 0), torch.zeros(1, 0, 4),
                 torch.zeros(1, 0, dtype=torch.bool))
    assert not a.fg.any() and a.scores.shape == (1, 5, 2)


def test_crop_to_boxes():
    masks = torch.ones(2, 4, 6)
    out = crop_to_boxes(masks, torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 6.0, 4.0]]))
    assert out[0].sum() == 4 and out[0, 0, 1] == 1 and out[0, 0, 3] == 0 and out[0, 2, 1] == 0
    assert out[1].sum() == 24


# ------------------------------------------------------------------------------ against ultralytics
def _batch(seed: int, b: int = 2, imgsz: int = 128, tiny: bool = False):
    """Targets of moderate size (so each has anchor points of positive alignment), or tiny ones (sides
    of 6-15 px at 128: widened to the middle stride when choosing candidates), and their masks."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for i in range(b):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cx, cy = (torch.rand(2, generator=g) * 0.5 + 0.25).tolist()
            w, h = (torch.rand(2, generator=g) * (0.07 if tiny else 0.3) + (0.05 if tiny else 0.2)).tolist()
            rows.append([i, int(torch.randint(0, 3, (1,), generator=g)), cx, cy, w, h])
    t = torch.tensor(rows, dtype=torch.float32)
    # masks at the prototype resolution (imgsz / 4): an ellipse inside each box, one mask per row
    s = imgsz // 4
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    for _, _, cx, cy, w, h in rows:
        masks.append((((xx / s - cx) / (w / 2)) ** 2 + ((yy / s - cy) / (h / 2)) ** 2 <= 1).float())
    return t, torch.stack(masks)


def _overlap_masks(t: torch.Tensor, masks: torch.Tensor, b: int) -> torch.Tensor:
    """Per image one map of instance numbers (1 + the row's index within its image); later rows on top."""
    out = torch.zeros(b, *masks.shape[1:])
    counter = [0] * b
    for row, mask in zip(t, masks):
        i = int(row[0])
        counter[i] += 1
        out[i][mask > 0] = counter[i]
    return out


def _assert_same_gradients(ours, theirs, total, ref_total):
    """Equal loss values are not enough: a target left attached to the graph (or a detached prediction)
    keeps the value and changes the update.  Every parameter's gradient must equal ultralytics'."""
    total.backward()
    ref_total.sum().backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters()}
    checked = 0
    for n, p in ours.named_parameters():
        if p.grad is None:
            assert theirs_grads[n] is None or not theirs_grads[n].any(), n
            continue
        torch.testing.assert_close(p.grad, theirs_grads[n], rtol=1e-3, atol=1e-3 * float(p.grad.abs().max()) + 1e-7,
                                   msg=lambda m, n=n: f"{n}: {m}")
        checked += 1
    assert checked > 100


@pytest.fixture(scope="module")
def ul_tal(ultralytics_home):
    from ultralytics.utils.tal import TaskAlignedAssigner as UltralyticsAssigner

    return UltralyticsAssigner


@pytest.fixture(scope="module")
def ul(ultralytics_home):
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel
    from ultralytics.utils.loss import v8DetectionLoss, v8SegmentationLoss

    return types.SimpleNamespace(DetectionModel=DetectionModel, SegmentationModel=SegmentationModel,
                                 DetectLoss=v8DetectionLoss, SegmentLoss=v8SegmentationLoss)


@pytest.mark.parametrize("seed,tiny", [(0, False), (1, False), (2, True)])
def test_detect_loss_equals_ultralytics(ul, seed, tiny):
    torch.manual_seed(seed)
    theirs = ul.DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    theirs.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    ours = vistrain.build_model("yolov8n", num_classes=3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(2, 3, 128, 128)
    t, _ = _batch(seed, tiny=tiny)
    ref_total, ref_items = ul.DetectLoss(theirs)(theirs.train()(x),
                                                {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:]})
    total, items = DetectLoss.from_model(ours)(ours.train()(x), t)
    ref_items = torch.stack(list(ref_items.values())) if isinstance(ref_items, dict) else ref_items
    torch.testing.assert_close(items, ref_items.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(total, ref_total.sum(), rtol=1e-4, atol=1e-5)
    _assert_same_gradients(ours, theirs, total, ref_total)


@pytest.mark.parametrize("overlap", [True, False])
def test_segment_loss_equals_ultralytics(ul, overlap):
    torch.manual_seed(2)
    theirs = ul.SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False)
    theirs.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, overlap_mask=overlap)
    ours = vistrain.build_model("yolov8n-seg", num_classes=3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(2, 3, 128, 128)
    t, masks = _batch(5)
    masks = _overlap_masks(t, masks, 2) if overlap else masks
    batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:], "masks": masks}
    ref_total, ref_items = ul.SegmentLoss(theirs)(theirs.train()(x), batch)
    ref_items = torch.stack(list(ref_items.values()))[:4]  # box, seg, cls, dfl (then their semantic loss, 0)
    total, items = SegmentLoss.from_model(ours, {"overlap_mask": overlap})(ours.train()(x), t, masks)
    assert items[1] > 0
    torch.testing.assert_close(items, ref_items.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(total, ref_total.sum(), rtol=1e-4, atol=1e-5)
    _assert_same_gradients(ours, theirs, total, ref_total)


def test_losses_fall_when_overfitting_a_small_batch():
    """8 images, 40 Adam steps: the detect terms and the mask loss stay finite and fall."""
    torch.manual_seed(0)
    model = vistrain.build_model("yolov8n-seg", num_classes=3).train()
    x = torch.rand(8, 3, 64, 64)
    t, masks = _batch(7, b=8, imgsz=64)
    masks = _overlap_masks(t, masks, 8)
    loss_fn = SegmentLoss.from_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(40):
        total, items = loss_fn(model(x), t, masks)
        opt.zero_grad()
        total.backward()
        opt.step()
        assert torch.isfinite(items).all()
        history.append(items)
    first, last = history[0], torch.stack(history[-5:]).mean(0)
    assert (last < first).all(), (first, last)
    assert last[1] < 0.7 * first[1]  # the mask loss
    assert math.isfinite(float(total.detach()))
