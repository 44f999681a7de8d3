"""YOLO-style detection / segmentation augmentations: pure functions on numpy images and labels.

An image is ``ndarray[H, W, 3]`` uint8 (RGB).  Its labels are :class:`Instances`: ``cls (ndarray[N])``,
``boxes (ndarray[N, 4])`` float32 x1 y1 x2 y2 and ``segments`` (N float32 ``[K_i, 2]`` polygons, or an
empty list when the dataset has none; a ``[0, 2]`` entry marks a box-only row), all in pixels of the
image they belong to.  Coordinates are continuous: pixel ``(row i, column j)`` covers
``[j, j + 1) x [i, i + 1)``, so the box ``0 0 W H`` is the whole image.  Image warps are corrected by
half a pixel so that labels and pixels move together exactly.

Every random function takes an explicit ``rng`` (``np.random.Generator``) and always draws the same
amount of numbers from it, whatever the gains, so a seed gives the same geometry with or without
colour jitter.  No function modifies its inputs.  After a geometric transform a box is recomputed
from its polygon clipped to the output image (Sutherland-Hodgman), or, for a box-only row, from its
rectangle's four corners transformed and clipped the same way: the box of what stays visible.

The composition (:class:`DetectAugment`) follows YOLOv5's training recipe: mosaic -> random
perspective -> mixup -> HSV -> flips, or letterbox -> random perspective without mosaic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import cv2
import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:
    import torch

PAD_VALUE = 114
POLYGON_AREA_THR, BOX_AREA_THR = 0.01, 0.1  # random_perspective keeps objects down to this share of their area
PAD_COLOR = (PAD_VALUE, PAD_VALUE, PAD_VALUE)


# ------------------------------------------------------------------------------------ labels
@dataclass
class Instances:
    """Labels of one image, aligned row by row.

    cls (ndarray[N]): class index of each object (int or float dtype, kept as given).
    boxes (ndarray[N, 4]): float32 x1 y1 x2 y2 in pixels.
    segments (list of N ndarray[K_i, 2]): float32 polygons in pixels; ``[]`` when there are none,
        and a ``[0, 2]`` entry for a row that only has a box.
    """

    cls: np.ndarray
    boxes: np.ndarray
    segments: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cls = np.asarray(self.cls).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.segments = [np.asarray(s, dtype=np.float32).reshape(-1, 2) for s in self.segments]
        if len(self.cls) != len(self.boxes):
            raise ValueError(f"Instances: {len(self.cls)} classes but {len(self.boxes)} boxes")
        if self.segments and len(self.segments) != len(self.boxes):
            raise ValueError(f"Instances: {len(self.segments)} segments for {len(self.boxes)} boxes "
                             f"(give one polygon per box, [0, 2] for a box-only row, or none at all)")

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls, cls_dtype=np.int64) -> Instances:
        """No objects (a background image)."""
        return cls(np.zeros(0, cls_dtype), np.zeros((0, 4), np.float32), [])

    @property
    def has_segments(self) -> bool:
        return bool(self.segments)

    def copy(self) -> Instances:
        return Instances(self.cls.copy(), self.boxes.copy(), [s.copy() for s in self.segments])

    def select(self, index) -> Instances:
        """The rows picked by a boolean mask or integer indices, in that order."""
        rows = np.arange(len(self))[index]
        segments = [self.segments[i] for i in rows] if self.segments else []
        return Instances(self.cls[rows], self.boxes[rows], segments)

    @classmethod
    def concat(cls, items: Sequence[Instances]) -> Instances:
        """All rows of ``items`` in order; box-only parts get ``[0, 2]`` segments when others have polygons."""
        items = list(items)
        if not items:
            return cls.empty()
        segments: list[np.ndarray] = []
        if any(it.has_segments for it in items):
            for it in items:
                segments += it.segments if it.has_segments else [np.zeros((0, 2), np.float32)] * len(it)
        return cls(np.concatenate([it.cls for it in items]), np.concatenate([it.boxes for it in items]), segments)

    @classmethod
    def from_yolo(cls, classes: np.ndarray, boxes_cxcywh: np.ndarray, segments: Sequence[np.ndarray],
                  width: float, height: float) -> Instances:
        """From YOLO label rows normalised to 0..1 (``boxes_cxcywh (ndarray[N, 4])`` cx cy w h, polygons
        ``[K, 2]`` x y) to pixels of a ``width`` x ``height`` image.  Without any polygon, segments are ``[]``."""
        b = np.asarray(boxes_cxcywh, dtype=np.float32).reshape(-1, 4)
        xy, half = b[:, :2], b[:, 2:] / 2
        boxes = np.concatenate((xy - half, xy + half), 1) * np.array([width, height] * 2, np.float32)
        wh = np.array([width, height], np.float32)
        segs = [np.asarray(s, np.float32).reshape(-1, 2) * wh for s in segments]
        return cls(classes, boxes, segs if any(len(s) for s in segs) else [])

    def normalized_cxcywh(self, width: float, height: float) -> np.ndarray:
        """``boxes`` as ``ndarray[N, 4]`` cx cy w h normalised by the image's ``width`` and ``height``."""
        b = self.boxes
        out = np.concatenate(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), 1)
        return (out / np.array([width, height] * 2, np.float32)).astype(np.float32)


