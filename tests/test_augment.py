"""Detection augmentations keep every box on its object.

Each object is painted in its own colour (its class id indexes ``PALETTE``) on a noisy grey
background; after an op, the pixels of that colour must lie where the op says the object is.
Colours are matched by direction from the grey 114 (the pad value), so a pixel blended with the
background (interpolation, mixup) still counts, and a pixel blended with another object does not.
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from vistrain.data import augment as A  # noqa: E402
from vistrain.data.augment import Instances  # noqa: E402

cv2.setNumThreads(1)

GREY = 114
DIRECTIONS = [d for d in itertools.product((-1, 0, 1), repeat=3) if any(d)]
PALETTE = np.clip(GREY + 130 * np.array(DIRECTIONS), 0, 255).astype(np.uint8)  # 26 colours
IMGSZ = 128


# ------------------------------------------------------------------------------------ painting
def convex_polygon(rng, x1, y1, x2, y2, k=7) -> np.ndarray:
    """A random convex polygon inscribed in the ellipse of box x1 y1 x2 y2; float32[k, 2]."""
    a = np.sort(rng.uniform(0, 2 * np.pi, k))
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return np.stack((cx + rx * np.cos(a), cy + ry * np.sin(a)), 1).astype(np.float32)


def raster(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """bool[h, w]: pixels whose centre lies in ``poly`` (continuous coords; sub-pixel precision)."""
    mask = np.zeros((h, w), np.uint8)
    if len(poly) >= 3:
        cv2.fillPoly(mask, [np.round((poly - 0.5) * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def make_sample(rng, h, w, ids, kind="box", noise=6) -> tuple[np.ndarray, Instances]:
    """Image h x w with one object per 2x2 grid cell (ids[k] -> colour), and its labels.

    kind: "box" (painted rectangles, no segments), "polygon" (convex polygons with segments) or "mixed".
    """
    img = np.clip(GREY + rng.integers(-noise, noise + 1, (h, w, 3)), 0, 255).astype(np.uint8)
    boxes, segments = [], []
    for k, c in enumerate(ids):
        cy, cx = divmod(k, 2)
        ch, cw = h / 2, w / 2
        bw, bh = rng.uniform(0.55, 0.85) * (cw - 8), rng.uniform(0.55, 0.85) * (ch - 8)
        x1 = cx * cw + 4 + rng.uniform(0, cw - 8 - bw)
        y1 = cy * ch + 4 + rng.uniform(0, ch - 8 - bh)
        x1, y1, x2, y2 = round(x1), round(y1), round(x1 + bw), round(y1 + bh)
        poly_row = kind == "polygon" or (kind == "mixed" and k % 2 == 0)
        if poly_row:
            poly = convex_polygon(rng, x1, y1, x2, y2)
            img[raster(poly, h, w)] = PALETTE[c]
            boxes.append(np.concatenate((poly.min(0), poly.max(0))))
            segments.append(poly)
        else:
            img[y1:y2, x1:x2] = PALETTE[c]
            boxes.append(np.array([x1, y1, x2, y2], np.float32))
            segments.append(np.zeros((0, 2), np.float32))
    if kind == "box" or not ids:
        segments = []
    return img, Instances(np.array(ids, np.int64), np.array(boxes, np.float32).reshape(-1, 4), segments)


# ------------------------------------------------------------------------------------ checking
def colour_mask(img: np.ndarray, c: int, tmin: float) -> np.ndarray:
    """bool[H, W]: pixels equal to grey + t * (PALETTE[c] - grey) for t in [tmin, 1.15], within 14 levels."""
    d = img.astype(np.float32) - GREY
    v = PALETTE[c].astype(np.float32) - GREY
    t = d @ v / (v @ v)
    resid = np.linalg.norm(d - t[..., None] * v, axis=-1)
    return (resid < 14) & (t >= tmin) & (t <= 1.15)


def components(img, c, tmin):
    """Connected regions of colour c (8-connected, >= 6 px) -> list of (bbox xyxy, bool mask)."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(colour_mask(img, c, tmin).astype(np.uint8), connectivity=8)
    out = []
    for k in range(1, n):
        x, y, w, h, area = stats[k]
        if area >= 6:
            out.append((np.array([x, y, x + w, y + h], np.float64), lab == k))
    return out


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def check_on_objects(img, inst, tmin=0.5, must_keep=()):
    """Every box matches the visible region of its object's colour; segments match too.

    tmin: the least fraction of the colour's distance from grey that counts (lower after mixup).
    must_keep: colour ids whose every sizeable visible region needs a box.
    """
    h, w = img.shape[:2]
    assert img.dtype == np.uint8 and img.shape == (h, w, 3)
    b = inst.boxes
    assert b.dtype == np.float32 and b.shape == (len(inst), 4) and len(inst.cls) == len(inst)
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert not inst.segments or len(inst.segments) == len(inst)
    for i, (c, box) in enumerate(zip(inst.cls.astype(int), b.astype(np.float64))):
        if min(box[2] - box[0], box[3] - box[1]) < 4:  # a sliver (mosaic4 keeps them): its colour must be there
            x1, y1 = np.floor(box[:2]).astype(int) - 1
            x2, y2 = np.ceil(box[2:]).astype(int) + 1
            assert colour_mask(img, c, tmin)[max(y1, 0):y2, max(x1, 0):x2].any(), f"sliver of object {c} at {box}"
            continue
        comps = components(img, c, tmin)
        assert comps, f"object {c} has a box {box} but no pixels of its colour"
        side = min(box[2] - box[0], box[3] - box[1])
        ious = [box_iou(box, cb) for cb, _ in comps]
        k = int(np.argmax(ious))
        thr = 0.8 if side >= 12 else 0.5
        assert ious[k] >= thr, f"object {c}: box {box} vs its pixels {comps[k][0]}: IoU {ious[k]:.2f}"
        seg = inst.segments[i] if inst.segments else np.zeros((0, 2))
        if len(seg):
            assert np.allclose(np.concatenate((seg.min(0), seg.max(0))), box, atol=1e-3)
            assert (seg >= 0).all() and (seg[:, 0] <= w).all() and (seg[:, 1] <= h).all()
            if side >= 12:
                r, m = raster(seg, h, w), comps[k][1]
                assert (r & m).sum() / (r | m).sum() >= 0.7, f"object {c}: polygon and pixels disagree"
    for c in must_keep:
        for cb, m in components(img, c, tmin):
            if m.sum() >= 40 and min(cb[2] - cb[0], cb[3] - cb[1]) >= 6:
                assert any(box_iou(cb, bx) >= 0.5 for bx in b[inst.cls == c]), f"visible object {c} lost its box"


