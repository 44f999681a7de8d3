"""EfficientDet anchors, box coding, loss and post-processing against effdet (the oracle) and a brute-force
RetinaNet ("tutorial") reference.  Tiny inputs (128 px), CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

effdet = pytest.importorskip("effdet")

from effdet.anchors import AnchorLabeler, Anchors, decode_box_outputs  # noqa: E402
from effdet.bench import _batch_detection, _post_process  # noqa: E402
from effdet.loss import DetectionLoss  # noqa: E402
from effdet.object_detection import BoxList, FasterRcnnBoxCoder  # noqa: E402
from effdet.soft_nms import soft_nms as effdet_soft_nms  # noqa: E402

from vistrain.losses.effdet import EffDetLoss, match_anchors  # noqa: E402
from vistrain.ops.boxes import xywh2xyxy  # noqa: E402
from vistrain.ops.retina import (batched_soft_nms, box_iou, decode_boxes, encode_boxes, feature_sizes,  # noqa: E402
                                 make_anchors, postprocess)

NC = 3
YXYX = [1, 0, 3, 2]  # xyxy <-> yxyx


def _config(name: str = "tf_efficientdet_d0", size=(128, 128), nc: int = NC, **kw):
    cfg = effdet.get_efficientdet_config(name)
    cfg.image_size, cfg.num_classes = size, nc
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _anchor_kw(cfg) -> dict:
    return {"min_level": cfg.min_level, "max_level": cfg.max_level, "num_scales": cfg.num_scales,
            "aspect_ratios": cfg.aspect_ratios, "anchor_scale": cfg.anchor_scale}


def _targets() -> torch.Tensor:
    """Image 0: three objects (one tiny: force-matched only); image 1: one large object; image 2: none."""
    return torch.tensor([[0, 0, 0.30, 0.40, 0.20, 0.30], [0, 2, 0.60, 0.50, 0.50, 0.60],
                         [0, 1, 0.31, 0.41, 0.05, 0.04], [1, 1, 0.50, 0.50, 0.90, 0.90]])


def _effdet_target(targets: torch.Tensor, b: int, size) -> dict:
    """vistrain targets -> effdet's: yxyx pixels (the loss's own conversion), 1-based classes, -1 padding."""
    h, w = size
    m = max([int((targets[:, 0] == i).sum()) for i in range(b)] + [1])
    bbox, cls = torch.zeros(b, m, 4), -torch.ones(b, m)
    xyxy = xywh2xyxy(targets[:, 2:6]) * torch.tensor([w, h, w, h], dtype=torch.float32)
    for i in range(b):
        sel = targets[:, 0] == i
        bbox[i, :int(sel.sum())] = xyxy[sel][:, YXYX]
        cls[i, :int(sel.sum())] = targets[sel, 1] + 1
    return {"bbox": bbox, "cls": cls}


def _random_outputs(b: int, size, nc: int = NC, a: int = 9, seed: int = 0, grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    levels = feature_sizes(size, 7)[3:]
    cls = [(torch.randn(b, a * nc, h, w, generator=gen) * 2 - 3) for h, w in levels]
    box = [torch.randn(b, a * 4, h, w, generator=gen) * 0.3 for h, w in levels]
    if grad:
        for t in cls + box:
            t.requires_grad_()
    return cls, box


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 0.0) -> float:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    return (a - b).abs().max().item() if a.numel() else 0.0


# --- anchors and box coding ---------------------------------------------------------------------
@pytest.mark.parametrize("name,size,kw", [
    ("tf_efficientdet_d0", (128, 128), {}),
    ("tf_efficientdet_d0", (128, 96), {}),  # rectangular
    ("tf_efficientdet_d0", (100, 75), {}),  # not a multiple of the strides: fractional strides
    ("tf_efficientdet_d7x", (256, 256), {}),  # P3-P8
    ("tf_efficientdet_d0", (128, 128), {"aspect_ratios": [1.0, 2.0, 0.5], "anchor_scale": [4.0, 4.0, 3.0, 3.0, 5.0]}),
])
def test_anchors_equal_effdet(name, size, kw):
    cfg = _config(name, size, **kw)
    ref = Anchors.from_config(cfg).boxes
    ours = make_anchors(size, **_anchor_kw(cfg))
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.equal(ours[:, YXYX], ref)


def test_box_coding_equals_effdet():
    gen = torch.Generator().manual_seed(0)
    anchors = make_anchors((128, 96))
    xy = torch.rand(len(anchors), 2, generator=gen) * 100
    boxes = torch.cat((xy, xy + torch.rand(len(anchors), 2, generator=gen) * 60 + 1), 1)
    ref = FasterRcnnBoxCoder().encode(BoxList(boxes[:, YXYX].contiguous()), BoxList(anchors[:, YXYX].contiguous()))
    codes = encode_boxes(boxes, anchors)
    # torch's log may differ by 1 ulp between its vectorised body and scalar tail: positions differ here
    print("encode max abs diff", _close(codes, ref, rtol=1e-6, atol=1e-6))
    rel = torch.randn(len(anchors), 4, generator=gen) * 0.5
    assert torch.equal(decode_boxes(rel, anchors), decode_box_outputs(rel, anchors[:, YXYX], output_xyxy=True))
    _close(decode_boxes(codes, anchors), boxes, rtol=0, atol=1e-3)


def test_matching_equals_effdet_labeler():
    """Tricky cases: identical boxes of two classes (first object wins), a box smaller than any anchor
    (force-matched only), a box reaching past the image, an image without objects."""
    size = (128, 128)
    cfg = _config(size=size)
    labeler = AnchorLabeler(Anchors.from_config(cfg), NC, match_threshold=0.5)
    targets = torch.cat((_targets(), torch.tensor([[1, 0, 0.5, 0.5, 0.9, 0.9], [1, 2, 0.95, 0.1, 0.3, 0.25],
                                                   [1, 1, 0.7, 0.7, 0.01, 0.01]])))
    b = 3
    ref = _effdet_target(targets, b, size)
    ref_cls, ref_box, ref_npos = labeler.batch_label_anchors(ref["bbox"], ref["cls"])
    ref_cls = torch.cat([c.reshape(b, -1) for c in ref_cls], 1)  # 0-based class or -1, anchor order
    ref_box = torch.cat([t.reshape(b, -1, 4) for t in ref_box], 1)

    from vistrain.losses.yolov8 import pad_targets

    anchors = make_anchors(size)
    gt_cls, gt_xywh, valid = pad_targets(targets, b)
    gt = xywh2xyxy(gt_xywh) * 128.0
    match = match_anchors(anchors, gt, valid)
    pos = match >= 0
    cls = torch.where(pos, gt_cls.gather(1, match.clamp(min=0)).long(), -1)
    assert torch.equal(cls, ref_cls)
    assert torch.equal(pos.sum(1).float(), ref_npos)
    assert ref_npos[2] == 0 and (match[2] == -1).all()
    box = torch.zeros_like(ref_box)
    bi, ni = pos.nonzero(as_tuple=True)
    box[bi, ni] = encode_boxes(gt[bi, match[bi, ni]], anchors[ni])
    print("box target max abs diff", _close(box, ref_box, rtol=1e-6, atol=1e-6))
    # an empty box overlaps no anchor: it claims none (effdet would force anchor 0 onto it)
    empty = match_anchors(anchors, torch.tensor([[[10.0, 20.0, 10.0, 30.0]]]), torch.ones(1, 1, dtype=torch.bool))
    assert (empty == -1).all()


# --- loss ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def d0():
    cfg = _config()
    torch.manual_seed(0)
    model = effdet.EfficientDet(cfg, pretrained_backbone=False)
    return cfg, model


def test_loss_and_gradients_equal_effdet_bench(d0):
    """effdet's DetBenchTrain (labeler + loss) and ours on the same raw outputs (captured from the bench's own
    forward, model in eval mode so BatchNorm statistics stay put): value, items, every parameter's gradient."""
    cfg, model = d0
    bench = effdet.DetBenchTrain(model, create_labeler=True).train()  # train: no detections (no img_info)
    model.eval()
    captured = []
    hook = model.register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    targets = _targets()
    try:
        ref = bench(x, _effdet_target(targets, 2, (128, 128)))
    finally:
        hook.remove()
    params = [p for p in model.parameters()]
    ref_grads = torch.autograd.grad(ref["loss"], params, retain_graph=True)

    loss_fn = EffDetLoss(NC, **_anchor_kw(cfg))  # input size from the predictions
    loss, items = loss_fn(captured[0], targets)
    assert EffDetLoss.names == ("box_loss", "cls_loss") and items.shape == (2,) and not items.requires_grad
    grads = torch.autograd.grad(loss / 2, params)  # loss is the total times the batch size, as every vistrain loss
    print("loss", ref["loss"].item(), "abs diff", _close(loss.detach() / 2, ref["loss"].detach()),
          "cls", _close(items[1], ref["class_loss"].detach()), "box", _close(items[0], 50 * ref["box_loss"].detach()))
    _close(items.sum(), ref["loss"].detach())
    gmax = max(g.abs().max().item() for g in ref_grads)
    worst = max(_close(g, r, rtol=1e-4, atol=1e-6 * gmax) for g, r in zip(grads, ref_grads))
    print(f"{len(params)} parameter gradients: max abs diff {worst:.3g} (largest gradient {gmax:.3g})")