# ------------------------------------------------------------------------------------ geometry
def _transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``points (ndarray[K, 2])`` through the 3x3 homogeneous ``matrix`` -> ``ndarray[K, 2]`` float64."""
    xy = points.astype(np.float64) @ matrix[:2, :2].T + matrix[:2, 2]
    if matrix[2, 0] or matrix[2, 1]:
        w = points.astype(np.float64) @ matrix[2, :2] + matrix[2, 2]
        xy = xy / np.maximum(w, 1e-9)[:, None]  # points behind the camera do not occur for perspective <= 1e-3
    return xy


def clip_polygon(polygon: np.ndarray, width: float, height: float) -> np.ndarray:
    """The part of ``polygon (ndarray[K, 2])`` inside ``[0, width] x [0, height]`` -> ``ndarray[K', 2]`` float32.

    Sutherland-Hodgman against the 4 sides; exact for any polygon (a concave one may get edges along
    the border).  An empty result (``[0, 2]``) means the polygon lies outside.
    """
    pts = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if not len(pts) or (pts.min(0) >= 0).all() and pts[:, 0].max() <= width and pts[:, 1].max() <= height:
        return pts.astype(np.float32)
    for axis, limit, sign in ((0, 0.0, 1.0), (0, width, -1.0), (1, 0.0, 1.0), (1, height, -1.0)):
        dist = sign * (pts[:, axis] - limit)  # >= 0 inside this side
        inside = dist >= 0
        if inside.all():
            continue
        if not inside.any():
            return np.zeros((0, 2), np.float32)
        nxt, dist_next = np.roll(pts, -1, 0), np.roll(dist, -1)
        crosses = inside != np.roll(inside, -1)
        t = dist / np.where(crosses, dist - dist_next, 1.0)
        hit = pts + (nxt - pts) * t[:, None]
        hit[:, axis] = limit
        # edge i -> i+1 emits its start if inside, then the crossing point if it crosses
        pts = np.stack((pts, hit), 1)[np.stack((inside, crosses), 1)]
    return np.clip(pts, 0, [width, height]).astype(np.float32)


def _bbox(polygon: np.ndarray) -> np.ndarray:  # xyxy of a [K, 2] polygon; zeros when empty
    return np.concatenate((polygon.min(0), polygon.max(0))) if len(polygon) else np.zeros(4)


def _box_corners(boxes: np.ndarray) -> np.ndarray:
    """``boxes (ndarray[N, 4])`` xyxy -> their corners ``ndarray[N, 4, 2]``, clockwise from top-left."""
    return boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)


def _is_axis_aligned(matrix: np.ndarray) -> bool:
    return not (matrix[0, 1] or matrix[1, 0] or matrix[2, 0] or matrix[2, 1])


def transform_instances(inst: Instances, matrix: np.ndarray, width: float, height: float) -> Instances:
    """Move ``inst`` by the 3x3 pixel ``matrix`` onto a ``width`` x ``height`` image, clipping to it.

    Boxes are the bounding boxes of the clipped polygons (or of the clipped transformed box rectangle
    for box-only rows).  Rows left with nothing visible get zero-size boxes; nothing is dropped here.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = len(inst)
    limits = np.array([width, height] * 2)
    boxes = np.zeros((n, 4))
    polygon_rows = [i for i, s in enumerate(inst.segments) if len(s)]
    box_rows = np.setdiff1d(np.arange(n), np.array(polygon_rows, dtype=np.int64))
    if len(box_rows) and _is_axis_aligned(matrix):
        xy = _transform_points(inst.boxes[box_rows].reshape(-1, 2), matrix).reshape(-1, 4)
        boxes[box_rows] = np.concatenate((np.minimum(xy[:, :2], xy[:, 2:]), np.maximum(xy[:, :2], xy[:, 2:])), 1)
        boxes[box_rows] = boxes[box_rows].clip(0, limits)
    elif len(box_rows):
        corners = _transform_points(_box_corners(inst.boxes[box_rows]).reshape(-1, 2), matrix).reshape(-1, 4, 2)
        for i, quad in zip(box_rows, corners):
            boxes[i] = _bbox(clip_polygon(quad, width, height))
    segments = [s.copy() for s in inst.segments]
    if polygon_rows:
        sizes = np.array([len(inst.segments[i]) for i in polygon_rows])
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        moved = _transform_points(np.concatenate([inst.segments[i] for i in polygon_rows]), matrix)
        # most polygons end up wholly inside or wholly outside: their bounds in one pass, only the others clipped
        lo, hi = np.minimum.reduceat(moved, starts), np.maximum.reduceat(moved, starts)
        inside = (lo >= 0).all(1) & (hi[:, 0] <= width) & (hi[:, 1] <= height)
        outside = (hi < 0).any(1) | (lo[:, 0] > width) | (lo[:, 1] > height)
        moved32 = np.split(moved.astype(np.float32), starts[1:])
        for k, i in enumerate(polygon_rows):
            if inside[k]:
                segments[i], boxes[i] = moved32[k], np.concatenate((lo[k], hi[k]))
            elif outside[k]:
                segments[i] = np.zeros((0, 2), np.float32)  # its box stays zero-size
            else:
                segments[i] = clip_polygon(moved[starts[k]:starts[k] + sizes[k]], width, height)
                boxes[i] = _bbox(segments[i])
    return Instances(inst.cls.copy(), boxes.astype(np.float32), segments)


def apply_letterbox(inst: Instances, ratio: tuple[float, float], pad: tuple[float, float]) -> Instances:
    """Labels in pixels of an image resized by ``ratio`` (rx, ry) and padded by ``pad`` (left, top)."""
    rx, ry = ratio
    gain, shift = np.array([rx, ry], np.float32), np.array(pad, np.float32)
    boxes = inst.boxes * np.concatenate((gain, gain)) + np.concatenate((shift, shift))
    return Instances(inst.cls.copy(), boxes, [s * gain + shift for s in inst.segments])


def scale_boxes_back(boxes: np.ndarray | torch.Tensor, ratio: float | tuple[float, float],
                     pad: tuple[float, float], orig_shape: tuple[int, ...]) -> np.ndarray | torch.Tensor:
    """Inverse of :func:`letterbox` for boxes: ``boxes (ndarray or Tensor[N, 4])`` xyxy in letterboxed pixels
    -> the same type in original pixels, clipped to ``orig_shape`` (h0, w0).  ``ratio`` is (rx, ry) or one
    number; ``pad`` is (left, top).  The input is not modified."""
    rx, ry = (ratio, ratio) if np.isscalar(ratio) else ratio
    h0, w0 = orig_shape[:2]
    out = boxes.clone() if hasattr(boxes, "clone") else np.array(boxes, dtype=np.float32).reshape(-1, 4)
    out[..., 0::2] = ((out[..., 0::2] - pad[0]) / rx).clip(0, w0)
    out[..., 1::2] = ((out[..., 1::2] - pad[1]) / ry).clip(0, h0)
    return out


# ------------------------------------------------------------------------------------ resizing
def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area interpolation when shrinking (no aliasing), bilinear when growing."""
    shrink = width * height < img.shape[0] * img.shape[1]
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def load_resized(img: np.ndarray, imgsz: int) -> tuple[np.ndarray, float]:
    """Resize ``img (ndarray[H, W, 3])`` so its long side is ``imgsz`` pixels -> (image, scale).

    Labels follow with ``apply_letterbox(inst, (scale, scale), (0, 0))``.  An image already that size
    is returned as is (not copied)."""
    h, w = img.shape[:2]
    r = imgsz / max(h, w)
    return (img, 1.0) if r == 1 else (_resize(img, max(1, round(w * r)), max(1, round(h * r))), r)


def letterbox(img: np.ndarray, new_shape: int | tuple[int, int], color: tuple[int, int, int] = PAD_COLOR,
              auto: bool = False, scaleup: bool = True, stride: int = 32,
              ) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize ``img (ndarray[H, W, 3])`` keeping its aspect ratio to fit ``new_shape`` (h, w), pad the rest
    with ``color`` (split evenly, the odd pixel right / bottom).

    auto: pad only to the next multiple of ``stride`` instead of to ``new_shape``.
    scaleup: allow enlarging (False: only shrink, as for validation).
    Returns (image, ratio (rx, ry) = output / input size of the resized content, pad (left, top) in pixels).
    """
    h, w = img.shape[:2]
    nh, nw = (new_shape, new_shape) if isinstance(new_shape, int) else (int(new_shape[0]), int(new_shape[1]))
    r = min(nh / h, nw / w)
    if not scaleup:
        r = min(r, 1.0)
    uw, uh = max(1, round(w * r)), max(1, round(h * r))
    dw, dh = nw - uw, nh - uh
    if auto:
        dw, dh = dw % stride, dh % stride
    left, top = dw // 2, dh // 2
    out = img if (uw, uh) == (w, h) else _resize(img, uw, uh)
    if dw or dh:
        out = cv2.copyMakeBorder(out, top, dh - top, left, dw - left, cv2.BORDER_CONSTANT, value=tuple(color))
    elif out is img:
        out = img.copy()
    return out, (uw / w, uh / h), (left, top)


# ------------------------------------------------------------------------------------ mosaic
def mosaic4(samples: Sequence[tuple[np.ndarray, Instances]], imgsz: int, rng: np.random.Generator,
            ) -> tuple[np.ndarray, Instances]:
    """Four (image, labels) samples (long side ``imgsz``) around a random centre of a 2*imgsz square canvas.

    The centre (xc, yc) is uniform in [0.5, 1.5] * imgsz; sample 0 ends at the centre from the top-left,
    1 top-right, 2 bottom-left, 3 bottom-right; what falls off the canvas is cut, the rest filled with 114.
    Labels are clipped to the canvas; rows with nothing visible are dropped.
    Returns (image ``ndarray[2*imgsz, 2*imgsz, 3]``, labels in its pixels).
    """
    if len(samples) != 4:
        raise ValueError(f"mosaic4 needs 4 samples, got {len(samples)}")
    size = 2 * imgsz
    xc, yc = (int(v) for v in rng.uniform(0.5 * imgsz, 1.5 * imgsz, size=2))
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    parts = []
    for k, (img, inst) in enumerate(samples):
        h, w = img.shape[:2]
        x0 = xc - w if k in (0, 2) else xc  # top-left corner of the image on the canvas (may be negative)
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
        if cx2 > cx1 and cy2 > cy1:
            canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0:cy2 - y0, cx1 - x0:cx2 - x0, :3]
        shift = np.array([[1, 0, x0], [0, 1, y0], [0, 0, 1]], dtype=np.float64)
        parts.append(transform_instances(inst, shift, size, size))
    out = Instances.concat(parts)
    visible = (out.boxes[:, 2] > out.boxes[:, 0]) & (out.boxes[:, 3] > out.boxes[:, 1])
    return canvas, out.select(visible)