def snapshot(img, inst):
    return img.copy(), inst.copy()


def assert_same(a, b):
    (ia, la), (ib, lb) = a, b
    assert np.array_equal(ia, ib)
    assert np.array_equal(la.cls, lb.cls) and np.array_equal(la.boxes, lb.boxes)
    assert len(la.segments) == len(lb.segments) and all(np.array_equal(x, y) for x, y in zip(la.segments, lb.segments))


KINDS = ["box", "polygon", "mixed"]
SHAPES = [(128, 96), (96, 128), (128, 128), (64, 128), (128, 80), (100, 128), (128, 112), (72, 128)]


def dataset(kind, seed=0, empty=()):
    """8 images (long side IMGSZ), 3 objects each with globally unique colours; ``empty`` ones have none."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, h, w, [] if k in empty else [3 * k, 3 * k + 1, 3 * k + 2], kind)
            for k, (h, w) in enumerate(SHAPES)]


# ------------------------------------------------------------------------------------ Instances
def test_instances_validation_and_conversions():
    with pytest.raises(ValueError, match="2 classes but 1 boxes"):
        Instances(np.zeros(2), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="segments"):
        Instances(np.zeros(2), np.zeros((2, 4)), [np.zeros((3, 2))])
    xywhn = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.2, 0.2]], np.float32)
    inst = Instances.from_yolo(np.array([1, 2]), xywhn, [np.zeros((0, 2))] * 2, 200, 100)
    assert np.allclose(inst.boxes, [[80, 30, 120, 70], [0, 10, 40, 30]]) and inst.segments == []
    assert np.allclose(inst.normalized_cxcywh(200, 100), xywhn)
    both = Instances.concat([inst, Instances(np.array([0]), np.ones((1, 4)), [np.ones((3, 2))])])
    assert len(both) == 3 and [len(s) for s in both.segments] == [0, 0, 3]
    assert len(both.select(np.array([False, True, True]))) == 2 and len(Instances.empty()) == 0


# ------------------------------------------------------------------------------------ resizing
@pytest.mark.parametrize("shape", [(100, 60), (60, 100), (128, 128), (37, 200), (300, 200)])
@pytest.mark.parametrize("new_shape, auto, scaleup", [(128, False, True), ((96, 160), False, True),
                                                      (128, True, True), (160, False, False)])
def test_letterbox_keeps_boxes_on_objects(shape, new_shape, auto, scaleup):
    rng = np.random.default_rng(1)
    img, inst = make_sample(rng, *shape, [0, 5, 9], "mixed")
    before = snapshot(img, inst)
    out, ratio, (left, top) = A.letterbox(img, new_shape, auto=auto, scaleup=scaleup)
    assert_same(before, (img, inst))
    nh, nw = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    r = min(nh / shape[0], nw / shape[1]) if scaleup else min(nh / shape[0], nw / shape[1], 1.0)
    assert np.allclose(ratio, r, rtol=0.03) and out.dtype == np.uint8
    uh, uw = round(shape[0] * ratio[1]), round(shape[1] * ratio[0])
    if auto:
        assert out.shape[:2] == (uh + (nh - uh) % 32, uw + (nw - uw) % 32)
    else:
        assert out.shape == (nh, nw, 3)
    assert (out[:top] == GREY).all() and (out[:, :left] == GREY).all()
    assert (out[top + uh:] == GREY).all() and (out[:, left + uw:] == GREY).all()
    boxed = A.apply_letterbox(inst, ratio, (left, top))
    check_on_objects(out, boxed, must_keep=[0, 5, 9])
    back = A.scale_boxes_back(boxed.boxes, ratio, (left, top), shape)
    assert np.allclose(back, inst.boxes, atol=1e-3)


def test_scale_boxes_back_numpy_and_torch_clips():
    boxes = np.array([[10, 20, 50, 60], [-5, 0, 300, 300]], np.float32)
    for b in (boxes.copy(), torch.from_numpy(boxes.copy())):
        out = A.scale_boxes_back(b, (0.5, 0.5), (10, 20), (100, 80))
        assert type(out) is type(b) and np.array_equal(np.asarray(b), boxes)
        assert np.allclose(np.asarray(out), [[0, 0, 80, 80], [0, 0, 80, 100]])
    assert np.allclose(A.scale_boxes_back(boxes[:1], 2.0, (0, 0), (100, 100)), [[5, 10, 25, 30]])


@pytest.mark.parametrize("shape", [(300, 200), (50, 80), (128, 64)])
def test_load_resized(shape):
    img = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    out, scale = A.load_resized(img, IMGSZ)
    assert max(out.shape[:2]) == IMGSZ and out.dtype == np.uint8 and scale == pytest.approx(IMGSZ / max(shape))
    size = (round(shape[1] * scale), round(shape[0] * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    assert scale == 1 or np.array_equal(out, cv2.resize(img, size, interpolation=interp))


# ------------------------------------------------------------------------------------ mosaic, perspective
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mosaic4_keeps_boxes_on_objects(kind, seed):
    data = dataset(kind, seed)[:4]
    before = [snapshot(*s) for s in data]
    img, inst = A.mosaic4(data, IMGSZ, np.random.default_rng(seed))
    for b, s in zip(before, data):
        assert_same(b, s)
    assert img.shape == (2 * IMGSZ, 2 * IMGSZ, 3) and img.dtype == np.uint8
    assert (len(inst.segments) == len(inst)) if kind != "box" else inst.segments == []
    check_on_objects(img, inst, must_keep=range(12))
    assert set(inst.cls) <= set(range(12)) and len(inst) >= 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_perspective_keeps_boxes_on_objects(kind, seed):
    img, inst = make_sample(np.random.default_rng(seed), 128, 112, [1, 7, 13, 20], kind)
    before = snapshot(img, inst)
    out, moved = A.random_perspective(img, inst, np.random.default_rng(seed), degrees=30, translate=0.2, scale=0.4,
                                      shear=10, perspective=0.0005)
    assert_same(before, (img, inst))
    assert out.shape == img.shape and out.dtype == np.uint8
    check_on_objects(out, moved)


@pytest.mark.parametrize("kind", KINDS)
def test_random_perspective_without_cropping_keeps_every_object(kind):
    img, inst = make_sample(np.random.default_rng(5), 128, 128, [2, 4, 6, 8], kind)
    for seed in range(8):  # gains 0.25..1.75 about the centre of a large output: nothing leaves the image
        out, moved = A.random_perspective(img, inst, np.random.default_rng(seed), degrees=45, translate=0.0,
                                          scale=0.75, shear=5, out_size=(360, 360))
        assert out.shape == (360, 360, 3) and len(moved) == 4
        check_on_objects(out, moved, must_keep=[2, 4, 6, 8])


def test_random_perspective_identity_and_mosaic_crop():
    img, inst = make_sample(np.random.default_rng(0), 96, 128, [3, 4], "polygon")
    out, same = A.random_perspective(img, inst, np.random.default_rng(0), translate=0, scale=0)
    assert np.array_equal(out, img) and np.allclose(same.boxes, inst.boxes, atol=1e-4)
    mosaic = A.mosaic4(dataset("box")[:4], IMGSZ, np.random.default_rng(0))
    out, cropped = A.random_perspective(*mosaic, np.random.default_rng(0), border=(-IMGSZ // 2, -IMGSZ // 2))
    assert out.shape == (IMGSZ, IMGSZ, 3)
    check_on_objects(out, cropped)
    centre, _ = A.random_perspective(*mosaic, np.random.default_rng(0), translate=0, scale=0, out_size=IMGSZ)
    assert np.array_equal(centre, mosaic[0][IMGSZ // 2:-IMGSZ // 2, IMGSZ // 2:-IMGSZ // 2])


@pytest.mark.parametrize("gain", [2, 3, 0.5])
def test_warp_image_is_pixel_exact(gain):
    """Labels use continuous coordinates; the warp agrees with cv2.resize's half-pixel-centred grid."""
    img = np.random.default_rng(0).integers(0, 255, (24, 30, 3), dtype=np.uint8)
    size = (round(30 * gain), round(24 * gain))
    out = A.warp_image(img, np.diag([gain, gain, 1.0]), *size)
    ref = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    inner = (slice(2, -2), slice(2, -2))  # the borders differ: constant 114 vs replicated edge
    assert np.abs(out[inner].astype(int) - ref[inner]).max() <= 1