@pytest.mark.parametrize("size", [(128, 128), (128, 96)])
def test_loss_on_raw_outputs_equals_effdet(size):
    """Random raw outputs, 3 images (the last without objects), square and rectangular input: value and the
    gradients w.r.t. every output tensor."""
    cfg = _config(size=size)
    labeler, ref_loss = AnchorLabeler(Anchors.from_config(cfg), NC, 0.5), DetectionLoss(cfg)
    targets = _targets()
    tgt = _effdet_target(targets, 3, size)
    cls, box = _random_outputs(3, size, grad=True)
    total, cls_loss, box_loss = ref_loss(cls, box, *labeler.batch_label_anchors(tgt["bbox"], tgt["cls"]))
    ref_grads = torch.autograd.grad(total, cls + box)
    loss, items = EffDetLoss(NC, **_anchor_kw(cfg))((cls, box), targets)
    grads = torch.autograd.grad(loss / 3, cls + box)
    print(size, "loss abs diff", _close(loss.detach() / 3, total.detach()),
          "cls", _close(items[1], cls_loss.detach()), "box", _close(items[0], 50 * box_loss.detach()))
    gmax = max(g.abs().max().item() for g in ref_grads)
    print("output gradients max abs diff", max(_close(g, r, atol=1e-6 * gmax) for g, r in zip(grads, ref_grads)))