# ------------------------------------------------------------------------------------ perspective
def _random_matrix(rng: np.random.Generator, in_shape: tuple[int, int], out_shape: tuple[int, int],
                   degrees: float, translate: float, scale: float, shear: float, perspective: float,
                   ) -> tuple[np.ndarray, float]:
    """A random 3x3 pixel matrix (input -> output image) and its scale gain.

    Composition, applied right to left: move the input centre to the origin, perspective, rotation
    and scale, shear, then translate to (0.5 +/- translate) of the output size.
    """
    h, w = in_shape
    oh, ow = out_shape
    centre = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]], dtype=np.float64)
    persp = np.eye(3)
    persp[2, :2] = rng.uniform(-perspective, perspective, size=2)
    angle = math.radians(rng.uniform(-degrees, degrees))
    gain = rng.uniform(1 - scale, 1 + scale)
    c, s = gain * math.cos(angle), gain * math.sin(angle)
    rot = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], dtype=np.float64)
    sh = np.eye(3)  # x shear, y shear
    sh[0, 1], sh[1, 0] = np.tan(np.radians(rng.uniform(-shear, shear, size=2)))
    tx, ty = rng.uniform(0.5 - translate, 0.5 + translate, size=2)
    move = np.array([[1, 0, tx * ow], [0, 1, ty * oh], [0, 0, 1]], dtype=np.float64)
    return move @ sh @ rot @ persp @ centre, gain


