"""Training samples against ultralytics' segment pipeline (a test oracle only: vistrain never imports it).

With mosaic closed (the last ``close_mosaic`` epochs, and all of a 10-epoch run), a training sample is:
letterbox -> random perspective (scale, translation) -> HSV -> flip, then the masks at 1/4.  With mosaic on
(the epochs before): the image and three partners around a random centre of a 2 x imgsz canvas -> random
perspective cropping back to imgsz -> HSV -> flip.  Both pipelines are given the same random numbers
(ultralytics' through ``random.uniform`` / ``random.random`` / ``np.random.uniform``, matched by their ranges,
and its mosaic's ``get_indexes``; vistrain's through a scripted generator), and must give the same instances
with the same boxes, nearly the same masks and images.

What may differ, by design: vistrain warps images with the half-pixel correction (labels and pixels move
together exactly); ultralytics applies the label matrix to pixel indices, which moves the image by
0.5 * (1 - scale) px against its labels.  And vistrain rasterises the polygons as pycocotools does (the COCO
ground truth that mask mAP is scored against), where ultralytics' cv2.fillPoly also sets the pixels its edges
pass through: its masks contain vistrain's plus a ring of boundary pixels (8-10% of the area at 40 px
objects).  Those are the only differences these bounds allow.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from vistrain.data.synthetic import make_dataset


class ScriptedRng:
    """Stands in for ``np.random.Generator``: returns the given values for the draws matched by range.

    With mosaic on: ``others`` (the three partners' indices) and ``centre`` (the mosaic centre x, y in pixels of
    the 2 x ``imgsz`` canvas); the partners keep their order (no shuffle: ultralytics puts the image itself top
    left, then the partners clockwise)."""

    def __init__(self, scale: float, translate: tuple[float, float], hsv: np.ndarray, flip: float,
                 others: tuple[int, int, int] = (0, 0, 0), centre: tuple[int, int] = (0, 0), imgsz: int = 0):
        self.scale, self.translate, self.hsv, self.flip = scale, translate, hsv, flip
        self.others, self.centre, self.imgsz = others, centre, imgsz

    def uniform(self, low=0.0, high=1.0, size=None):
        if self.imgsz and size == 2 and (low, high) == (0.5 * self.imgsz, 1.5 * self.imgsz):
            return np.array(self.centre, dtype=np.float64)
        if (low, high) == (0.5, 1.5):
            return self.scale
        if size == 2 and np.isclose(low, 0.4) and np.isclose(high, 0.6):
            return np.array(self.translate)
        if size == 3 and (low, high) == (-1, 1):
            return self.hsv.copy()
        mid = (low + high) / 2  # rotation, shear, perspective: all 0 in the defaults
        return mid if size is None else np.full(size, mid)

    def random(self, size=None):
        # mosaic (p 1 or 0: 0.5 takes it when on) and mixup (p 0: never), then flips (up-down, left-right)
        return 0.5 if size is None else np.array([1.0, self.flip])

    def integers(self, low, high=None, size=None):  # the mosaic's partners
        return np.array(self.others)

    def permutation(self, x):  # the mosaic's order: as given
        return np.array(x)


def make_pipelines(ultralytics_home, tmp_path_factory, mosaic: bool):
    """(ultralytics' segment train dataset, vistrain's) on one small generated set, mosaic on or closed."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from vistrain.data.detect import DetectDataset
    from vistrain.data.yolo import list_split_images, load_data_yaml, scan_split

    root = make_dataset(tmp_path_factory.mktemp("shapes"), n=24, imgsz=160, seed=3, workers=1)
    data_yaml = root / "segment" / "data.yaml"
    cfg = get_cfg(overrides=dict(task="segment", imgsz=160, batch=8))
    ul_data = check_det_dataset(str(data_yaml))
    ul_ds = build_yolo_dataset(cfg, ul_data["train"], 8, ul_data, mode="train", stride=32)
    data = load_data_yaml(data_yaml)
    labels, _ = scan_split(list_split_images(data, "train"), data["nc"], workers=1)
    ours = DetectDataset(labels.items, 160, augment=True, seed=0, masks=True, mask_ratio=4, overlap=True)
    if not mosaic:
        ul_ds.close_mosaic(cfg)
        ours.close_mosaic()
    return ul_ds, ours


