"""YOLOv5 loss (target assignment, CIoU, objectness, classes, gains) and autoanchor."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torchvision

import vistrain
from vistrain.losses.yolov5 import YOLOv5Loss, build_targets, ciou, level_balance, smooth_bce_targets
from vistrain.ops.anchors import anchor_bpr, anchor_fitness, check_anchors, kmean_anchors, kmeans
from vistrain.ops.boxes import xywh2xyxy

# yolov5s.yaml's anchors in pixels, P3/8, P4/16, P5/32
DEFAULT_ANCHORS_PX = torch.tensor([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119],
                                   [116, 90, 156, 198, 373, 326]], dtype=torch.float32).view(3, 3, 2)
STRIDES = torch.tensor([8.0, 16.0, 32.0])


@pytest.fixture(scope="module")
def model3():
    torch.manual_seed(0)
    return vistrain.build_model("yolov5n", num_classes=3).train()


def random_targets(batch: int, per_image: int, nc: int, seed: int = 0, lo: float = 0.0,
                   hi: float = 1.0) -> torch.Tensor:
    """``Tensor[T, 6]`` (image, class, cx, cy, w, h), centres in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    n = batch * per_image
    img = torch.arange(batch).repeat_interleave(per_image).float()
    cls = torch.randint(0, nc, (n,), generator=g).float()
    xy = lo + torch.rand(n, 2, generator=g) * (hi - lo)
    wh = 0.05 + torch.rand(n, 2, generator=g) * 0.45
    return torch.cat((img[:, None], cls[:, None], xy, wh), 1)


# --- CIoU ---------------------------------------------------------------------------------------
def test_ciou_matches_torchvision_pairs_and_hand_case():
    torch.manual_seed(0)
    a = torch.cat((torch.rand(100, 2) * 10, torch.rand(100, 2) * 5 + 0.1), 1)
    b = torch.cat((a[:, :2] + torch.randn(100, 2), a[:, 2:] * torch.empty(100, 2).uniform_(0.5, 2)), 1)
    expected = torchvision.ops.complete_box_iou(xywh2xyxy(a), xywh2xyxy(b)).diagonal()
    assert torch.allclose(ciou(a, b), expected, atol=1e-5)
    # [0,0,2,2] vs [1,1,3,3]: IoU 1/7, centre distance^2 2, enclosing diagonal^2 18, same aspect
    got = ciou(torch.tensor([[1.0, 1.0, 2.0, 2.0]]), torch.tensor([[2.0, 2.0, 2.0, 2.0]]))
    assert got.item() == pytest.approx(1 / 7 - 2 / 18, abs=1e-6)
    assert ciou(a[:3], a[:3]) == pytest.approx(torch.ones(3), abs=1e-6)


