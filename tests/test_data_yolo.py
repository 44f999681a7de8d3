"""YOLO dataset YAML, label verification (each bad-line case) and its cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vistrain.data.yolo import (DataYAMLError, label_path, list_split_images, load_data_yaml, parse_label_file,
                                scan_split)


def _img(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)
    return path


def _lbl(image: Path, text: str) -> Path:
    p = label_path(image)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_label_path_swaps_last_images_folder():
    assert label_path(Path("/d/images/train/a.jpg")) == Path("/d/labels/train/a.txt")
    assert label_path(Path("/images/x/images/val/b.png")) == Path("/images/x/labels/val/b.txt")


@pytest.mark.parametrize("line, expect", [
    ("0 0.5 0.5 0.2", "4 values; expected 5"),
    ("0 0.5 0.5 0.2 0.2 0.1", "6 values"),
    ("0 0.5 0.5", "a polygon needs at least 3 points"),
    ("0 0.5 abc 0.2 0.2", "non-numeric value 'abc' in column 3"),
    ("3 0.5 0.5 0.2 0.2", "class 3 outside 0..2"),
    ("-1 0.5 0.5 0.2 0.2", "class -1 outside 0..2"),
    ("1.5 0.5 0.5 0.2 0.2", "class id 1.5 is not an integer"),
    ("0 0.5 0.5 0 0.2", "zero-area box"),
    ("0 1.5 0.5 0.2 0.2", "zero-area box after clipping"),
    ("0 0.5 0.5 nan 0.2", "non-finite"),
    ("0 0.1 0.1 0.1 0.1 0.1 0.1", "zero-area box"),  # degenerate polygon (all points equal)
])
def test_each_bad_line_is_reported_and_dropped_keeping_good_lines(tmp_path, line, expect):
    img = _img(tmp_path / "images" / "a.jpg")
    lbl = _lbl(img, f"1 0.5 0.5 0.4 0.4\n{line}\n2 0.25 0.25 0.1 0.2\n")
    rows, messages, dropped = parse_label_file(lbl, nc=3)
    assert dropped == 1 and len(messages) == 1
    assert messages[0].startswith(f"{lbl}:2: ") and expect in messages[0], messages
    assert [r[0] for r in rows] == [1, 2]  # the good lines survive


def test_out_of_range_clipped_with_message_within_tolerance_silently(tmp_path):
    lbl = _lbl(_img(tmp_path / "images" / "a.jpg"), "0 0.9 0.5 0.4 0.2\n0 0.5 0.5 1.005 0.2\n")
    rows, messages, dropped = parse_label_file(lbl, nc=1)
    assert dropped == 0 and len(rows) == 2
    assert len(messages) == 1 and messages[0].startswith(f"{lbl}:1: coordinates outside 0..1: clipped")
    cx, cy, w, h = rows[0][1]
    assert np.allclose([cx - w / 2, cx + w / 2], [0.7, 1.0])  # x2 = 1.1 clipped to 1.0
    assert np.allclose(rows[1][1][[0, 2]], [0.5, 1.0])


def test_duplicates_dropped_and_counted(tmp_path):
    lbl = _lbl(_img(tmp_path / "images" / "a.jpg"), "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n"
                                                    "0 0.50 0.5 0.2 0.20\n")
    rows, messages, dropped = parse_label_file(lbl, nc=2)
    assert len(rows) == 2 and dropped == 2
    assert messages == [f"{lbl}:3: duplicate of line 1: dropped", f"{lbl}:4: duplicate of line 1: dropped"]


def test_polygon_rows_become_boxes(tmp_path):
    lbl = _lbl(_img(tmp_path / "images" / "a.jpg"), "0 0.1 0.2 0.5 0.2 0.3 0.6\n")
    rows, messages, _ = parse_label_file(lbl, nc=1)
    assert not messages
    assert np.allclose(rows[0][1], [0.3, 0.4, 0.4, 0.4])
    assert rows[0][2].shape == (3, 2)


def _dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    good = _img(root / "images" / "train" / "good.jpg")
    _lbl(good, "0 0.5 0.5 0.5 0.5\n9 0.5 0.5 0.1 0.1\n")
    _img(root / "images" / "train" / "background.jpg")  # no label file
    _lbl(_img(root / "images" / "train" / "empty.png"), "\n")
    bad = root / "images" / "train" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    _lbl(bad, "0 0.5 0.5 0.5 0.5\n")
    (root / "images" / "train" / "notes.txt").write_text("not an image")
    _lbl(_img(root / "images" / "val" / "v.jpg"), "1 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")
    return root


def test_scan_split_summary_and_cache(tmp_path):
    root = _dataset(tmp_path)
    data = load_data_yaml(root / "data.yaml")
    assert data["names"] == ["cat", "dog"] and data["nc"] == 2 and Path(data["path"]) == root.resolve()
    images = list_split_images(data, "train")
    assert [p.name for p in images] == ["background.jpg", "broken.jpg", "empty.png", "good.jpg"]
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    labels, cached = scan_split(images, data["nc"], workers=1)
    assert not cached
    assert labels.summary("train").startswith("train: 3 images, 2 backgrounds, 1 corrupt, 1 lines dropped")
    assert labels.corrupt[0][0].endswith("broken.jpg")
    assert any("good.txt:2: class 9 outside 0..1" in m for m in labels.messages)
    good = next(it for it in labels.items if it.im_file.endswith("good.jpg"))
    assert good.shape == (48, 64) and good.cls.tolist() == [0]
    again, cached = scan_split(images, data["nc"], workers=1)
    assert cached and again.summary("train") == labels.summary("train") and again.messages == labels.messages
    assert np.array_equal(again.items[-1].boxes, labels.items[-1].boxes)
    # editing a label file invalidates the cache
    _lbl(root / "images" / "train" / "good.jpg", "0 0.5 0.5 0.5 0.5\n1 0.2 0.2 0.1 0.1\n")
    third, cached = scan_split(images, data["nc"], workers=1)
    assert not cached and third.dropped == 0
    after = {p for p in root.rglob("*") if p.is_file()}
    assert after == set(before)  # nothing written into the user's dataset


def test_txt_list_split_and_yaml_errors(tmp_path):
    root = _dataset(tmp_path)
    (root / "train.txt").write_text("./images/train/good.jpg\nimages/val/v.jpg\n")
    data = load_data_yaml(root / "data.yaml")
    data["train"] = ["train.txt", "images/val"]
    assert [p.name for p in list_split_images(data, "train")] == ["good.jpg", "v.jpg"]
    data["val"] = "images/nope"
    with pytest.raises(DataYAMLError, match="images/nope does not exist"):
        list_split_images(data, "val")
    (root / "bad.yaml").write_text("train: a\nval: [b\nnames: [x]\n")
    with pytest.raises(DataYAMLError, match=r"bad.yaml:\d+: not valid YAML"):
        load_data_yaml(root / "bad.yaml")
    (root / "nonames.yaml").write_text("train: a\nval: b\n")
    with pytest.raises(DataYAMLError, match="missing key"):
        load_data_yaml(root / "nonames.yaml")
    with pytest.raises(DataYAMLError, match="does not exist"):
        load_data_yaml(root / "missing.yaml")