@pytest.fixture(scope="module")
def pipelines(ultralytics_home, tmp_path_factory):
    return make_pipelines(ultralytics_home, tmp_path_factory, mosaic=False)


@pytest.fixture(scope="module")
def mosaic_pipelines(ultralytics_home, tmp_path_factory):
    return make_pipelines(ultralytics_home, tmp_path_factory, mosaic=True)


def ultralytics_sample(ds, index: int, rng: ScriptedRng, monkeypatch, by_name: dict | None = None) -> dict:
    """ultralytics' sample ``index`` with ``rng``'s numbers; with mosaic on, ``by_name`` maps vistrain's indices
    (``rng.others``) to ultralytics' (file name -> index)."""
    from ultralytics.data.augment import Mosaic

    translate, centre = list(rng.translate), [rng.centre[1], rng.centre[0]]  # ultralytics draws yc, then xc

    def uniform(low, high):
        if rng.imgsz and (low, high) == (0.5 * rng.imgsz, 1.5 * rng.imgsz):
            return centre.pop(0) + 0.25  # int() of it: the centre pixel
        if (low, high) == (0.5, 1.5):
            return rng.scale
        if np.isclose(low, 0.4) and np.isclose(high, 0.6):
            return translate.pop(0)
        return (low + high) / 2  # rotation, shear, perspective 0; mosaic (p 1 or 0) / mixup / cutmix checks (p 0)

    with monkeypatch.context() as m:
        m.setattr(random, "uniform", uniform)
        m.setattr(random, "random", lambda: rng.flip)  # up-down (p = 0: never), left-right
        m.setattr(np.random, "uniform", lambda low, high, size: rng.hsv.copy())
        if by_name is not None:
            mosaic = next(t for t in ds.transforms.transforms[0].transforms if isinstance(t, Mosaic))
            m.setattr(mosaic, "get_indexes", lambda: [by_name[k] for k in rng.others])
        return ds[index]


