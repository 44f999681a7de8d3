"""Built-in synthetic "shapes" dataset.

vistrain uses this dataset in every mode when the user gives no data. It is generated
deterministically from a seed with numpy + Pillow only, and written in several common
on-disk formats so that each task (classify / detect / segment) and each loader
(YOLO txt, Pascal VOC XML, COCO JSON, ImageFolder) can be exercised without downloads.

Every shape is a polygon with integer pixel vertices drawn with ``ImageDraw.polygon``.
The label polygon stores each vertex at the centre of its pixel, ``(v + 0.5) / imgsz``, so
rasterising a label polygon again with ``ImageDraw.polygon`` (which truncates float
coordinates) gives exactly the mask that was painted.

Layout written by :func:`make_dataset` (``idx`` is a global 5-digit index, unique across
splits)::

    out/
      README.txt
      data.yaml                                  # = detect/data.yaml
      classify/{train,val}/<shape>/<idx>.jpg     # ImageFolder, one shape per image
      detect/images/{train,val}/<idx>.jpg        # 1..6 non-overlapping shapes (or none)
      detect/labels/{train,val}/<idx>.txt        # "cls cx cy w h"
      detect/data.yaml
      segment/images/{train,val}/<idx>.jpg       # hard links of the detect images
      segment/labels/{train,val}/<idx>.txt       # "cls x1 y1 x2 y2 ..."
      segment/data.yaml
      voc/JPEGImages/<idx>.jpg                   # hard links of the detect images
      voc/Annotations/<idx>.xml
      voc/ImageSets/Main/{train,val}.txt
      voc/data.yaml
      coco/images/{train,val}/<idx>.jpg          # hard links of the detect images
      coco/annotations/instances_{train,val}.json  # boxes + polygons, category ids 1..6
      coco/data.yaml

The VOC and COCO copies hold the same boxes as ``detect/`` (and COCO the polygons of
``segment/``), so each reader can be checked against the YOLO labels: VOC boxes are the
1-based pixel indices of the painted area's edges, COCO boxes and polygons go through the
centres of the edge pixels (``x0 + 0.5`` .. ``x1 + 0.5`` in pixels, as the YOLO labels).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import yaml
from PIL import Image, ImageDraw

__all__ = [
    "SHAPE_NAMES",
    "ShapeObject",
    "make_dataset",
    "default_dataset_dir",
    "ensure_dataset",
    "dataset_name",
    "render_classify",
    "render_detect",
    "split_layout",
]

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")

# per-set stream ids mixed into the per-image seed
_SET_CLASSIFY = 0
_SET_DETECT = 1

_DETECT_SIZE = (0.06, 0.35)  # circumscribed diameter as a fraction of imgsz
_CLASSIFY_SIZE = (0.50, 0.85)
_CLASSIFY_LINES = (0, 2)  # min, max number of thin background lines
_DETECT_LINES = (2, 6)
_BACKGROUND_FRACTION = 0.03
_JPEG_QUALITY = 90
_CHUNK = 25
_COMPLETE = ".complete"


# ----------------------------------------------------------------------------- geometry
def _unit_polygon(cls: int) -> np.ndarray:
    """Vertices (K, 2) of shape ``cls`` with circumradius ~1 around the origin."""
    name = SHAPE_NAMES[cls]
    if name == "circle":
        k, r, start = 48, np.ones(48), 0.0
    elif name == "square":
        k, r, start = 4, np.ones(4), math.pi / 4
    elif name == "triangle":
        k, r, start = 3, np.ones(3), -math.pi / 2
    elif name == "star":
        k, r, start = 10, np.tile([1.0, 0.42], 5), -math.pi / 2
    elif name == "hexagon":
        k, r, start = 6, np.ones(6), 0.0
    elif name == "cross":
        a = 0.33  # half width of an arm; arm tips at distance 1 along the axes
        pts = np.array(
            [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
             (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)], dtype=np.float64)
        return pts / math.hypot(1.0, a)
    else:  # pragma: no cover
        raise ValueError(name)
    ang = start + 2 * math.pi * np.arange(k) / k
    return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)


_UNIT = [_unit_polygon(c) for c in range(len(SHAPE_NAMES))]


@dataclass
class ShapeObject:
    """One painted shape: class id, integer pixel polygon (K, 2), fill colour, box.

    ``box`` is (x0, y0, x1, y1) in inclusive integer pixel indices of the painted area.
    """

    cls: int
    polygon: np.ndarray
    color: tuple[int, int, int]
    box: tuple[int, int, int, int]

    def yolo_polygon(self, imgsz: int) -> np.ndarray:
        """Normalised polygon (vertices at pixel centres)."""
        return (self.polygon.astype(np.float64) + 0.5) / imgsz

    def yolo_box(self, imgsz: int) -> tuple[float, float, float, float]:
        """Normalised (cx, cy, w, h): the bounding box of :meth:`yolo_polygon`."""
        x0, y0, x1, y1 = ((np.asarray(self.box, dtype=np.float64) + 0.5) / imgsz).tolist()
        return (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0


def _shape_offsets(rng: np.random.Generator, cls: int, diameter: float) -> np.ndarray:
    """Rotated, scaled, integer-rounded vertex offsets relative to an integer centre."""
    theta = rng.uniform(0.0, 2 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    pts = _UNIT[cls] @ rot.T * (diameter / 2.0)
    return np.rint(pts).astype(np.int64)


def _place(rng: np.random.Generator, off: np.ndarray, imgsz: int) -> np.ndarray:
    """Random integer translation keeping every vertex inside [0, imgsz-1]."""
    lo = -off.min(axis=0)
    hi = imgsz - 1 - off.max(axis=0)
    cx = int(rng.integers(lo[0], hi[0] + 1))
    cy = int(rng.integers(lo[1], hi[1] + 1))
    return off + np.array([cx, cy])


def _box(poly: np.ndarray) -> tuple[int, int, int, int]:
    x0, y0 = poly.min(axis=0).tolist()
    x1, y1 = poly.max(axis=0).tolist()
    return int(x0), int(y0), int(x1), int(y1)


# ----------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, imgsz: int, lines: tuple[int, int]) -> np.ndarray:
    """Textured background (H, W, 3) uint8: two-colour gradient + noise + thin lines."""
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    c2 = rng.uniform(0, 255, 3).astype(np.float32)
    phi = rng.uniform(0.0, 2 * math.pi)
    sigma = rng.uniform(2.0, 6.0)
    # linear gradient t = (cos(phi) x + sin(phi) y - tmin) / (tmax - tmin) over [0, 1]^2,
    # colour = c1 + t (c2 - c1), split into a per-column and a per-row term (channels first)
    coords = np.arange(imgsz, dtype=np.float32) / max(imgsz - 1, 1)
    a, b = math.cos(phi), math.sin(phi)
    tmin = min(0.0, a) + min(0.0, b)
    span = max(abs(a) + abs(b), 1e-6)
    d = (c2 - c1)[:, None]
    col = c1[:, None] + d * ((a * coords - tmin) / span)[None, :]  # (3, W)
    row = d * (b * coords / span)[None, :]  # (3, H)
    chw = row[:, :, None] + col[:, None, :]
    chw += rng.standard_normal((imgsz, imgsz), dtype=np.float32) * np.float32(sigma)
    np.clip(chw, 0, 255, out=chw)
    chw = chw.astype(np.uint8)
    im = Image.merge("RGB", [Image.fromarray(ch, "L") for ch in chw])
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(lines[0], lines[1] + 1))):
        p = rng.uniform(-0.1 * imgsz, 1.1 * imgsz, 4).tolist()
        colr = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line(p, fill=colr, width=int(rng.integers(1, 3)))
    return np.asarray(im)


def _contrast_color(rng: np.random.Generator, bg: np.ndarray,
                    box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """Random fill colour clearly distinct from the background under ``box``."""
    x0, y0, x1, y1 = box
    region = bg[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3).astype(np.float32)
    mean = region.mean(axis=0)
    # the gradient can vary across a large box: also check the box corners
    corners = np.stack([bg[y0, x0], bg[y0, x1], bg[y1, x0], bg[y1, x1]]).astype(np.float32)
    best, best_d = None, -1.0
    for _ in range(64):
        col = rng.integers(0, 256, 3).astype(np.float32)
        d_mean = float(np.linalg.norm(col - mean))
        d_corner = float(np.linalg.norm(corners - col, axis=1).min())
        if d_mean >= 110.0 and d_corner >= 70.0:
            return tuple(int(v) for v in col)
        d = min(d_mean, d_corner)
        if d > best_d:
            best, best_d = col, d
    # fallback: the farther of black / white / best random candidate
    for cand in (np.zeros(3, np.float32), np.full(3, 255, np.float32)):
        d = min(float(np.linalg.norm(cand - mean)),
                float(np.linalg.norm(corners - cand, axis=1).min()))
        if d > best_d:
            best, best_d = cand, d
    return tuple(int(v) for v in best)


def _rng(seed: int, set_id: int, idx: int) -> np.random.Generator:
    seed = int(seed)
    return np.random.default_rng([abs(seed), int(seed < 0), set_id, int(idx)])


def render_classify(seed: int, idx: int, imgsz: int) -> tuple[Image.Image, ShapeObject]:
    """Classification image ``idx``: one large shape of class ``idx % 6``."""
    rng = _rng(seed, _SET_CLASSIFY, idx)
    cls = idx % len(SHAPE_NAMES)
    bg = _background(rng, imgsz, _CLASSIFY_LINES)
    diameter = rng.uniform(*_CLASSIFY_SIZE) * imgsz
    poly = _place(rng, _shape_offsets(rng, cls, diameter), imgsz)
    box = _box(poly)
    color = _contrast_color(rng, bg, box)
    im = Image.fromarray(bg, "RGB")
    ImageDraw.Draw(im).polygon([tuple(p) for p in poly.tolist()], fill=color)
    return im, ShapeObject(cls, poly, color, box)


def render_detect(seed: int, idx: int, imgsz: int,
                  background: bool = False) -> tuple[Image.Image, list[ShapeObject]]:
    """Detection image ``idx``: 1..6 non-overlapping shapes, or none if ``background``."""
    rng = _rng(seed, _SET_DETECT, idx)
    bg = _background(rng, imgsz, _DETECT_LINES)
    im = Image.fromarray(bg, "RGB")
    objs: list[ShapeObject] = []
    if background:
        return im, objs
    margin = max(2, int(round(0.01 * imgsz)))
    k = int(rng.integers(1, len(SHAPE_NAMES) + 1))
    for _ in range(k):
        cls = int(rng.integers(0, len(SHAPE_NAMES)))
        for _attempt in range(50):
            diameter = rng.uniform(*_DETECT_SIZE) * imgsz
            poly = _place(rng, _shape_offsets(rng, cls, diameter), imgsz)
            box = _box(poly)
            if all(box[0] > o.box[2] + margin or o.box[0] > box[2] + margin
                   or box[1] > o.box[3] + margin or o.box[1] > box[3] + margin
                   for o in objs):
                objs.append(ShapeObject(cls, poly, (0, 0, 0), box))
                break
    draw = ImageDraw.Draw(im)
    for o in objs:
        o.color = _contrast_color(rng, bg, o.box)
        draw.polygon([tuple(p) for p in o.polygon.tolist()], fill=o.color)
    return im, objs


# ----------------------------------------------------------------------------- splits
def split_layout(n: int, val_fraction: float) -> tuple[int, set[int]]:
    """Return (n_train, background_indices). Indices < n_train are train, the rest val.

    Each split with at least two images gets >= 1 background image (~3%), spread evenly.
    """
    n = int(n)
    n_val = int(round(n * float(val_fraction)))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    n_val = min(max(n_val, 0), n)
    n_train = n - n_val
    bgs: set[int] = set()
    for start, count in ((0, n_train), (n_train, n_val)):
        if count < 2:
            continue
        n_bg = max(1, int(round(_BACKGROUND_FRACTION * count)))
        bgs.update(start + int((i + 0.5) * count / n_bg) for i in range(n_bg))
    return n_train, bgs


# ----------------------------------------------------------------------------- writing
def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.unlink()
    except FileNotFoundError:
        pass
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _voc_xml(name: str, imgsz: int, objs: list[ShapeObject]) -> str:
    lines = [
        "<annotation>",
        "  <folder>VOC</folder>",
        f"  <filename>{escape(name)}</filename>",
        "  <source><database>vistrain synthetic shapes</database></source>",
        f"  <size><width>{imgsz}</width><height>{imgsz}</height><depth>3</depth></size>",
        "  <segmented>0</segmented>",
    ]
    for o in objs:
        x0, y0, x1, y1 = o.box  # 0-based inclusive pixel indices -> VOC 1-based
        lines += [
            "  <object>",
            f"    <name>{SHAPE_NAMES[o.cls]}</name>",
            "    <pose>Unspecified</pose>",
            "    <truncated>0</truncated>",
            "    <difficult>0</difficult>",
            f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox>",
            "  </object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _write_classify(out: Path, seed: int, imgsz: int, idxs: list[int], n_train: int) -> int:
    for idx in idxs:
        im, obj = render_classify(seed, idx, imgsz)
        split = "train" if idx < n_train else "val"
        im.save(out / "classify" / split / SHAPE_NAMES[obj.cls] / f"{idx:05d}.jpg",
                "JPEG", quality=_JPEG_QUALITY)
    return len(idxs)


def _coco_annotation(idx: int, o: ShapeObject) -> dict:
    """COCO annotation of a shape (``id`` set later): box and polygon through the centres of the edge pixels."""
    x0, y0, x1, y1 = o.box
    poly = o.polygon.astype(np.float64) + 0.5
    x, y = poly[:, 0], poly[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return {"image_id": idx, "category_id": o.cls + 1, "bbox": [x0 + 0.5, y0 + 0.5, float(x1 - x0), float(y1 - y0)],
            "area": area, "iscrowd": 0, "segmentation": [poly.reshape(-1).tolist()]}


def _write_detect(out: Path, seed: int, imgsz: int, idxs: list[int], n_train: int,
                  backgrounds: set[int]) -> list[tuple[str, dict, list[dict]]]:
    """Write the images and labels of ``idxs``; return their COCO records ``(split, image, annotations)``."""
    coco = []
    for idx in idxs:
        im, objs = render_detect(seed, idx, imgsz, background=idx in backgrounds)
        split = "train" if idx < n_train else "val"
        stem = f"{idx:05d}"
        img_path = out / "detect" / "images" / split / f"{stem}.jpg"
        im.save(img_path, "JPEG", quality=_JPEG_QUALITY)
        det_rows, seg_rows = [], []
        for o in objs:
            cx, cy, w, h = o.yolo_box(imgsz)
            det_rows.append(f"{o.cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
            coords = " ".join(f"{v:.6f}" for v in o.yolo_polygon(imgsz).reshape(-1).tolist())
            seg_rows.append(f"{o.cls} {coords}\n")
        (out / "detect" / "labels" / split / f"{stem}.txt").write_text("".join(det_rows))
        (out / "segment" / "labels" / split / f"{stem}.txt").write_text("".join(seg_rows))
        _link_or_copy(img_path, out / "segment" / "images" / split / f"{stem}.jpg")
        _link_or_copy(img_path, out / "voc" / "JPEGImages" / f"{stem}.jpg")
        (out / "voc" / "Annotations" / f"{stem}.xml").write_text(
            _voc_xml(f"{stem}.jpg", imgsz, objs))
        _link_or_copy(img_path, out / "coco" / "images" / split / f"{stem}.jpg")
        coco.append((split, {"id": idx, "file_name": f"{stem}.jpg", "width": imgsz, "height": imgsz},
                     [_coco_annotation(idx, o) for o in objs]))
    return coco


def _run_task(task: tuple) -> int | list:
    kind, *args = task
    if kind == "classify":
        return _write_classify(*args)
    return _write_detect(*args)


def _write_coco(out: Path, records: list[tuple[str, dict, list[dict]]]) -> None:
    """``coco/annotations/instances_{train,val}.json`` from the per-image records, annotation ids 1.. per file."""
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_NAMES)]
    for split in ("train", "val"):
        images, annotations = [], []
        for s, image, anns in sorted(records, key=lambda r: r[1]["id"]):
            if s == split:
                images.append(image)
                annotations += [{"id": len(annotations) + k + 1, **a} for k, a in enumerate(anns)]
        doc = {"info": {"description": "vistrain synthetic shapes"}, "images": images, "annotations": annotations,
               "categories": categories}
        (out / "coco" / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def _write_yaml(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False, default_flow_style=False)


def _build(out: Path, final: Path, n: int, imgsz: int, seed: int, val_fraction: float,
           workers: int) -> None:
    n, imgsz = int(n), int(imgsz)
    if n < 0 or imgsz < 16:
        raise ValueError(f"need n >= 0 and imgsz >= 16, got n={n} imgsz={imgsz}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_train, backgrounds = split_layout(n, val_fraction)
    splits = ("train", "val")
    for s in splits:
        for name in SHAPE_NAMES:
            (out / "classify" / s / name).mkdir(parents=True, exist_ok=True)
        for task in ("detect", "segment"):
            for sub in ("images", "labels"):
                (out / task / sub / s).mkdir(parents=True, exist_ok=True)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / "voc" / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("images/train", "images/val", "annotations"):
        (out / "coco" / sub).mkdir(parents=True, exist_ok=True)

    tasks: list[tuple] = []
    for i in range(0, n, _CHUNK):
        idxs = list(range(i, min(i + _CHUNK, n)))
        tasks.append(("detect", out, seed, imgsz, idxs, n_train, backgrounds))
        tasks.append(("classify", out, seed, imgsz, idxs, n_train))
    workers = int(workers or 1)
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(workers, len(tasks))) as ex:
            results = list(ex.map(_run_task, tasks))
    else:
        results = [_run_task(t) for t in tasks]
    _write_coco(out, [r for chunk in results if isinstance(chunk, list) for r in chunk])

    ids = {"train": range(0, n_train), "val": range(n_train, n)}
    for s in splits:
        (out / "voc" / "ImageSets" / "Main" / f"{s}.txt").write_text(
            "".join(f"{i:05d}\n" for i in ids[s]))

    names = {i: name for i, name in enumerate(SHAPE_NAMES)}
    for task in ("detect", "segment"):
        _write_yaml(out / task / "data.yaml", {
            "path": str(final / task), "train": "images/train", "val": "images/val",
            "names": names})
    _write_yaml(out / "voc" / "data.yaml", {
        "path": str(final / "voc"), "format": "voc",
        "train": "ImageSets/Main/train.txt", "val": "ImageSets/Main/val.txt",
        "images": "JPEGImages", "annotations": "Annotations", "names": names})
    _write_yaml(out / "coco" / "data.yaml", {
        "path": str(final / "coco"), "format": "coco",
        "train": "annotations/instances_train.json", "val": "annotations/instances_val.json", "names": names})
    shutil.copyfile(out / "detect" / "data.yaml", out / "data.yaml")

    n_bg = len(backgrounds)
    (out / "README.txt").write_text(
        "vistrain synthetic 'shapes' dataset, generated by vistrain.data.synthetic.make_dataset"
        f"(n={n}, imgsz={imgsz}, seed={seed}, val_fraction={val_fraction}). It holds {n} "
        f"classification images (classify/, ImageFolder layout, one shape per image, classes "
        f"{', '.join(SHAPE_NAMES)} assigned round-robin) and {n} detection images ({n_train} "
        f"train / {n - n_train} val, 1-6 non-overlapping shapes each, {n_bg} background images "
        "with empty label files) stored with YOLO box labels (detect/), YOLO polygon labels "
        "over the same hard-linked images (segment/), Pascal VOC XML (voc/) and COCO instances "
        "JSON with boxes and polygons (coco/); data.yaml at "
        "the top is the default detection dataset. Every shape is an integer-vertex polygon "
        "painted with PIL, and label polygons put each vertex at its pixel centre, so the "
        "polygon is the exact mask. All images are RGB JPEG (quality 90), "
        f"{imgsz}x{imgsz}, and the content is fully determined by the arguments above.\n")


# ----------------------------------------------------------------------------- public API
def make_dataset(out: str | Path, n: int = 1000, imgsz: int = 320, seed: int = 0,
                 val_fraction: float = 0.2, workers: int = 2) -> Path:
    """Write the dataset under ``out`` and return ``out`` as a Path.

    Deterministic from ``seed`` (same bytes for the same arguments, whatever ``workers``).
    Files already under ``out`` with the same names are overwritten; others are left.
    """
    out = Path(out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    _build(out, out, n, imgsz, seed, val_fraction, workers)
    return out


def default_dataset_dir() -> Path:
    """``$VISTRAIN_DATASETS`` or ``~/.cache/vistrain/datasets``."""
    env = os.environ.get("VISTRAIN_DATASETS")
    base = Path(env) if env else Path("~/.cache/vistrain/datasets")
    return base.expanduser().absolute()


# The built-in dataset used when data= is empty: 3000 images per set at 128 px is what a small CNN
# trained from scratch needs to generalise (1000 images let it memorise instead), and 128 px keeps
# decoding cheap on a laptop CPU.
BUILTIN_N = 3000
BUILTIN_IMGSZ = 128


def dataset_name(n: int = BUILTIN_N, imgsz: int = BUILTIN_IMGSZ, seed: int = 0) -> str:
    return f"shapes-n{n}-s{imgsz}-seed{seed}"


def ensure_dataset(n: int = BUILTIN_N, imgsz: int = BUILTIN_IMGSZ, seed: int = 0) -> Path:
    """Return the built-in dataset folder, generating it once.

    The dataset is written into a temporary folder next to the target, a ``.complete``
    marker is written last, and the folder is then moved into place with ``os.replace``,
    so an interrupted run never leaves a half-written dataset behind.
    """
    root = default_dataset_dir()
    target = root / dataset_name(n, imgsz, seed)
    if (target / _COMPLETE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        workers = max(1, min(8, os.cpu_count() or 1))
        _build(tmp, target, n, imgsz, seed, 0.2, workers)
        (tmp / _COMPLETE).write_text("ok\n")
        if target.exists() and not (target / _COMPLETE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # stale, incomplete leftover
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():  # not a concurrent winner: real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