def test_loss_without_objects():
    size = (128, 128)
    cfg = _config(size=size)
    cls, box = _random_outputs(2, size, grad=True)
    loss, items = EffDetLoss(NC)((cls, box), torch.zeros(0, 6))
    assert torch.isfinite(loss) and items[0] == 0 and items[1] > 0
    loss.backward()
    assert all(t.grad is not None for t in cls) and all(t.grad is None or not t.grad.any() for t in box)
    # effdet, its targets all padding: the same value
    tgt = {"bbox": torch.zeros(2, 1, 4), "cls": -torch.ones(2, 1)}
    labeler = AnchorLabeler(Anchors.from_config(cfg), NC, 0.5)
    ref = DetectionLoss(cfg)(cls, box, *labeler.batch_label_anchors(tgt["bbox"], tgt["cls"]))[0]
    _close(loss.detach() / 2, ref.detach())


def test_input_size_from_predictions():
    cls, box = _random_outputs(2, (128, 96))
    t = _targets()
    a = EffDetLoss(NC)((cls, box), t)[0]
    b = EffDetLoss(NC, (256, 256))((cls, box), t)[0]  # the configured size does not fit: P3 x 8 is used
    c = EffDetLoss(NC, (128, 96))((cls, box), t)[0]
    assert a == b == c
    cls, box = _random_outputs(2, (100, 75))  # fractional strides: only the configured size is exact
    loss_fn = EffDetLoss(NC, (100, 75))
    loss_fn((cls, box), t)
    assert list(loss_fn._anchors)[0][0] == (100, 75)
    with pytest.raises(ValueError, match="levels"):
        EffDetLoss(NC, max_level=6)((cls, box), t)
    with pytest.raises(ValueError, match="classes"):
        EffDetLoss(2)(_random_outputs(2, (128, 128), nc=2), t)  # class 2 of 2