def box_candidates(before: np.ndarray, after: np.ndarray, wh_thr: float = 2.0, ar_thr: float = 100.0,
                   area_thr: float | np.ndarray = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Which transformed boxes to keep -> ``ndarray[N]`` bool.

    before (ndarray[N, 4]): xyxy before the transform, already multiplied by its scale gain.
    after (ndarray[N, 4]): xyxy after the transform and clipping.
    Keep a box whose width and height exceed ``wh_thr`` pixels, whose area is more than ``area_thr``
    (one number, or one per row) of the scaled area before (so mostly cut-off objects go) and whose
    aspect ratio is below ``ar_thr``.
    """
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def _shift_half_pixel(matrix: np.ndarray) -> np.ndarray:
    """A matrix on continuous coordinates -> the same map on OpenCV's pixel-centre coordinates."""
    to_centre, from_centre = np.eye(3), np.eye(3)
    to_centre[:2, 2], from_centre[:2, 2] = -0.5, 0.5
    return to_centre @ matrix @ from_centre


def warp_image(img: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """``img`` through the 3x3 continuous-pixel ``matrix`` onto a ``width`` x ``height`` canvas of 114 (bilinear)."""
    m = _shift_half_pixel(np.asarray(matrix, dtype=np.float64))
    if not (m[2, 0] or m[2, 1]):
        return cv2.warpAffine(img, m[:2], (width, height), flags=cv2.INTER_LINEAR, borderValue=PAD_COLOR)
    return cv2.warpPerspective(img, m, (width, height), flags=cv2.INTER_LINEAR, borderValue=PAD_COLOR)


def random_perspective(img: np.ndarray, inst: Instances, rng: np.random.Generator, degrees: float = 0.0,
                       translate: float = 0.1, scale: float = 0.5, shear: float = 0.0, perspective: float = 0.0,
                       border: tuple[int, int] = (0, 0), out_size: int | tuple[int, int] | None = None,
                       area_thr: float | None = None) -> tuple[np.ndarray, Instances]:
    """Random rotation (+/- ``degrees``), scale (gain in 1 +/- ``scale``), shear (+/- ``shear`` degrees),
    perspective (+/- ``perspective``, keep <= 0.001) and translation (+/- ``translate`` of the output size).

    The output is ``out_size`` (h, w) or, by default, the input size plus ``2 * border`` (rows, cols):
    ``border=(-imgsz // 2, -imgsz // 2)`` crops a 2*imgsz mosaic to imgsz.  Labels move with the pixels;
    rows failing :func:`box_candidates` (tiny, mostly cut off, or too thin) are dropped.  ``area_thr`` (the
    visible share of the scaled object below which it is dropped) defaults, as in ultralytics and YOLOv5-seg, to
    1% for a row with a polygon, whose box is refit to the polygon's visible part, and 10% for a box-only row,
    whose box is the loose box of its transformed corners.
    Returns (image ``ndarray[oh, ow, 3]`` uint8, labels).
    """
    h, w = img.shape[:2]
    if out_size is None:
        out_size = (h + 2 * border[0], w + 2 * border[1])
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    matrix, gain = _random_matrix(rng, (h, w), (oh, ow), degrees, translate, scale, shear, perspective)
    out = warp_image(img, matrix, ow, oh)
    moved = transform_instances(inst, matrix, ow, oh)
    if area_thr is None:
        polygon = [len(s) > 0 for s in inst.segments] if inst.segments else [False] * len(inst)
        area_thr = np.where(np.asarray(polygon, dtype=bool), POLYGON_AREA_THR, BOX_AREA_THR)
    keep = box_candidates(inst.boxes * gain, moved.boxes, area_thr=area_thr)
    return out, moved.select(keep)


# ------------------------------------------------------------------------------------ colour, flips, mixup
def augment_hsv(img: np.ndarray, rng: np.random.Generator, hgain: float = 0.015, sgain: float = 0.7,
                vgain: float = 0.4) -> np.ndarray:
    """Random hue / saturation / value jitter of an RGB uint8 image, through look-up tables on its OpenCV HSV
    (hue 0..179): hue shifted by one offset uniform in +/- ``hgain`` x 180 for every pixel (wrapping around),
    saturation and value multiplied by gains uniform in 1 +/- ``sgain`` and 1 +/- ``vgain``.

    The hue shift is additive, as in ultralytics >= 8.3.79: every hue moves by the same amount.  YOLOv5's
    multiplicative hue gain moved red (hue near 0) not at all and blue by +/- 1.8, and merged neighbouring hues.
    Returns a new image; three numbers are drawn from ``rng`` even when all gains are 0."""
    r = rng.uniform(-1, 1, size=3) * np.array([hgain, sgain, vgain])
    if not (hgain or sgain or vgain):
        return img.copy()
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
    x = np.arange(256, dtype=np.float64)
    luts = (np.mod(np.floor(x + r[0] * 180), 180), np.clip(x * (1 + r[1]), 0, 255), np.clip(x * (1 + r[2]), 0, 255))
    hsv = cv2.merge([cv2.LUT(ch, lut.astype(np.uint8)) for ch, lut in zip((hue, sat, val), luts)])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def flip_lr(img: np.ndarray, inst: Instances) -> tuple[np.ndarray, Instances]:
    """Mirror left-right: x -> W - x."""
    w, b = img.shape[1], inst.boxes
    boxes = np.stack((w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]), 1)
    segments = [np.stack((w - s[:, 0], s[:, 1]), 1) for s in inst.segments]
    return np.ascontiguousarray(img[:, ::-1]), Instances(inst.cls.copy(), boxes, segments)


def flip_ud(img: np.ndarray, inst: Instances) -> tuple[np.ndarray, Instances]:
    """Mirror top-bottom: y -> H - y."""
    h, b = img.shape[0], inst.boxes
    boxes = np.stack((b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]), 1)
    segments = [np.stack((s[:, 0], h - s[:, 1]), 1) for s in inst.segments]
    return np.ascontiguousarray(img[::-1]), Instances(inst.cls.copy(), boxes, segments)


