"""Tests for the built-in synthetic shapes dataset (vistrain.data.synthetic)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFilter

from vistrain.data import synthetic
from vistrain.data.synthetic import (
    SHAPE_NAMES,
    default_dataset_dir,
    ensure_dataset,
    make_dataset,
    render_detect,
    split_layout,
)

N, S, SEED = 40, 128, 3


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes") / "ds", n=N, imgsz=S, seed=SEED,
                        workers=2)


def _split_ids(split: str) -> list[str]:
    n_train, _ = split_layout(N, 0.2)
    r = range(0, n_train) if split == "train" else range(n_train, N)
    return [f"{i:05d}" for i in r]


def _rows(path: Path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines() if line]


def _poly_mask(poly_norm: np.ndarray) -> np.ndarray:
    m = Image.new("L", (S, S), 0)
    ImageDraw.Draw(m).polygon([tuple(p) for p in (poly_norm * S).tolist()], fill=255)
    return np.asarray(m) > 0


def test_layout(ds: Path):
    assert ds.is_absolute()
    assert (ds / "README.txt").read_text().strip()
    for split in ("train", "val"):
        ids = _split_ids(split)
        for name in SHAPE_NAMES:
            assert (ds / "classify" / split / name).is_dir()
        cls_files = sorted((ds / "classify" / split).glob("*/*.jpg"))
        assert sorted(p.stem for p in cls_files) == ids
        for p in cls_files:  # round-robin classes
            assert p.parent.name == SHAPE_NAMES[int(p.stem) % len(SHAPE_NAMES)]
        for task in ("detect", "segment"):
            assert sorted(p.stem for p in (ds / task / "images" / split).glob("*.jpg")) == ids
            assert sorted(p.stem for p in (ds / task / "labels" / split).glob("*.txt")) == ids
        assert (ds / "voc/ImageSets/Main" / f"{split}.txt").read_text().split() == ids
    assert len(list((ds / "voc/JPEGImages").glob("*.jpg"))) == N
    assert len(list((ds / "voc/Annotations").glob("*.xml"))) == N
    # classes balanced over the whole classify set
    counts = [len(list(ds.glob(f"classify/*/{name}/*.jpg"))) for name in SHAPE_NAMES]
    assert max(counts) - min(counts) <= 1 and sum(counts) == N
    im = Image.open(ds / "detect/images/train/00000.jpg")
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (S, S)
    # segment / voc images are the detect images (hard links or copies)
    a = ds / "detect/images/val" / f"{_split_ids('val')[0]}.jpg"
    for b in (ds / "segment/images/val" / a.name, ds / "voc/JPEGImages" / a.name):
        assert b.read_bytes() == a.read_bytes()


def test_data_yaml(ds: Path):
    for rel, task in (("data.yaml", "detect"), ("detect/data.yaml", "detect"),
                      ("segment/data.yaml", "segment"), ("voc/data.yaml", "voc")):
        d = yaml.safe_load((ds / rel).read_text())
        assert Path(d["path"]) == ds / task
        assert d["names"] == dict(enumerate(SHAPE_NAMES))
        assert len(d["names"]) == 6
        assert (ds / task / d["train"]).exists() and (ds / task / d["val"]).exists()
    assert (ds / "data.yaml").read_text() == (ds / "detect/data.yaml").read_text()


def test_determinism(ds: Path, tmp_path: Path):
    other = make_dataset(tmp_path / "w1", n=N, imgsz=S, seed=SEED, workers=1)
    rels = ["classify/train/circle/00000.jpg", "classify/val/square/00037.jpg",
            "detect/images/train/00005.jpg", "detect/labels/train/00005.txt",
            "segment/labels/val/00033.txt", "voc/Annotations/00011.xml",
            "voc/ImageSets/Main/val.txt"]
    for rel in rels:
        assert (ds / rel).read_bytes() == (other / rel).read_bytes(), rel
    # every detect image identical regardless of workers
    for p in (ds / "detect/images").rglob("*.jpg"):
        assert p.read_bytes() == (other / p.relative_to(ds)).read_bytes()
    # a different seed gives different content
    diff = make_dataset(tmp_path / "s2", n=6, imgsz=S, seed=SEED + 1, workers=1)
    assert (diff / "detect/images/train/00001.jpg").read_bytes() != \
        (ds / "detect/images/train/00001.jpg").read_bytes()


def test_labels_boxes_and_polygons(ds: Path):
    n_obj = 0
    for split in ("train", "val"):
        for stem in _split_ids(split):
            boxes = _rows(ds / "detect/labels" / split / f"{stem}.txt")
            polys = _rows(ds / "segment/labels" / split / f"{stem}.txt")
            assert len(boxes) == len(polys) <= 6
            for b, p in zip(boxes, polys):
                assert len(b) == 5 and b[0] == p[0] and 0 <= int(b[0]) < 6
                assert all(0.0 <= v <= 1.0 for v in b[1:] + p[1:])
                xy = np.asarray(p[1:]).reshape(-1, 2)
                assert len(xy) >= 3
                x0, y0 = xy.min(0)
                x1, y1 = xy.max(0)
                np.testing.assert_allclose(
                    b[1:], [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], atol=1e-5)
                n_obj += 1
            # boxes of one image never overlap
            xyxy = [(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) for _, cx, cy, w, h in boxes]
            for i in range(len(xyxy)):
                for j in range(i + 1, len(xyxy)):
                    a, c = xyxy[i], xyxy[j]
                    assert a[2] < c[0] or c[2] < a[0] or a[3] < c[1] or c[3] < a[1]
    assert n_obj > N  # on average more than one object per detect image


def test_polygon_text_format(ds: Path):
    line = next(line for p in sorted((ds / "segment/labels/train").glob("*.txt"))
                for line in p.read_text().splitlines())
    cls, *coords = line.split()
    assert cls.isdigit() and len(coords) % 2 == 0
    assert all(len(c.split(".")[1]) == 6 for c in coords)


def test_background_images(ds: Path):
    for split in ("train", "val"):
        empty = [p for p in (ds / "detect/labels" / split).glob("*.txt") if not p.read_text()]
        assert len(empty) >= 1
        for p in empty:
            assert (ds / "segment/labels" / split / p.name).read_text() == ""
            assert (ds / "detect/images" / split / f"{p.stem}.jpg").is_file()
            assert ET.parse(ds / "voc/Annotations" / f"{p.stem}.xml").getroot().findall(
                "object") == []


def test_voc_matches_yolo(ds: Path):
    for split in ("train", "val"):
        for stem in _split_ids(split):
            root = ET.parse(ds / "voc/Annotations" / f"{stem}.xml").getroot()
            assert root.findtext("filename") == f"{stem}.jpg"
            assert root.findtext("folder")
            size = root.find("size")
            assert (int(size.findtext("width")), int(size.findtext("height")),
                    int(size.findtext("depth"))) == (S, S, 3)
            objs = root.findall("object")
            boxes = _rows(ds / "detect/labels" / split / f"{stem}.txt")
            assert len(objs) == len(boxes)
            for o, (c, cx, cy, w, h) in zip(objs, boxes):
                assert o.findtext("name") == SHAPE_NAMES[int(c)]
                assert o.findtext("pose") == "Unspecified"
                assert o.findtext("truncated") == "0" and o.findtext("difficult") == "0"
                bb = o.find("bndbox")
                xmin, ymin, xmax, ymax = (int(bb.findtext(k))
                                          for k in ("xmin", "ymin", "xmax", "ymax"))
                assert 1 <= xmin <= xmax <= S and 1 <= ymin <= ymax <= S
                yolo = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * S
                voc = np.array([xmin - 1, ymin - 1, xmax - 1, ymax - 1], dtype=float)
                assert np.abs(yolo - voc).max() <= 1.0


def test_labels_sit_on_painted_objects(ds: Path):
    checked = 0
    for split in ("train", "val"):
        for stem in _split_ids(split)[:12]:
            img = np.asarray(Image.open(ds / "detect/images" / split / f"{stem}.jpg"),
                             dtype=np.float32)
            polys = _rows(ds / "segment/labels" / split / f"{stem}.txt")
            _, objs = render_detect(SEED, int(stem), S, background=not polys)
            assert [o.cls for o in objs] == [int(p[0]) for p in polys]
            for p, obj in zip(polys, objs):
                mask = _poly_mask(np.asarray(p[1:]).reshape(-1, 2))
                np.testing.assert_array_equal(  # label polygon == rendered polygon
                    np.asarray(obj.polygon), np.floor(np.asarray(p[1:]).reshape(-1, 2) * S))
                m_img = Image.fromarray(mask.astype(np.uint8) * 255)
                inner = np.asarray(m_img.filter(ImageFilter.MinFilter(5))) > 0
                ring = (np.asarray(m_img.filter(ImageFilter.MaxFilter(9))) > 0) & ~(
                    np.asarray(m_img.filter(ImageFilter.MaxFilter(5))) > 0)
                if inner.sum() < 10 or ring.sum() < 10:
                    continue
                inside = img[inner].mean(0)
                around = img[ring].mean(0)
                fill = np.asarray(obj.color, dtype=np.float32)
                assert np.abs(inside - fill).max() < 12, (stem, inside, fill)
                assert np.linalg.norm(inside - around) > 50, (stem, inside, around)
                checked += 1
    assert checked >= 10


def test_classify_image_shows_its_shape(ds: Path):
    for idx in (0, 3, 7):
        im, obj = synthetic.render_classify(SEED, idx, S)
        assert obj.cls == idx % 6
        split = "train" if idx < split_layout(N, 0.2)[0] else "val"
        saved = np.asarray(Image.open(
            ds / "classify" / split / SHAPE_NAMES[obj.cls] / f"{idx:05d}.jpg"), np.float32)
        m = Image.new("L", (S, S), 0)
        ImageDraw.Draw(m).polygon([tuple(v) for v in obj.polygon.tolist()], fill=255)
        inner = np.asarray(m.filter(ImageFilter.MinFilter(5))) > 0
        assert inner.sum() > 0.05 * S * S  # large shape
        assert np.abs(saved[inner].mean(0) - np.asarray(obj.color)).max() < 12


def test_split_layout():
    n_train, bgs = split_layout(1000, 0.2)
    assert n_train == 800
    assert 20 <= len(bgs) <= 40
    assert any(i < 800 for i in bgs) and any(i >= 800 for i in bgs)
    n_train, bgs = split_layout(10, 0.0)
    assert n_train == 10 and len(bgs) == 1
    assert split_layout(5, 0.5)[0] in (2, 3)


def test_ensure_dataset(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("VISTRAIN_DATASETS", str(tmp_path / "cache"))
    assert default_dataset_dir() == tmp_path / "cache"
    out = ensure_dataset(n=8, imgsz=64, seed=1)
    assert out == tmp_path / "cache" / "shapes-n8-s64-seed1"
    assert (out / ".complete").is_file()
    assert yaml.safe_load((out / "data.yaml").read_text())["path"] == str(out / "detect")
    assert not [p for p in (tmp_path / "cache").iterdir() if p != out]  # no temp leftovers
    mtime = os.stat(out / ".complete").st_mtime_ns
    assert ensure_dataset(n=8, imgsz=64, seed=1) == out  # cached: not regenerated
    assert os.stat(out / ".complete").st_mtime_ns == mtime


def test_default_dataset_dir_home(monkeypatch):
    monkeypatch.delenv("VISTRAIN_DATASETS", raising=False)
    assert default_dataset_dir() == Path.home() / ".cache" / "vistrain" / "datasets"