def test_box_candidates_rule():
    before = np.array([[0, 0, 20, 20]] * 5, np.float32)
    after = np.array([[0, 0, 20, 20], [0, 0, 2, 20], [0, 0, 4, 9], [0, 0, 7, 7], [0, 0, 300, 2.5]], np.float32)
    before[4] = [0, 0, 300, 300]
    assert A.box_candidates(before, after).tolist() == [True, False, False, True, False]
    after[4] = [0, 0, 299, 3.5]
    assert A.box_candidates(before, after, area_thr=0.0).tolist()[4]  # aspect 85 < 100


def test_random_perspective_area_rule_polygons_1_percent_boxes_10_percent():
    """As ultralytics (and YOLOv5-seg): an object whose box is refit to its visible polygon stays down to 1% of
    its area, a box-only object (its box the loose hull of moved corners) down to 10%."""
    img = np.zeros((100, 100, 3), np.uint8)
    square = np.array([[-37, 30], [3, 30], [3, 70], [-37, 70]], np.float32)  # 3 of its 40 px columns visible: 7.5%
    inst = A.Instances(np.array([0, 1]), np.array([[-37, 30, 3, 70]] * 2, np.float32), [square, np.zeros((0, 2))])
    _, kept = A.random_perspective(img, inst, np.random.default_rng(0), translate=0, scale=0)
    assert kept.cls.tolist() == [0] and np.allclose(kept.boxes, [[0, 30, 3, 70]])
    _, both = A.random_perspective(img, inst, np.random.default_rng(0), translate=0, scale=0, area_thr=0.05)
    assert both.cls.tolist() == [0, 1]
    _, none = A.random_perspective(img, inst, np.random.default_rng(0), translate=0, scale=0, area_thr=0.1)
    assert none.cls.tolist() == []