def random_flips(img: np.ndarray, inst: Instances, rng: np.random.Generator, fliplr: float = 0.5,
                 flipud: float = 0.0) -> tuple[np.ndarray, Instances]:
    """Up-down flip with probability ``flipud``, then left-right with probability ``fliplr`` (two draws always)."""
    do_ud, do_lr = rng.random(2) < np.array([flipud, fliplr])
    if do_ud:
        img, inst = flip_ud(img, inst)
    if do_lr:
        img, inst = flip_lr(img, inst)
    if not (do_ud or do_lr):
        img, inst = img.copy(), inst.copy()
    return img, inst


def mixup(sample_a: tuple[np.ndarray, Instances], sample_b: tuple[np.ndarray, Instances],
          rng: np.random.Generator, alpha: float = 32.0) -> tuple[np.ndarray, Instances]:
    """Blend two same-size images, ``r * a + (1 - r) * b`` with r ~ Beta(alpha, alpha) (rounded, uint8);
    the labels are both samples' rows, a's first."""
    (img_a, inst_a), (img_b, inst_b) = sample_a, sample_b
    if img_a.shape != img_b.shape:
        raise ValueError(f"mixup needs images of one size, got {img_a.shape} and {img_b.shape}")
    r = float(rng.beta(alpha, alpha))
    return cv2.addWeighted(img_a, r, img_b, 1.0 - r, 0.0), Instances.concat([inst_a, inst_b])