def test_box_loss_is_gain_times_mean_one_minus_ciou():
    """One level, one target, one anchor: the box component equals box_gain * (1 - CIoU) over the
    three cells the target is assigned to, with the decoded prediction of each."""
    anchors = torch.tensor([[[1.0, 1.0]]])
    loss = YOLOv5Loss(1, anchors, torch.tensor([8.0]), balance=[1.0])
    torch.manual_seed(1)
    p = torch.randn(1, 1, 8, 8, 6)
    targets = torch.tensor([[0, 0, 5.3 / 8, 2.8 / 8, 1.5 / 8, 0.8 / 8]])
    _, items = loss([p], targets)
    t = loss.build_targets([p], targets)[0]
    ps = p[t.image, t.anchor, t.gj, t.gi]
    pbox = torch.cat((ps[:, :2].sigmoid() * 2 - 0.5, (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[0, 0]), 1)
    ref = torchvision.ops.complete_box_iou(xywh2xyxy(pbox), xywh2xyxy(t.box)).diagonal()
    assert len(ref) == 3
    assert items[0].item() == pytest.approx(loss.box_gain * (1 - ref).mean().item(), rel=1e-5)
    assert items[2].item() == 0.0  # a single class has no class loss


# --- target assignment --------------------------------------------------------------------------
def test_build_targets_centre_left_quarter_gets_left_and_up_neighbours():
    shapes = [torch.Size((1, 3, 8, 8, 6))]
    anchors = torch.tensor([[[1.0, 1.0], [4.0, 4.0], [16.0, 16.0]]])  # the target (1x1) fits only the first
    gx = gy = 5.25  # a quarter cell right of / below cell (5, 5)'s corner: nearest edges left and up
    targets = torch.tensor([[0, 2, gx / 8, gy / 8, 1 / 8, 1 / 8]])
    t = build_targets(shapes, targets, anchors)[0]
    cells = sorted(zip(t.gi.tolist(), t.gj.tolist()))
    assert cells == [(4, 5), (5, 4), (5, 5)]  # left, up, own
    assert t.anchor.tolist() == [0, 0, 0] and t.cls.tolist() == [2, 2, 2] and t.image.tolist() == [0, 0, 0]
    offsets = {c: tuple(b[:2].tolist()) for c, b in zip(zip(t.gi.tolist(), t.gj.tolist()), t.box)}
    assert offsets[(5, 5)] == pytest.approx((0.25, 0.25))
    assert offsets[(4, 5)] == pytest.approx((1.25, 0.25))
    assert offsets[(5, 4)] == pytest.approx((0.25, 1.25))
    assert torch.allclose(t.box[:, 2:], torch.ones(3, 2)) and torch.allclose(t.anchor_wh, torch.ones(3, 2))
    # three quarters: right and down instead
    t = build_targets(shapes, torch.tensor([[0, 0, 5.75 / 8, 5.75 / 8, 1 / 8, 1 / 8]]), anchors)[0]
    assert sorted(zip(t.gi.tolist(), t.gj.tolist())) == [(5, 5), (5, 6), (6, 5)]
    # within the first cell there are no left / up neighbours: only the own cell
    t = build_targets(shapes, torch.tensor([[0, 0, 0.25 / 8, 0.25 / 8, 1 / 8, 1 / 8]]), anchors)[0]
    assert sorted(zip(t.gi.tolist(), t.gj.tolist())) == [(0, 0)]


def test_build_targets_anchor_ratio_threshold():
    shapes = [torch.Size((1, 3, 8, 8, 6))]
    anchors = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [16.0, 16.0]]])
    # (1, 4.5) cells: height ratio 4.5 to the 1x1 anchor (> 4), (0.5, 2.25) to the 2x2 one
    targets = torch.tensor([[0, 0, 4.4 / 8, 4.4 / 8, 1 / 8, 4.5 / 8]])
    t = build_targets(shapes, targets, anchors)[0]
    assert set(t.anchor.tolist()) == {1}
    assert build_targets(shapes, targets, anchors, anchor_t=5.0)[0].anchor.unique().tolist() == [0, 1]
    # a ratio of exactly anchor_t does not match (strict <)
    t = build_targets(shapes, torch.tensor([[0, 0, 0.5, 0.5, 4 / 8, 4 / 8]]), anchors[:, :1])[0]
    assert t.image.numel() == 0