def test_clip_polygon_area():
    def area(p):
        return 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))

    square = np.array([[-10, -10], [30, -10], [30, 30], [-10, 30]], np.float32)
    assert area(A.clip_polygon(square, 20, 25)) == pytest.approx(500)
    diamond = np.array([[10, -5], [25, 10], [10, 25], [-5, 10]], np.float32)  # the square's corners stay out
    assert area(A.clip_polygon(diamond, 20, 20)) == pytest.approx(400 - 4 * 12.5)
    assert len(A.clip_polygon(square + 100, 20, 20)) == 0
    inside = square / 10 + 5
    assert np.array_equal(A.clip_polygon(inside, 20, 20), inside)


def test_transform_instances_equals_clipping_each_polygon():
    """transform_instances bounds the polygons left wholly inside in one pass; the result is what moving and
    clipping each polygon by itself (and a box-only row's corners) gives, to the bit."""
    rng = np.random.default_rng(5)
    for trial in range(30):
        n = int(rng.integers(1, 8))
        polys = [rng.uniform(-20, 120, 2) + rng.uniform(-15, 15, (int(rng.integers(3, 9)), 2)) for _ in range(n)]
        segs = [p.astype(np.float32) if k % 3 else np.zeros((0, 2), np.float32) for k, p in enumerate(polys)]
        boxes = np.array([np.r_[p.min(0), p.max(0)] for p in polys], np.float32)
        inst = A.Instances(np.arange(n), boxes, segs)
        m = np.eye(3)
        m[:2, :2] = rng.uniform(0.5, 1.5) * np.eye(2) + rng.uniform(-0.2, 0.2, (2, 2)) * (trial % 2)
        m[:2, 2] = rng.uniform(-30, 30, 2)
        out = A.transform_instances(inst, m, 100, 90)
        for k in range(n):
            if len(segs[k]):
                ref = A.clip_polygon(A._transform_points(segs[k], m), 100, 90)
                assert out.segments[k].dtype == np.float32 and np.array_equal(out.segments[k], ref)
                assert np.array_equal(out.boxes[k], A._bbox(ref).astype(np.float32))
            else:
                assert len(out.segments[k]) == 0