# ------------------------------------------------------------------------------------ composition
Loader = Callable[[int], tuple[np.ndarray, Instances]]


@dataclass
class DetectAugment:
    """YOLOv5's training augmentation, for a Dataset's ``__getitem__``::

        aug = DetectAugment.from_hyp(imgsz, hyp)
        img, inst = aug(index, self.load, len(self), rng)  # img ndarray[imgsz, imgsz, 3] uint8

    ``load(i) -> (img, Instances)`` returns image ``i`` resized so its long side is ``imgsz``
    (:func:`load_resized`; other sizes are resized here) and its labels in those pixels.
    With probability ``mosaic``: ``load`` this and 3 random images, :func:`mosaic4`, random perspective
    cropping back to imgsz, then with probability ``mixup`` blend with a second such mosaic.
    Otherwise: letterbox to imgsz and random perspective.  Then HSV jitter and flips.
    Hyperparameters are named as in YOLOv5 / ultralytics hyp files.
    """

    imgsz: int
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0
    mixup: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flipud", "fliplr", "mosaic", "mixup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: a probability must be in 0..1")
        if self.imgsz < 2:
            raise ValueError(f"imgsz={self.imgsz}: must be at least 2 pixels")

    @classmethod
    def from_hyp(cls, imgsz: int, hyp: Mapping[str, float]) -> DetectAugment:
        """Take the augmentation keys from ``hyp`` (other keys, e.g. loss gains, are ignored)."""
        names = {f.name for f in fields(cls)} - {"imgsz"}
        return cls(imgsz=int(imgsz), **{k: float(v) for k, v in hyp.items() if k in names})

    def __call__(self, index: int, load: Loader, num_samples: int, rng: np.random.Generator,
                 pool: Sequence[int] | None = None) -> tuple[np.ndarray, Instances]:
        """One training sample built around image ``index`` of ``num_samples`` -> (img, labels).

        pool: the indices a mosaic draws its other three images from (with replacement; default: all
        ``num_samples``).  A dataset passes the images it holds decoded, as ultralytics' buffer does."""
        if rng.random() < self.mosaic:
            img, inst = self._mosaic_sample(index, load, num_samples, rng, pool)
            if rng.random() < self.mixup:
                other = self._mosaic_sample(int(rng.integers(num_samples)), load, num_samples, rng, pool)
                img, inst = mixup((img, inst), other, rng)
        else:
            img, inst = self._fit(*load(index))
            img, ratio, pad = letterbox(img, self.imgsz, auto=False, scaleup=True)
            img, inst = self._perspective(img, apply_letterbox(inst, ratio, pad), rng)
        img = augment_hsv(img, rng, self.hsv_h, self.hsv_s, self.hsv_v)
        return random_flips(img, inst, rng, fliplr=self.fliplr, flipud=self.flipud)

    def _fit(self, img: np.ndarray, inst: Instances) -> tuple[np.ndarray, Instances]:
        """A loaded sample with its long side made ``imgsz`` if ``load`` did not."""
        if max(img.shape[:2]) == self.imgsz:
            return img, inst
        h, w = img.shape[:2]
        img, _ = load_resized(img, self.imgsz)
        return img, apply_letterbox(inst, (img.shape[1] / w, img.shape[0] / h), (0, 0))

    def _mosaic_sample(self, index: int, load: Loader, num_samples: int, rng: np.random.Generator,
                       pool: Sequence[int] | None = None) -> tuple[np.ndarray, Instances]:
        if pool is None:
            others = rng.integers(0, num_samples, size=3)
        else:
            others = np.asarray(pool)[rng.integers(0, len(pool), size=3)]
        order = rng.permutation([index, *(int(i) for i in others)])
        img, inst = mosaic4([self._fit(*load(int(i))) for i in order], self.imgsz, rng)
        return self._perspective(img, inst, rng)

    def _perspective(self, img: np.ndarray, inst: Instances, rng: np.random.Generator,
                     ) -> tuple[np.ndarray, Instances]:
        return random_perspective(img, inst, rng, degrees=self.degrees, translate=self.translate, scale=self.scale,
                                  shear=self.shear, perspective=self.perspective, out_size=self.imgsz)