def test_build_targets_counts_per_level(model3):
    head = model3.model[-1]
    shapes = [torch.Size((2, 3, 128 // int(s), 128 // int(s), 8)) for s in head.stride]
    targets = random_targets(2, 6, 3, seed=3, lo=0.3, hi=0.7)  # inside every level's border cells
    level_targets = build_targets(shapes, targets, head.anchors)
    for shape, t, anchors in zip(shapes, level_targets, head.anchors):
        wh = targets[:, 4:6] * torch.tensor([shape[3], shape[2]])
        r = wh[:, None] / anchors[None]  # (T, na, 2)
        pairs = int((torch.max(r, 1 / r).amax(2) < 4.0).sum())
        assert t.image.numel() == 3 * pairs  # own cell + 2 neighbours for each (target, anchor) pair
        assert (t.gi >= 0).all() and (t.gi < shape[3]).all() and (t.gj >= 0).all() and (t.gj < shape[2]).all()
        assert (t.box[:, :2] > -0.5).all() and (t.box[:, :2] < 1.5).all()  # within reach of sigmoid*2-0.5
        rr = t.box[:, 2:] / t.anchor_wh
        assert (torch.max(rr, 1 / rr).amax(1) < 4.0).all()
    assert sum(t.image.numel() for t in level_targets) > 0


def test_empty_targets_give_finite_loss_with_no_box_or_class_term(model3):
    loss = YOLOv5Loss.from_model(model3, {"imgsz": 128})
    preds = model3(torch.rand(2, 3, 128, 128))
    total, items = loss(preds, torch.zeros(0, 6))
    assert torch.isfinite(total) and items[0] == 0 and items[2] == 0 and items[1] > 0
    total.backward()


# --- loss conventions ---------------------------------------------------------------------------
def test_gains_balance_and_from_model(model3):
    loss = YOLOv5Loss.from_model(model3, {"imgsz": 320, "box": 0.05, "cls": 0.5, "obj": 1.0, "lr0": 0.01})
    head = model3.model[-1]
    assert torch.equal(loss.anchors, head.anchors) and torch.equal(loss.strides, head.stride)
    assert loss.nc == 3 and loss.box_gain == pytest.approx(0.05)
    assert loss.cls_gain == pytest.approx(0.5 * 3 / 80) and loss.obj_gain == pytest.approx(0.25)
    assert loss.balance == [4.0, 1.0, 0.4] and level_balance(4) == [4.0, 1.0, 0.25, 0.06]
    two = YOLOv5Loss(80, torch.ones(2, 3, 2), torch.tensor([8.0, 16.0]))
    assert two.box_gain == pytest.approx(0.05 * 1.5) and two.balance == [4.0, 1.0]
    with pytest.raises(ValueError, match="Detect"):
        YOLOv5Loss.from_model(torch.nn.Linear(2, 2))


def test_loss_is_batch_size_times_components_and_gradients_finite(model3):
    loss = YOLOv5Loss.from_model(model3, {"imgsz": 128})
    x = torch.rand(2, 3, 128, 128)
    targets = random_targets(2, 4, 3, seed=5)
    preds = model3(x)
    total, items = loss(preds, targets)
    assert total.item() == pytest.approx(items.sum().item() * 2, rel=1e-6)
    assert not items.requires_grad and items.shape == (3,)
    # the same batch twice: the same mean components, twice the total
    doubled = [torch.cat((p, p)) for p in preds]
    t2 = torch.cat((targets, targets + torch.tensor([2.0, 0, 0, 0, 0, 0])))
    total2, items2 = loss(doubled, t2)
    assert torch.allclose(items2, items, rtol=1e-5) and total2.item() == pytest.approx(2 * total.item(), rel=1e-5)
    model3.zero_grad()
    total.backward()
    grads = [p.grad for p in model3.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_label_smoothing_changes_class_targets_only():
    assert smooth_bce_targets(0.0) == (1.0, 0.0)
    assert smooth_bce_targets(0.1) == pytest.approx((0.95, 0.05))
    anchors, strides = DEFAULT_ANCHORS_PX / STRIDES.view(-1, 1, 1), STRIDES
    torch.manual_seed(2)
    preds = [torch.randn(2, 3, 64 // int(s), 64 // int(s), 9) for s in strides]
    targets = random_targets(2, 3, 4, seed=7)
    _, plain = YOLOv5Loss(4, anchors, strides, imgsz=64)(preds, targets)
    _, smooth = YOLOv5Loss(4, anchors, strides, imgsz=64, label_smoothing=0.1)(preds, targets)
    assert torch.allclose(plain[:2], smooth[:2]) and not torch.isclose(plain[2], smooth[2])


def test_bad_inputs_are_named():
    loss = YOLOv5Loss(2, DEFAULT_ANCHORS_PX / STRIDES.view(-1, 1, 1), STRIDES)
    preds = [torch.zeros(1, 3, 4, 4, 7)] * 3
    with pytest.raises(ValueError, match="class 5"):
        loss(preds, torch.tensor([[0, 5, 0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="Tensor\\[T, 6\\]"):
        loss(preds, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="nc \\+ 5"):
        loss([torch.zeros(1, 3, 4, 4, 9)] * 3, torch.zeros(0, 6))


def test_overfit_yolov5n_loss_falls():
    torch.manual_seed(0)
    model = vistrain.build_model("yolov5n", num_classes=3).train()
    loss = YOLOv5Loss.from_model(model, {"imgsz": 128})
    x = torch.rand(8, 3, 128, 128)
    targets = random_targets(8, 3, 3, seed=11, lo=0.2, hi=0.8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    start = time.perf_counter()
    for _ in range(50):
        total, _ = loss(model(x), targets)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(np.isfinite(history))
    assert history[-1] < 0.5 * history[0], history[::10]
    assert time.perf_counter() - start < 30


# --- autoanchor ---------------------------------------------------------------------------------
def _reference_metric(k: torch.Tensor, wh: torch.Tensor, thr: float) -> tuple[float, float, float]:
    """The autoanchor metric as YOLOv5 defines it: ratio metric min(r, 1/r) taken over w and h."""
    r = wh[:, None] / k[None]
    x = torch.min(r, 1 / r).min(2).values  # (N, K)
    best = x.max(1).values
    return (float((best > 1 / thr).float().mean()), float((x > 1 / thr).float().sum(1).mean()),
            float((best * (best > 1 / thr).float()).mean()))


def test_bpr_and_fitness_match_the_ratio_definition():
    rng = np.random.default_rng(0)
    wh = rng.uniform(2, 300, (500, 2))
    bpr, aat = anchor_bpr(DEFAULT_ANCHORS_PX.view(-1, 2), wh)
    ref = _reference_metric(DEFAULT_ANCHORS_PX.view(-1, 2).double(), torch.from_numpy(wh), 4.0)
    assert bpr == pytest.approx(ref[0]) and aat == pytest.approx(ref[1])
    assert anchor_fitness(DEFAULT_ANCHORS_PX.view(-1, 2), wh) == pytest.approx(ref[2], rel=1e-5)


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(0, 0.3, (200, 2)) for c in centres])
    found = kmeans(x, 3, np.random.default_rng(0))
    found = found[np.lexsort((found[:, 1], found[:, 0]))]
    assert np.allclose(found, centres[np.lexsort((centres[:, 1], centres[:, 0]))], atol=0.1)


def wide_thin_boxes(n: int, seed: int = 0) -> np.ndarray:
    """8:1 boxes 24-64 px wide and 3-8 px high: too low for every default anchor's height."""
    w = np.random.default_rng(seed).uniform(24, 64, n)
    return np.stack((w, w / 8), 1)


def test_check_anchors_evolves_for_odd_shapes():
    wh = wide_thin_boxes(10_000)
    start = time.perf_counter()
    anchors = DEFAULT_ANCHORS_PX / STRIDES.view(-1, 1, 1)
    new, report = check_anchors(wh, anchors, STRIDES, 640, rng=np.random.default_rng(0))
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"k-means + 1000 generations on 10k boxes took {elapsed:.1f} s"
    assert report["bpr_before"] < 0.98 and report["changed"] and new is not None
    assert report["bpr_after"] > report["bpr_before"] and report["bpr_after"] > 0.98
    assert new.shape == (3, 3, 2)
    after_px = new * STRIDES.view(-1, 1, 1)
    assert torch.allclose(after_px, report["anchors_after_px"])
    area = after_px.prod(-1).flatten()
    assert (area[1:] >= area[:-1]).all()  # small anchors at stride 8, large at 32
    assert anchor_bpr(after_px.view(-1, 2), wh)[0] == pytest.approx(report["bpr_after"])
    assert (after_px[..., 0] / after_px[..., 1] > 3).all()  # they took the labels' wide shape
    # levels listed large stride first: the smallest anchors still go to the finest level
    rev, _ = check_anchors(wh, (DEFAULT_ANCHORS_PX / STRIDES.view(-1, 1, 1)).flip(0), STRIDES.flip(0), 640,
                           rng=np.random.default_rng(0))
    assert torch.allclose(rev.flip(0), new)


def test_check_anchors_keeps_fitting_anchors_and_is_deterministic():
    rng = np.random.default_rng(3)
    base = DEFAULT_ANCHORS_PX.view(-1, 2).numpy()
    wh = base[rng.integers(0, 9, 2000)] * rng.uniform(0.6, 1.6, (2000, 2))
    anchors = DEFAULT_ANCHORS_PX / STRIDES.view(-1, 1, 1)
    new, report = check_anchors(wh, anchors, STRIDES, 640, rng=np.random.default_rng(0))
    assert new is None and not report["changed"] and report["bpr_before"] >= 0.98
    assert report["bpr_after"] == report["bpr_before"]
    assert torch.equal(report["anchors_after_px"], report["anchors_before_px"])
    assert "fit" in report["message"]
    odd = wide_thin_boxes(2000, seed=4)
    a, ra = check_anchors(odd, anchors, STRIDES, 640, rng=np.random.default_rng(7), gen=300)
    b, rb = check_anchors(odd, anchors, STRIDES, 640, rng=np.random.default_rng(7), gen=300)
    assert torch.equal(a, b) and ra["bpr_after"] == rb["bpr_after"]
    none, rn = check_anchors(np.zeros((0, 2)), anchors, STRIDES, 640)
    assert none is None and not rn["changed"]


def test_kmean_anchors_sorted_and_filters_tiny_boxes():
    wh = np.concatenate((wide_thin_boxes(500), np.full((300, 2), 1.0)))  # 1x1 px boxes are ignored
    k = kmean_anchors(wh, n=6, gen=200, rng=0)
    assert k.shape == (6, 2) and (np.diff(k.prod(1)) >= 0).all() and (k >= 2.0).all()
    assert (k[:, 0] / k[:, 1] > 3).all()
    few = kmean_anchors(np.array([[30.0, 40.0], [50.0, 20.0]]), n=9, imgsz=64, gen=50, rng=0)  # fewer boxes than n
    assert few.shape == (9, 2) and np.isfinite(few).all()
    with pytest.raises(ValueError, match="no label"):
        kmean_anchors(np.full((5, 2), 1.0), n=3)


def test_batched_evolution_equals_one_at_a_time():
    from vistrain.ops.anchors import _evolve

    wh = wide_thin_boxes(300, seed=2)
    k0 = np.array([[10.0, 13.0], [30.0, 20.0], [60.0, 10.0]])
    got = _evolve(k0, np.log(wh), float(np.log(4.0)), 200, np.random.default_rng(5))
    rng, k, f = np.random.default_rng(5), k0.copy(), anchor_fitness(k0, wh)
    for _ in range(200):  # the plain hill climb, same random draws
        v = np.ones(k.shape)
        while (v == 1).all():
            v = ((rng.random(k.shape) < 0.9) * rng.random() * rng.standard_normal(k.shape) * 0.1 + 1).clip(0.3, 3.0)
        kg = (k * v).clip(min=2.0)
        fg = anchor_fitness(kg, wh)
        if fg > f:
            f, k = fg, kg
    assert np.allclose(got, k, rtol=1e-6)


def test_ciou_gradient_finite_for_degenerate_predicted_boxes():
    """A predicted side that underflowed to 0 must not turn the gradients into NaN (it did with
    torchvision's CIoU alone, which divides by the height); ordinary boxes are unaffected."""
    pred = torch.tensor([[0.5, 0.5, 1.0, 0.0], [0.5, 0.5, 1e-30, 1e-30], [0.4, 0.6, 0.8, 1.2]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 3)
    value = ciou(pred, target)
    (1 - value).sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(pred.grad).all()
    plain = 1 - torchvision.ops.complete_box_iou_loss(xywh2xyxy(pred[2:].detach()), xywh2xyxy(target[2:]))
    assert torch.allclose(value[2], plain)