# ------------------------------------------------------------------------------------ colour, flips, mixup
def test_flips_exact():
    img, inst = make_sample(np.random.default_rng(2), 96, 128, [0, 1, 2], "mixed")
    before = snapshot(img, inst)
    for flip in (A.flip_lr, A.flip_ud):
        out, moved = flip(img, inst)
        check_on_objects(out, moved, must_keep=[0, 1, 2])
        back_img, back = flip(out, moved)
        assert np.array_equal(back_img, img) and np.allclose(back.boxes, inst.boxes, atol=1e-4)
        assert all(np.allclose(x, y, atol=1e-4) for x, y in zip(back.segments, inst.segments))
    assert_same(before, (img, inst))
    both = A.random_flips(img, inst, np.random.default_rng(0), fliplr=1.0, flipud=1.0)
    assert_same(both, A.flip_lr(*A.flip_ud(img, inst)))
    none = A.random_flips(img, inst, np.random.default_rng(0), fliplr=0.0, flipud=0.0)
    assert_same(none, before) and none[0] is not img


def test_augment_hsv():
    img, _ = make_sample(np.random.default_rng(3), 64, 64, [0, 1, 2, 3], "box")
    img[:8, :8] = GREY
    before = img.copy()
    same = A.augment_hsv(img, np.random.default_rng(0), 0, 0, 0)
    assert np.array_equal(same, img) and same is not img
    out = A.augment_hsv(img, np.random.default_rng(0), 0.5, 0.7, 0.4)
    assert np.array_equal(img, before) and out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)
    assert (out[:8, :8] == out[:8, :8, :1]).all()  # grey has no saturation: it stays grey
    assert np.array_equal(out, A.augment_hsv(img, np.random.default_rng(0), 0.5, 0.7, 0.4))