# ------------------------------------------------------------------------------------ masks
def polygon_mask(shape: tuple[int, int], polygons: Sequence[np.ndarray], ratio: int = 1,
                 values: Sequence[int] | None = None, dtype=np.uint8) -> np.ndarray:
    """Rasterise ``polygons`` (``[K, 2]`` x, y in pixels of an image of ``shape`` (h, w)) onto a mask of
    ``ceil(shape / ratio)``.  Each polygon is filled at full resolution as the COCO ground truth is
    (``pycocotools``' polygon rasteriser, the one our validation and ``annotations.json`` score masks against:
    about the pixels whose centre is inside, the polygon's own area on average), within its own bounding box,
    and each ``ratio`` x ``ratio`` block becomes one mask pixel, set when at least half of the block is covered.
    Polygons are drawn in order with ``values`` (default 1), so later ones cover earlier ones.

    Why not ``cv2.fillPoly`` (as ultralytics): it also sets every pixel an edge passes through, so its masks are
    ~6% larger than the polygon at 40 px objects (8-10% after the 1/4 downsampling), and a model trained on
    them predicts masks that much too large for COCO's mask IoU (``bench/README.md``)."""
    h, w = shape
    mh, mw = math.ceil(h / ratio), math.ceil(w / ratio)
    mask = np.zeros((mh, mw), dtype)
    for k, poly in enumerate(polygons):
        if len(poly) < 3:
            continue
        poly = np.asarray(poly, np.float64)
        bx0, by0 = (np.floor(poly.min(0) / ratio).astype(int) - 1).clip(0)  # the polygon's block range
        bx1, by1 = np.minimum(np.ceil(poly.max(0) / ratio).astype(int) + 1, (mw, mh))
        if bx1 <= bx0 or by1 <= by0:
            continue
        lh, lw = (by1 - by0) * ratio, (bx1 - bx0) * ratio
        local_poly = (poly - np.array([bx0, by0]) * ratio).ravel().tolist()
        local = mask_utils.decode(mask_utils.frPyObjects([local_poly], lh, lw))[..., 0]
        if ratio > 1:
            local = local.reshape(by1 - by0, ratio, bx1 - bx0, ratio).mean((1, 3)) >= 0.5
        mask[by0:by1, bx0:bx1][local.astype(bool)] = int(values[k]) if values is not None else 1
    return mask


