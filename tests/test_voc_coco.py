"""Pascal VOC and COCO JSON datasets: the same labels as the YOLO copy of the built-in data, verification of
broken files (one message naming the file and object, only that object dropped), difficult objects, the
`data split` tool, and a detector trained end to end on a VOC folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vistrain.data.synthetic import make_dataset
from vistrain.data.yolo import DataYAMLError, load_data, scan_data_split


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), n=16, imgsz=64, seed=3, workers=1)


def _scan(data: dict, split: str):
    labels, _ = scan_data_split(data, split, workers=1, use_cache=False)
    return labels


def _by_name(labels) -> dict:
    return {Path(it.im_file).name: it for it in labels.items}


# ------------------------------------------------------------------------------------ same labels as YOLO
@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_and_coco_give_the_yolo_labels_of_the_builtin_data(shapes, split):
    yolo, seg = _by_name(_scan(load_data(shapes / "detect"), split)), _by_name(_scan(load_data(shapes / "segment"),
                                                                                     split))
    for ref in (shapes / "voc", shapes / "voc" / "data.yaml", shapes / "coco",
                shapes / "coco" / "annotations" / f"instances_{split}.json"):
        data = load_data(ref)
        assert data["format"] == ("voc" if "voc" in str(ref) else "coco")
        assert data["names"] == load_data(shapes / "detect")["names"]
        other = _by_name(_scan(data, split))
        assert sorted(other) == sorted(yolo) and len(yolo) >= 3
        for name, it in yolo.items():
            o = other[name]
            assert o.shape == it.shape and o.cls.tolist() == it.cls.tolist(), (ref, name)
            np.testing.assert_allclose(o.boxes, it.boxes, atol=1e-6, rtol=0)
            assert not o.difficult.any()
            if data["format"] == "coco":  # COCO carries the polygons of segment/
                assert len(o.segments) == len(seg[name].segments)
                for a, b in zip(o.segments, seg[name].segments):
                    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_voc_folder_without_names_takes_the_sorted_names_of_the_train_xml(shapes, tmp_path, caplog):
    from vistrain.data.voc import load_voc_folder

    with_yaml = load_data(shapes / "voc")
    folder = load_voc_folder(shapes / "voc")  # the folder alone: no data.yaml read
    assert folder["names"] == sorted(with_yaml["names"]) and folder["yaml_file"] == str(shapes / "voc")
    a, b = _scan(with_yaml, "train"), _scan(folder, "train")
    for x, y in zip(a.items, b.items):
        assert [with_yaml["names"][c] for c in x.cls] == [folder["names"][c] for c in y.cls]


# ------------------------------------------------------------------------------------ VOC: broken files
def _xml(objects, size=(32, 32), name="x.jpg") -> str:
    rows = [f"<annotation><filename>{name}</filename>",
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for cls, (x1, y1, x2, y2), difficult in objects:
        rows.append(f"<object><name>{cls}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin>"
                    f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "\n".join(rows + ["</annotation>"])


def write_voc(root: Path, train: dict[str, str | None], val: dict[str, str | None] | None = None,
              names: list[str] | None = None) -> Path:
    """A VOC folder of 32x32 images: ``{id: XML text}`` per split (None: no image file); returns the root, or
    with ``names`` a data.yaml (format: voc)."""
    rng = np.random.default_rng(0)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("val", val or train)):
        for image_id, xml in items.items():
            (root / "Annotations" / f"{image_id}.xml").write_text(xml or _xml([("a", (2, 2, 9, 9), 0)]))
            if xml is not None:
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    root / "JPEGImages" / f"{image_id}.jpg")
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in items))
    if names is None:
        return root
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "format": "voc", "train": "ImageSets/Main/train.txt",
                                                    "val": "ImageSets/Main/val.txt", "names": names}))
    return root / "data.yaml"


def test_voc_broken_files_are_reported_and_only_their_part_dropped(tmp_path):
    ann = tmp_path / "voc" / "Annotations"
    train = {
        "good": _xml([("a", (1, 1, 17, 17), 0), ("b", (5, 5, 30, 12), 0)]),
        "broken": "<annotation><object><name>a</name></annotation",
        "resized": _xml([("a", (1, 1, 17, 17), 0)], size=(64, 48)),
        "unknown": _xml([("a", (1, 1, 9, 9), 0), ("xyz", (2, 2, 8, 8), 0), ("b", (20, 20, 10, 30), 0)]),
        "noimage": None,
    }
    data = load_data(write_voc(tmp_path / "voc", train, names=["a", "b"]))
    labels = _scan(data, "train")
    items = _by_name(labels)
    assert sorted(items) == ["good.jpg", "resized.jpg", "unknown.jpg"]
    corrupt = dict(labels.corrupt)
    assert f"annotation {ann / 'broken.xml'}: not valid XML" in corrupt[str(tmp_path / "voc" / "JPEGImages" /
                                                                            "broken.jpg")]
    assert str(tmp_path / "voc" / "JPEGImages" / "noimage.jpg") in corrupt
    # VOC pixel indices 1..17 -> centres 0.5..16.5 of the 32 px image (the real size, not <size>)
    np.testing.assert_allclose(items["resized.jpg"].boxes, [[8.5 / 32, 8.5 / 32, 16 / 32, 16 / 32]], atol=1e-7)
    np.testing.assert_allclose(items["good.jpg"].boxes[0], items["resized.jpg"].boxes[0])
    assert f"{ann / 'resized.xml'}: <size> 64x48 but the image is 32x32" in "\n".join(labels.messages)
    assert items["unknown.jpg"].cls.tolist() == [0] and items["unknown.jpg"].object_ids.tolist() == [1]
    assert f"{ann / 'unknown.xml'}: object 2: class 'xyz' not in names: dropped" in labels.messages
    assert any(m.startswith(f"{ann / 'unknown.xml'}: object 3: zero-area box") for m in labels.messages)
    assert labels.dropped == 2 and labels.summary("train").startswith(
        "train: 3 images, 0 backgrounds, 2 corrupt, 2 objects dropped, 4 objects")


def test_difficult_objects_left_out_of_training_unless_the_key_and_kept_flagged_in_val(tmp_path):
    from vistrain.tasks.detect import DetectTask

    xml = _xml([("a", (1, 1, 10, 10), 0), ("b", (12, 12, 30, 30), 1)])
    data = load_data(write_voc(tmp_path / "voc", {"0": xml, "1": xml}, names=["a", "b"]))
    for difficult, expected in ((False, [0]), (True, [0, 1])):
        task = DetectTask()
        task.cfg, task.data_yaml = {"difficult": difficult}, data
        labels, line = task.scan(data, "train", workers=1)
        assert all(it.cls.tolist() == expected for it in labels.items)
        assert ("2 difficult left out" in line) == (not difficult)
        val, _ = task.scan(data, "val", workers=1)  # kept, flagged, for metrics to leave out
        assert all(it.cls.tolist() == [0, 1] and it.difficult.tolist() == [False, True] for it in val.items)
    cached, was_cached = scan_data_split(data, "val", workers=1)  # the cache keeps the flags
    again, was_cached = scan_data_split(data, "val", workers=1)
    assert was_cached and all(it.difficult.tolist() == [False, True] for it in again.items)


def test_voc_folder_needs_split_lists_and_segmentation_needs_polygons(tmp_path):
    from vistrain.engine.utils import UserError
    from vistrain.tasks.segment import SegmentTask

    root = write_voc(tmp_path / "voc", {"1": _xml([("a", (1, 1, 10, 10), 0)])})
    task = SegmentTask()
    task.cfg = {}
    task.data_yaml = load_data(root)
    with pytest.raises(UserError, match="no polygons in the VOC annotations"):
        task.scan(task.data_yaml, "train", workers=1)
    (root / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DataYAMLError, match=r"ImageSets/Main/val.txt; write the split lists with `vistrain data "
                                            r"split"):
        load_data(root)


# ------------------------------------------------------------------------------------ COCO
def _rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major run lengths, starting with a run of zeros)."""
    flat, counts, current, run = mask.ravel(order="F"), [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def write_coco(root: Path) -> Path:
    """A COCO train JSON in root/annotations with its images in root/images; returns the JSON."""
    from pycocotools import mask as mask_utils

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(np.full((32, 40, 3), 90, np.uint8)).save(root / "images" / name)
    two = np.zeros((32, 40), np.uint8)
    two[4:12, 6:18] = 1
    two[20:26, 30:36] = 1
    one = np.zeros((32, 40), np.uint8, order="F")
    one[2:6, 2:8] = 1
    compressed = mask_utils.encode(one)
    compressed["counts"] = compressed["counts"].decode()
    anns = [
        {"image_id": 1, "category_id": 7, "bbox": [4, 2, 8, 6], "iscrowd": 0,
         "segmentation": [[4, 2, 12, 2, 12, 8], [20, 20, 24, 20, 24, 24, 20, 24]]},  # two parts
        {"image_id": 1, "category_id": 3, "bbox": [6, 4, 12, 8], "iscrowd": 0, "segmentation": _rle(two)},
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5], "iscrowd": 0},  # zero width
        {"image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # unknown category
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 32], "iscrowd": 1, "segmentation": _rle(two)},
        {"image_id": 1, "category_id": 3, "bbox": [2, 2, 6, 4], "iscrowd": 0, "segmentation": compressed},
        {"image_id": 1, "category_id": 7, "bbox": [30, 20, 20, 10], "iscrowd": 0},  # past the right edge: clipped
        {"image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        {"image_id": 3, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        {"image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # no such image
    ]
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 32},
                      {"id": 2, "file_name": "b.jpg", "width": 80, "height": 64},
                      {"id": 3, "file_name": "gone.jpg", "width": 40, "height": 32}],
           "annotations": [{"id": i + 1, **a} for i, a in enumerate(anns)],
           "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]}
    path = root / "annotations" / "instances_train.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_objects_verified_one_by_one(tmp_path):
    path = write_coco(tmp_path / "coco")
    data = load_data(path)  # no val twin: validates on the train JSON
    assert data["names"] == ["three", "seven"] and data["category_ids"] == [3, 7]  # in category-id order
    labels = _scan(data, "train")
    items, where = _by_name(labels), f"{path}: image a.jpg"
    a, b = items["a.jpg"], items["b.jpg"]
    assert a.cls.tolist() == [1, 0, 0, 1] and a.object_ids.tolist() == [1, 2, 6, 7]
    np.testing.assert_allclose(a.boxes[1], [12 / 40, 8 / 32, 12 / 40, 8 / 32], atol=1e-7)
    np.testing.assert_allclose(a.boxes[3], [35 / 40, 25 / 32, 10 / 40, 10 / 32], atol=1e-7)  # clipped at x = 40
    assert f"{where}: object 3: bbox width or height <= 0 (0 x 5): dropped" in labels.messages
    assert f"{where}: object 4: category id 99 not in categories: dropped" in labels.messages
    assert any(m.startswith(f"{where}: object 7: bbox outside the 40x32 image: clipped") for m in labels.messages)
    assert any("annotations[9]: image_id 42 not in images: dropped" in m for m in labels.messages)
    assert labels.dropped == 3 and "1 crowd objects (iscrowd=1) skipped" in labels.notes[0]
    assert any(m.startswith(f"{path}: image b.jpg: width x height 80x64 but the image is 40x32") for m in
               labels.messages)
    assert "image file not found (file_name 'gone.jpg'" in dict(labels.corrupt)[str(tmp_path / "coco" / "images" /
                                                                                   "gone.jpg")]
    # polygons: two parts joined into one outline; RLE traced (pixel centres); compressed RLE too; none: empty
    s = [np.round(seg.astype(np.float64) * [40, 32], 4) for seg in a.segments]
    assert {tuple(p) for p in s[0].tolist()} == {(4, 2), (12, 2), (12, 8), (20, 20), (24, 20), (24, 24), (20, 24)}
    assert s[1].min(0).tolist() == [6.5, 4.5] and s[1].max(0).tolist() == [35.5, 25.5]  # both regions of the mask
    assert s[2].min(0).tolist() == [2.5, 2.5] and s[2].max(0).tolist() == [7.5, 5.5]
    assert len(s[3]) == 0 and b.segments[0].shape == (0, 2)