@pytest.mark.parametrize("seed", [0, 2, 3, 4])  # offsets of +2, -5, -8, +7 hue units
def test_augment_hsv_hue_shift_is_the_same_for_every_hue(seed):
    """Hue jitter adds one offset to every hue (wrapping at 180), as ultralytics >= 8.3.79 does: red moves
    as much as blue (a multiplicative gain would leave hue 0 where it is)."""
    hsv = np.stack(np.meshgrid(np.arange(180), [255], [255]), -1).reshape(1, 180, 3).astype(np.uint8)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    hue_in = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[0, :, 0].astype(int)
    hue_out = cv2.cvtColor(A.augment_hsv(rgb, np.random.default_rng(seed), 0.05, 0, 0), cv2.COLOR_RGB2HSV)[0, :, 0]
    shift = (hue_out.astype(int) - hue_in) % 180
    shift = np.where(shift > 90, shift - 180, shift)  # signed
    expected = np.floor(np.random.default_rng(seed).uniform(-1, 1) * 0.05 * 180)
    assert expected != 0 and (shift == expected).mean() > 0.9  # HSV<->RGB rounding moves a few by one
    assert np.abs(shift - expected).max() <= 1


def test_mixup_blends_and_concatenates():
    rng = np.random.default_rng(4)
    a = make_sample(rng, 128, 128, [0, 1], "polygon")  # top row of cells
    img_b, inst_b = make_sample(rng, 128, 128, [25, 24, 23, 22], "box")
    img_b[:64] = GREY  # b keeps its bottom-row objects only
    b = (img_b, inst_b.select([2, 3]))
    before = [snapshot(*a), snapshot(*b)]
    img, inst = A.mixup(a, b, np.random.default_rng(9))
    assert_same(before[0], a) and assert_same(before[1], b)
    r = np.random.default_rng(9).beta(32, 32)
    expect = np.clip(np.rint(a[0] * r + b[0] * (1 - r)), 0, 255)
    assert np.abs(img.astype(int) - expect).max() <= 1
    assert inst.cls.tolist() == [0, 1, 23, 22] and [len(s) for s in inst.segments] == [7, 7, 0, 0]
    check_on_objects(img, inst, tmin=0.2, must_keep=[0, 1, 22, 23])
    with pytest.raises(ValueError, match="one size"):
        A.mixup(a, (b[0][:100], b[1]), rng)


# ------------------------------------------------------------------------------------ the composition
HYP = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=10.0, translate=0.1, scale=0.5, shear=5.0, perspective=0.0003,
           flipud=0.5, fliplr=0.5)