def assert_same_sample(u: dict, v: dict, where: str, imgsz: int, image_mean: float = 3.0) -> int:
    """One training sample of each pipeline, given the same random numbers: the same instances and boxes,
    ultralytics' masks vistrain's plus a ring of boundary pixels, images equal but for the half-pixel warp
    convention (mean |difference| below ``image_mean`` grey levels).  Returns the number of instances."""
    # the same instances with the same boxes (the order, largest first for the masks, may differ where two
    # objects have nearly the same area: vistrain ranks polygon areas, ultralytics mask pixel counts)
    ub, vb = u["bboxes"].numpy() * imgsz, v["bboxes"].numpy() * imgsz
    ucls, vcls = u["cls"].view(-1).numpy(), v["cls"].numpy()
    assert len(ucls) == len(vcls), where
    match = [int(np.argmin(np.abs(ub - b).sum(1) + 1e3 * (ucls != c))) for b, c in zip(vb, vcls)]
    assert sorted(match) == list(range(len(ucls))), where
    np.testing.assert_array_equal(ucls[match], vcls, err_msg=where)
    np.testing.assert_allclose(vb, ub[match], atol=0.05, err_msg=where)

    # masks: nearly the same pixels, instance by instance
    um, vm = u["masks"].numpy()[0], v["masks"].numpy()
    assert um.shape == vm.shape == (imgsz // 4, imgsz // 4), where
    # vistrain rasterises as pycocotools (the COCO ground truth), ultralytics with cv2.fillPoly, which also sets
    # the pixels edges pass through: its masks hold vistrain's and add a ring of at most one mask pixel (where
    # a thin tip of a small object is under half a block in vistrain's, a pixel or two beyond it)
    grown = cv2.dilate((vm > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert ((vm > 0) & (um == 0)).sum() == 0, where
    assert ((um > 0) & ~grown).sum() <= 2, where
    if len(vcls):
        assert (um > 0).sum() > (vm > 0).sum(), where
    for k, ku in enumerate(match):
        a, b = um == ku + 1, vm == k + 1
        if a.sum() >= 30:  # a small one (a few mask pixels) can lose or gain a large share of them
            assert (a & b).sum() / (a | b).sum() > 0.7, f"{where}, instance {k}"

    # images: RGB both, equal but for the half-pixel warp difference at edges
    ui, vi = u["img"].numpy().astype(np.int16), v["img"].numpy().astype(np.int16)
    assert ui.shape == vi.shape == (3, imgsz, imgsz), where
    diff = np.abs(ui - vi)
    assert diff.mean() < image_mean and (diff > 32).mean() < 0.02, f"{where}: mean |diff| {diff.mean():.2f}"
    return len(vcls)


def test_training_samples_equal_ultralytics_given_the_same_random_numbers(pipelines, monkeypatch):
    ul_ds, ours = pipelines
    by_name = {Path(it.im_file).name: j for j, it in enumerate(ours.items)}
    draw = np.random.default_rng(0)
    compared = boxes_seen = near_one = 0
    for trial in range(16):
        i = int(draw.integers(len(ul_ds)))
        rng = ScriptedRng(scale=float(draw.uniform(0.5, 1.5)), translate=tuple(draw.uniform(0.4, 0.6, 2)),
                          hsv=draw.uniform(-1, 1, 3), flip=float(trial % 2))
        u = ultralytics_sample(ul_ds, i, rng, monkeypatch)
        ours.sample_rng = lambda index, epoch, rng=rng: rng
        v = ours[by_name[Path(ul_ds.im_files[i]).name]]
        where = f"{Path(ul_ds.im_files[i]).name}, scale {rng.scale:.2f}, flip {rng.flip}"
        boxes_seen += assert_same_sample(u, v, where, 160)
        if abs(rng.scale - 1) < 0.1:  # the warps' half-pixel difference is 0.5 * |1 - scale| px: almost none
            diff = np.abs(u["img"].numpy().astype(np.int16) - v["img"].numpy().astype(np.int16))
            assert diff.mean() < 0.5, f"{where}: mean |diff| {diff.mean():.2f}"
            near_one += 1
        compared += 1
    assert compared == 16 and boxes_seen >= 20 and near_one >= 2


def test_mosaic_samples_equal_ultralytics_given_the_same_random_numbers(mosaic_pipelines, monkeypatch):
    """The epochs before ``close_mosaic``: the same four images around the same centre, the same warp."""
    ul_ds, ours = mosaic_pipelines
    assert ours.buffer_size == 0  # partners drawn here, not from a buffer
    ul_index = {Path(f).name: j for j, f in enumerate(ul_ds.im_files)}
    by_name = {j: ul_index[Path(it.im_file).name] for j, it in enumerate(ours.items)}  # vistrain -> ultralytics
    draw = np.random.default_rng(1)
    boxes_seen = cut = 0
    for trial in range(16):
        i = int(draw.integers(len(ours)))
        rng = ScriptedRng(scale=float(draw.uniform(0.5, 1.5)), translate=tuple(draw.uniform(0.4, 0.6, 2)),
                          hsv=draw.uniform(-1, 1, 3), flip=float(trial % 2),
                          others=tuple(int(k) for k in draw.integers(len(ours), size=3)),
                          centre=tuple(int(c) for c in draw.uniform(80, 240, 2)), imgsz=160)
        u = ultralytics_sample(ul_ds, by_name[i], rng, monkeypatch, by_name)
        ours.sample_rng = lambda index, epoch, rng=rng: rng
        v = ours[i]
        where = f"mosaic of {i} and {rng.others}, centre {rng.centre}, scale {rng.scale:.2f}, flip {rng.flip}"
        boxes_seen += assert_same_sample(u, v, where, 160)
        b = v["bboxes"].numpy()  # boxes cut by the output's border (clipped polygons): the parts that differ most
        cut += int(((b[:, :2] - b[:, 2:] / 2 <= 1e-3) | (b[:, :2] + b[:, 2:] / 2 >= 1 - 1e-3)).any(1).sum())
    assert boxes_seen >= 40 and cut >= 5