def _tutorial_reference(cls_outs, box_outs, targets, size) -> tuple[float, float]:
    """RetinaNet as the tutorial preset defines it, anchor by anchor in Python: IoU >= 0.5 positive, < 0.4
    negative, between ignored; each object also takes its best anchor (the first of equals; the first object
    wins a shared anchor); focal alpha 0.25 gamma 2; smooth-L1 (beta 1/9) summed over the positives' 4 codes;
    both / (positives + 1).  IoUs in float32 (np.float32 scalars), so that exact ties among anchors that
    contain a small box fall as in float32; everything else in float64."""
    h, w = size
    anchors = [[np.float32(v) for v in a] for a in make_anchors(size).tolist()]
    b = cls_outs[0].shape[0]
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(b, -1, NC) for c in cls_outs], 1).tolist()
    codes = torch.cat([c.permute(0, 2, 3, 1).reshape(b, -1, 4) for c in box_outs], 1).tolist()
    pixels = (xywh2xyxy(targets[:, 2:6]) * torch.tensor([w, h, w, h], dtype=torch.float32)).tolist()

    def iou(p, q):
        iw = max(np.float32(0), min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(np.float32(0), min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        return 0.0 if inter == 0 else float(inter / union)

    cls_sum = box_sum = 0.0
    npos = 0
    for i in range(b):
        objs = [(int(row[1]), [np.float32(v) for v in px])
                for row, px in zip(targets.tolist(), pixels) if int(row[0]) == i]
        state = []  # per anchor: object index, -1 negative, -2 ignored
        ious = [[iou(o[1], a) for a in anchors] for o in objs]
        for n in range(len(anchors)):
            best, arg = -1.0, -1
            for m in range(len(objs)):
                if ious[m][n] > best:
                    best, arg = ious[m][n], m
            state.append(arg if best >= 0.5 else -1 if best < 0.4 else -2)
        for m in reversed(range(len(objs))):  # reversed: the first object wins a shared anchor
            state[max(range(len(anchors)), key=lambda n: (ious[m][n], -n))] = m
        for n, s in enumerate(state):
            if s == -2:
                continue
            for c in range(NC):
                x = logits[i][n][c]
                t = s >= 0 and objs[s][0] == c
                p = 1 / (1 + math.exp(-x))
                pt = p if t else 1 - p
                cls_sum += (0.25 if t else 0.75) * (1 - pt) ** 2 * -math.log(pt)
            if s >= 0:
                npos += 1
                x1, y1, x2, y2 = map(float, objs[s][1])
                ax1, ay1, ax2, ay2 = map(float, anchors[n])
                ha, wa = ay2 - ay1, ax2 - ax1
                target = [((y1 + y2) / 2 - (ay1 + ay2) / 2) / ha, ((x1 + x2) / 2 - (ax1 + ax2) / 2) / wa,
                          math.log((y2 - y1) / ha), math.log((x2 - x1) / wa)]
                for d, tgt in zip(codes[i][n], target):
                    e = abs(d - tgt)
                    box_sum += 0.5 * e * e * 9 if e < 1 / 9 else e - 0.5 / 9
    return box_sum / (npos + 1), cls_sum / (npos + 1)


def test_tutorial_preset_equals_brute_force():
    size = (128, 128)
    cls, box = _random_outputs(2, size, seed=3)
    targets = _targets()
    loss, items = EffDetLoss(NC, preset="tutorial")((cls, box), targets)
    ref_box, ref_cls = _tutorial_reference(cls, box, targets, size)
    print("tutorial: box", items[0].item(), ref_box, "cls", items[1].item(), ref_cls)
    _close(items.double(), torch.tensor([ref_box, ref_cls], dtype=torch.float64))
    _close(loss / 2, items.sum())
    # the ignore band matters: effdet's thresholds give another class loss
    assert not torch.isclose(EffDetLoss(NC, preset="tutorial", unmatch_iou=0.5)((cls, box), targets)[1][1], items[1])


# --- post-processing -------------------------------------------------------------------------------
def _effdet_detections(cls, box, size, clip: bool = False):
    cfg = _config(size=size)
    anchors = Anchors.from_config(cfg).boxes
    c, bx, idx, classes = _post_process(cls, box, num_levels=5, num_classes=NC, max_detection_points=5000)
    b = cls[0].shape[0]
    scale = torch.ones(b) if clip else None
    img_size = torch.tensor([[size[1], size[0]]] * b, dtype=torch.float32) if clip else None  # effdet: (w, h)
    dets = _batch_detection(b, c, bx, anchors, idx, classes, scale, img_size, max_det_per_image=100)
    return [d[d[:, 5] > 0] - torch.tensor([0, 0, 0, 0, 0, 1.0]) for d in dets]  # drop padding; 0-based classes


@pytest.mark.parametrize("clip", [False, True])
def test_postprocess_equals_effdet(clip):
    size = (128, 96)
    cls, box = _random_outputs(2, size, seed=5)
    ref = _effdet_detections(cls, box, size, clip)
    ours = postprocess(cls, box, make_anchors(size), conf=0.0, image_size=size if clip else None)
    for o, r in zip(ours, ref):
        assert o.shape == r.shape and o.shape[0] > 0
        assert torch.equal(o, r)
    if clip:
        assert ours[0][:, :4].min() >= 0 and ours[0][:, [0, 2]].max() <= 96 and ours[0][:, [1, 3]].max() <= 128


def test_postprocess_options():
    size = (128, 128)
    cls, box = _random_outputs(2, size, seed=6)
    anchors = make_anchors(size)
    full = postprocess(cls, box, anchors, conf=0.0, max_det=10000)
    some = postprocess(cls, box, anchors, conf=0.1, classes=[0, 2], max_det=10000)
    for f, s in zip(full, some):
        assert (s[:, 4] >= 0.1).all() and set(s[:, 5].tolist()) <= {0.0, 2.0}
        expect = f[(f[:, 4] >= 0.1) & (f[:, 5] != 1)]
        assert torch.equal(s, expect)  # filtering before class-wise NMS keeps exactly those rows
    ag = postprocess(cls, box, anchors, conf=0.0, agnostic=True, max_det=50)[0]
    assert len(ag) == 50 and (ag[:-1, 4] >= ag[1:, 4]).all()
    overlap = box_iou(ag[:, :4], ag[:, :4]).triu(1)
    assert overlap.max() <= 0.5


def test_soft_nms():
    gen = torch.Generator().manual_seed(7)
    xy = torch.rand(300, 2, generator=gen) * 80
    boxes = torch.cat((xy, xy + 10 + torch.rand(300, 2, generator=gen) * 30), 1)
    scores = torch.rand(300, generator=gen)
    ref_idx, ref_scores = effdet_soft_nms(boxes, scores, sigma=0.5, score_threshold=0.001)
    idx, sc = batched_soft_nms(boxes, scores, max_det=100)
    assert idx[0] == scores.argmax() and sc[0] == scores.max()
    assert torch.equal(idx, ref_idx[:100])
    print("soft-NMS scores max abs diff", _close(sc, ref_scores[:100], rtol=1e-5, atol=1e-7))
    # per class: each class on its own
    groups = torch.randint(0, 3, (300,), generator=gen)
    idx, sc = batched_soft_nms(boxes, scores, groups, max_det=10000)
    for g in range(3):
        sel = (groups == g).nonzero().squeeze(1)
        r_idx, r_sc = effdet_soft_nms(boxes[sel], scores[sel], sigma=0.5, score_threshold=0.001)
        assert torch.equal(idx[groups[idx] == g], sel[r_idx])
        _close(sc[groups[idx] == g], r_sc, rtol=1e-5, atol=1e-7)
    # through postprocess: runs, keeps the top box with its score, decays the rest
    cls, box = _random_outputs(2, (128, 128), seed=8)
    anchors = make_anchors((128, 128))
    hard = postprocess(cls, box, anchors, conf=0.0)
    soft = postprocess(cls, box, anchors, conf=0.0, soft_nms=True)
    for h, s in zip(hard, soft):
        assert 0 < len(s) <= 100 and torch.equal(s[0], h[0])
        assert (s[:-1, 4] >= s[1:, 4]).all()


@pytest.mark.parametrize("conf,topk", [(0.3, 5000), (0.3, 50)])
def test_select_with_conf_filters_before_topk_with_the_same_result(conf, topk):
    """With conf > 0 the scores below it are dropped before the top-k (cheaper than a top-k over every (anchor,
    class) score): the detections equal those of top-k first, then conf, then NMS."""
    import torchvision

    from vistrain.ops.retina import select_detections

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 3000, 2, generator=g) * 200
    decoded = torch.cat((xy, xy + 5 + torch.rand(2, 3000, 2, generator=g) * 60, torch.rand(2, 3000, 4, generator=g)), -1)
    got = select_detections(decoded, conf=conf, iou=0.5, max_det=100, topk=topk)
    for i in range(2):
        scores, idx = decoded[i, :, 4:].reshape(-1).topk(topk)
        ok = scores >= conf
        scores, idx = scores[ok], idx[ok]
        boxes, cls = decoded[i, idx // 4, :4], idx % 4
        j = torchvision.ops.batched_nms(boxes, scores, cls, 0.5)[:100]
        want = torch.cat((boxes[j], scores[j, None], cls[j, None].float()), 1)
        assert torch.equal(got[i], want)