def loader(data, counter=None):
    def load(i):
        if counter is not None:
            counter.append(i)
        return data[i]
    return load


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mosaic", [1.0, 0.0, 0.5])
def test_pipeline_keeps_boxes_on_objects(kind, mosaic):
    data = dataset(kind, seed=7, empty=(5,))
    before = [snapshot(*s) for s in data]
    aug = A.DetectAugment(IMGSZ, mosaic=mosaic, **HYP)
    for seed in range(6):
        img, inst = aug(seed % len(data), loader(data), len(data), np.random.default_rng(seed))
        assert img.shape == (IMGSZ, IMGSZ, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
        check_on_objects(img, inst)
    for b, s in zip(before, data):
        assert_same(b, s)


@pytest.mark.parametrize("kind", ["box", "polygon"])
def test_pipeline_with_mixup(kind):
    """The geometry depends on the seed only, so blanking one of the two mosaics (grey, no labels)
    shows the other one's objects alone, at the mixup weight, under exactly its part of the labels."""
    data = dataset(kind, seed=3)
    aug = A.DetectAugment(IMGSZ, mixup=1.0, **HYP)

    def load_only(calls, real):
        def load(i):
            calls.append(i)
            return data[i] if len(calls) - 1 in real else (np.full_like(data[i][0], GREY), Instances.empty())
        return load

    for seed in range(4):
        calls: list[int] = []
        img, inst = aug(2, load_only(calls, range(8)), len(data), np.random.default_rng(seed))
        assert len(calls) == 8 and 2 in calls[:4] and img.shape == (IMGSZ, IMGSZ, 3)
        first = aug(2, load_only([], range(4)), len(data), np.random.default_rng(seed))
        second = aug(2, load_only([], range(4, 8)), len(data), np.random.default_rng(seed))
        assert_same((img, inst), (img, Instances.concat([first[1], second[1]])))
        for part_img, part in (first, second):
            check_on_objects(part_img, part, tmin=0.2)


def test_pipeline_determinism_and_colour_independent_geometry():
    data = dataset("mixed", seed=1)
    aug = A.DetectAugment.from_hyp(IMGSZ, {**HYP, "mixup": 0.5, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4,
                                           "box": 0.05})
    plain = A.DetectAugment(IMGSZ, mixup=0.5, **HYP)
    outs = []
    for seed in range(4):
        x = aug(seed, loader(data), len(data), np.random.default_rng(seed))
        assert_same(x, aug(seed, loader(data), len(data), np.random.default_rng(seed)))
        geometry = plain(seed, loader(data), len(data), np.random.default_rng(seed))
        assert np.array_equal(x[1].boxes, geometry[1].boxes) and not np.array_equal(x[0], geometry[0])
        outs.append(x)
    assert not np.array_equal(outs[0][0], outs[1][0])


def test_pipeline_empty_labels_and_resizing_loader():
    rng = np.random.default_rng(0)
    data = [make_sample(rng, 200, 150, [], "box") for _ in range(3)]  # long side 200: resized to IMGSZ
    assert data[0][1].segments == [] and len(data[0][1]) == 0
    for mosaic, mixup in ((1.0, 1.0), (0.0, 0.0)):
        aug = A.DetectAugment(IMGSZ, mosaic=mosaic, mixup=mixup, degrees=20)
        img, inst = aug(0, loader(data), 3, np.random.default_rng(1))
        assert img.shape == (IMGSZ, IMGSZ, 3) and len(inst) == 0 and inst.boxes.shape == (0, 4)
    empty = Instances.empty()
    img = data[0][0]
    for out, moved in (A.mosaic4([(img, empty)] * 4, IMGSZ, rng), A.random_perspective(img, empty, rng, degrees=9),
                       A.flip_lr(img, empty), A.flip_ud(img, empty), A.mixup((img, empty), (img, empty), rng)):
        assert len(moved) == 0 and out.dtype == np.uint8
    assert len(A.apply_letterbox(empty, (0.5, 0.5), (3, 4))) == 0
    assert A.scale_boxes_back(np.zeros((0, 4)), 0.5, (0, 0), (10, 10)).shape == (0, 4)


def test_detect_augment_config_errors():
    with pytest.raises(ValueError, match="mosaic=1.5"):
        A.DetectAugment(IMGSZ, mosaic=1.5)
    with pytest.raises(TypeError):
        A.DetectAugment(IMGSZ, mosiac=1.0)
    assert A.DetectAugment.from_hyp(64, {"degrees": 3, "lr0": 0.01}).degrees == 3.0


# ------------------------------------------------------------------------------------ masks
def test_polygon_mask_pixel_centres_and_order():
    square = np.array([[2.2, 2.2], [5.8, 2.2], [5.8, 5.8], [2.2, 5.8]], np.float32)  # pixel centres 2.5 .. 5.5
    m = A.polygon_mask((8, 8), [square])
    assert m.sum() == 16 and m[2:6, 2:6].all()
    half = A.polygon_mask((8, 8), [square], ratio=2)  # centres (1.5, 2.5) * 2 inside: pixels 1, 2
    assert half.shape == (4, 4) and half.sum() == 4 and half[1:3, 1:3].all()
    big = np.array([[0, 0], [8, 0], [8, 8], [0, 8]], np.float32)
    m = A.polygon_mask((8, 8), [big, square], values=[1, 2])
    assert (m == 2).sum() == (A.polygon_mask((8, 8), [square])).sum() and (m > 0).all()  # later ones on top
    assert A.polygon_mask((8, 8), [np.zeros((2, 2), np.float32)]).sum() == 0  # < 3 points: nothing


def test_polygon_mask_is_the_coco_ground_truth_raster():
    """Training masks are pycocotools' raster of the polygons (what mask mAP is scored against), at 1/ratio the
    blocks at least half covered by it; on average they have the polygon's own area, where cv2.fillPoly's
    (ultralytics') also take the pixels the edges pass through."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    h, w = 48, 64
    areas = []
    for _ in range(60):
        n, r = int(rng.integers(3, 12)), rng.uniform(3, 14)
        c = rng.uniform(-r / 2, [w + r / 2, h + r / 2])  # some cross the image's edges
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        poly = c + (r * rng.uniform(0.4, 1, n))[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
        coco = mask_utils.decode(mask_utils.frPyObjects([poly.ravel().tolist()], h, w))[..., 0]
        np.testing.assert_array_equal(A.polygon_mask((h, w), [poly]), coco)
        np.testing.assert_array_equal(A.polygon_mask((h, w), [poly], ratio=4),
                                      coco.reshape(h // 4, 4, w // 4, 4).mean((1, 3)) >= 0.5)
        if (poly >= 0).all() and (poly < [w, h]).all():
            x, y = poly.T
            fill = np.zeros((h, w), np.uint8)
            cv2.fillPoly(fill, [poly.astype(np.int32)], 1)
            areas.append((coco.sum(), fill.sum(), abs((x * np.roll(y, -1) - np.roll(x, -1) * y).sum()) / 2))
    ours, fill, exact = np.array(areas, float).sum(0)
    assert len(areas) >= 20 and abs(ours / exact - 1) < 0.02 and fill / exact > 1.05


def test_instance_masks_overlap_sorts_by_area():
    small = np.array([[2, 2], [6, 2], [6, 6], [2, 6]], np.float32)
    big = np.array([[0, 0], [16, 0], [16, 16], [0, 16]], np.float32)
    inst = Instances(np.array([5, 7]), np.array([[2, 2, 6, 6], [0, 0, 16, 16]], np.float32), [small, big])
    m, ordered = A.instance_masks(inst, (16, 16), ratio=1, overlap=True)
    assert ordered.cls.tolist() == [7, 5]  # largest first: number 1 = the big one
    per, same = A.instance_masks(inst, (16, 16), ratio=1, overlap=False)
    assert same is inst and per.shape == (2, 16, 16) and per[1].sum() == 256
    assert np.array_equal(m == 2, per[0].astype(bool)) and (m > 0).all()


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
@pytest.mark.parametrize("ratio", [1, 4])
def test_masks_follow_objects_through_pipeline(mosaic, ratio):
    """Masks of the augmented polygons cover the transformed painted objects (mosaic, perspective, flips,
    letterbox); the overlap map numbers them as the per-instance masks do, largest object first."""
    data = dataset("polygon", seed=3)
    aug = A.DetectAugment(IMGSZ, mosaic=mosaic, **HYP)
    checked = 0
    for seed in range(10):
        img, inst = aug(seed % len(data), loader(data), len(data), np.random.default_rng(seed))
        h, w = img.shape[:2]
        masks, same = A.instance_masks(inst, (h, w), ratio, overlap=False)
        assert same is inst and masks.shape == (len(inst), h // ratio, w // ratio)
        for c in np.unique(inst.cls.astype(int)):  # a mosaic may hold one image twice: compare per colour
            m = masks[inst.cls == c].any(0)
            painted = colour_mask(img, c, 0.5).astype(np.float32)
            if ratio > 1:
                painted = cv2.resize(painted, (w // ratio, h // ratio), interpolation=cv2.INTER_AREA)
            painted = painted >= 0.5
            if m.sum() * ratio * ratio >= 200:  # objects large enough for a pixel-level comparison
                assert (m & painted).sum() / (m | painted).sum() >= 0.7, f"mask of object {c} off its pixels"
                checked += 1
        overlap, ordered = A.instance_masks(inst, (h, w), ratio, overlap=True)
        assert overlap.shape == (h // ratio, w // ratio) and sorted(ordered.cls.tolist()) == sorted(inst.cls.tolist())
        per, _ = A.instance_masks(ordered, (h, w), ratio, overlap=False)
        areas = [cv2.contourArea(p) for p in ordered.segments]
        assert all(np.diff(areas) <= 0)  # largest polygon first
        for k, m in enumerate(per.astype(bool)):  # painted objects do not overlap: the maps agree exactly
            assert np.array_equal(overlap == k + 1, m)
    assert checked >= 10