def test_coco_yaml_with_images_key_and_segmentation_drops_objects_without_polygons(tmp_path):
    from vistrain.tasks.segment import SegmentTask

    path = write_coco(tmp_path / "coco")
    shutil.move(tmp_path / "coco" / "images", tmp_path / "pictures")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"path": "coco", "train": "annotations/instances_train.json",
                                                        "val": "annotations/instances_train.json",
                                                        "images": "../pictures"}))
    task = SegmentTask()
    task.cfg, task.data_yaml = {}, load_data(tmp_path / "data.yaml")
    assert task.data_yaml["format"] == "coco"  # from the .json splits
    labels, line = task.scan(task.data_yaml, "train", workers=1)
    assert [Path(it.im_file).name for it in labels.items] == ["a.jpg", "b.jpg"]
    assert f"{path}: image a.jpg: object 7: no polygon (a segmentation dataset needs a polygon for every object): " \
           f"dropped" in labels.messages
    assert labels.items[0].cls.tolist() == [1, 0, 0] and len(labels.items[1].cls) == 0


# ------------------------------------------------------------------------------------ data split
def test_data_split_writes_the_tutorial_lists_reproducibly(tmp_path, capsys):
    from vistrain.cli import main

    root = write_voc(tmp_path / "voc", {f"{i:03d}": _xml([("a", (1, 1, 9, 9), 0)]) for i in range(20)})
    for f in (root / "ImageSets" / "Main").iterdir():
        f.unlink()
    assert main(["data", "split", f"data={root}", "trainval=0.9", "train=0.9", "seed=0"]) == 0
    assert "20 annotated images -> trainval 18 (train 16, val 2), test 2" in capsys.readouterr().out
    lists = {s: (root / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in ("trainval", "train", "val",
                                                                                          "test")}
    assert sorted(lists["train"] + lists["val"]) == lists["trainval"]
    assert sorted(lists["trainval"] + lists["test"]) == [f"{i:03d}" for i in range(20)]
    assert main(["data", "split", f"data={root}", "seed=0"]) == 2  # never replaced without exist_ok
    assert "exist_ok=True replaces" in capsys.readouterr().err
    assert main(["data", "split", f"data={root}", "seed=0", "exist_ok=True"]) == 0
    assert (root / "ImageSets" / "Main" / "val.txt").read_text().split() == lists["val"]
    main(["data", "split", f"data={root}", "seed=1", "exist_ok=True"])
    assert (root / "ImageSets" / "Main" / "train.txt").read_text().split() != lists["train"]
    data = load_data(root)  # the folder now trains: names from the XML
    assert data["names"] == ["a"] and len(_scan(data, "train").items) == 16


# ------------------------------------------------------------------------------------ end to end
def test_yolov8_trains_on_a_voc_folder(tmp_path):
    from vistrain.cli import main

    root = make_dataset(tmp_path / "d", n=16, imgsz=64, seed=0, workers=1)
    (root / "voc" / "data.yaml").unlink()  # the folder alone, as VOCdevkit/VOC2007
    assert main(["train", "model=yolov8n", f"data={root / 'voc'}", "epochs=1", "imgsz=64", "batch=8", "nbs=8",
                 "workers=0", "plots=False", f"project={tmp_path / 'runs'}"]) == 0
    assert (tmp_path / "runs" / "detect" / "train" / "weights" / "best.pt").is_file()