def instance_masks(inst: Instances, shape: tuple[int, int], ratio: int = 4, overlap: bool = True,
                   ) -> tuple[np.ndarray, Instances]:
    """Training masks of ``inst`` (polygons in pixels of an image of ``shape`` (h, w)) at ``1 / ratio``.

    overlap: one ``ndarray[h / ratio, w / ratio]`` of instance numbers, instances sorted by polygon area,
    largest first, number k + 1 for the k-th, drawn in that order so smaller objects stay visible where
    objects overlap; the returned labels are reordered to match (row k = number k + 1).  Otherwise one
    ``ndarray[N, h / ratio, w / ratio]`` of 0 / 1 per instance, labels unchanged.
    """
    polys = inst.segments if inst.segments else [np.zeros((0, 2), np.float32)] * len(inst)
    if not overlap:
        masks = [polygon_mask(shape, [p], ratio) for p in polys]
        empty = np.zeros((0, math.ceil(shape[0] / ratio), math.ceil(shape[1] / ratio)), np.uint8)
        return (np.stack(masks) if masks else empty), inst
    areas = [abs(float(cv2.contourArea(p.astype(np.float32)))) if len(p) >= 3 else 0.0 for p in polys]
    order = np.argsort(-np.asarray(areas), kind="stable")
    dtype = np.uint8 if len(inst) < 255 else np.int32
    mask = polygon_mask(shape, [polys[i] for i in order], ratio, values=range(1, len(order) + 1), dtype=dtype)
    return mask, inst.select(order)
