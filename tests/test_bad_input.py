"""Bad input gives one line naming the file, the line and the fix, and exit status 2 (issue 26, items 4-5):
runs that would never step the optimizer, splits without objects, model YAMLs with unknown modules or
mistyped arguments, BOM label files, misspelt data YAML keys, 2-point polygons, unreadable predict sources,
empty class folders."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import write_colour_folder
from vistrain.cli import main

COMMON = ["workers=0", "device=cpu", "plots=False", "imgsz=32"]


def one_line_error(capsys, mode: str) -> str:
    """The single stderr line of a failed CLI call (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"vistrain {mode}: "), err
    return err


def write_yolo_data(root: Path, train_rows: list[str], val_rows: list[str] | None = None, n: int = 2) -> Path:
    """A YOLO dataset of ``n`` 32x32 images per split, every image labelled with the same rows; returns data.yaml."""
    rng = np.random.default_rng(0)
    for split, rows in (("train", train_rows), ("val", train_rows if val_rows is None else val_rows)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("".join(r + "\n" for r in rows))
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                                    "names": ["a", "b"]}))
    return root / "data.yaml"


# ------------------------------------------------------------------------------ 4a: no optimizer step
def test_first_step_batch_mirrors_the_step_condition():
    from vistrain.engine.trainer import first_step_batch, warmup_iterations

    # 1 epoch has no warmup: accumulate = round(nbs / batch) from the first batch
    assert first_step_batch(0, 1, 2, warmup_iterations(3.0, 1, 2), nbs=9, batch_size=3) is None  # every 3, 2 batches
    assert first_step_batch(0, 1, 2, 0, nbs=6, batch_size=3) == 1  # every 2: steps once, after the last batch
    assert first_step_batch(0, 1, 1, 0, nbs=64, batch_size=6) is None
    assert first_step_batch(0, 1, 11, 0, nbs=64, batch_size=6) == 10
    # with warmup accumulation starts at 1: the very first batch steps, however large nbs
    assert first_step_batch(0, 2, 1, warmup_iterations(3.0, 2, 1), nbs=640, batch_size=6) == 0
    # warmup_epochs that round to 0 batches: no warmup
    assert first_step_batch(0, 2, 1, warmup_iterations(0.2, 2, 1), nbs=64, batch_size=6) is None
    # resumed after a step at ni=0: the remaining epoch must reach accumulate batches after it
    assert first_step_batch(1, 2, 2, 0, nbs=6, batch_size=3, last_opt_step=1) == 3
    assert first_step_batch(1, 2, 2, 0, nbs=9, batch_size=3, last_opt_step=1) is None


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    root = tmp_path / "tiny"
    write_colour_folder(root / "train", per_class=2, size=32)  # 6 images
    write_colour_folder(root / "val", per_class=1, size=32, seed=1)
    return root


def test_run_without_an_optimizer_step_stops(tiny_folder, capsys):
    # 6 images at batch 3 = 2 batches, 1 epoch (no warmup), nbs 9: a step every 3 batches, i.e. never
    rc = main(["train", "model=yolov5n-cls", f"data={tiny_folder}", "epochs=1", "batch=3", "nbs=9", *COMMON])
    assert rc == 2
    err = one_line_error(capsys, "train")
    assert "no optimizer step would be taken" in err and "nbs=6 or less" in err and "epochs" in err
    assert not list(Path("runs").glob("*/*/weights/best.pt"))


def test_run_that_steps_once_is_not_stopped(tiny_folder, monkeypatch):
    from vistrain.engine.trainer import Trainer

    steps = []
    step = Trainer.optimizer_step
    monkeypatch.setattr(Trainer, "optimizer_step", lambda self: (steps.append(1), step(self))[1])
    # 2 batches of 3, nbs 6: a step every 2 batches, exactly one, after the last batch
    rc = main(["train", "model=yolov5n-cls", f"data={tiny_folder}", "epochs=1", "batch=3", "nbs=6", *COMMON])
    assert rc == 0 and len(steps) == 1


# ------------------------------------------------------------------------------ 4b: a split without objects
def test_train_split_without_objects_stops(tmp_path, capsys):
    data = write_yolo_data(tmp_path / "nan", ["0 nan nan nan nan"], val_rows=["0 0.5 0.5 0.2 0.2"])
    assert main(["train", "model=yolov8n", f"data={data}", "epochs=1", *COMMON]) == 2
    err = one_line_error(capsys, "train")
    assert f"data={data}: train split: 0 objects in 2 images" in err
    assert "all 2 label rows were dropped" in err and "0.txt:1: non-finite value" in err


def test_val_split_without_objects_stops(tmp_path, capsys):
    data = write_yolo_data(tmp_path / "bg", ["0 0.5 0.5 0.2 0.2"], val_rows=[])  # val: empty label files
    assert main(["train", "model=yolov8n", f"data={data}", "epochs=1", *COMMON]) == 2
    err = one_line_error(capsys, "train")
    assert "val split: 0 objects in 2 images, 0 objects cannot be scored: no label rows found" in err


# ------------------------------------------------------------------------------ 4c: model YAML errors
YOLO11_LIKE = """
nc: 80
scales:
  n: [0.50, 0.25, 1024]
backbone:
  - [-1, 1, Conv, [64, 3, 2]]
  - [-1, 1, Conv, [128, 3, 2]]
  - [-1, 2, C3k2, [256, False, 0.25]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [-1, 1, SPPF, [256, 5]]
head:
  - [[3, 4], 1, Detect, [nc]]
"""
STRING_ARG = """
nc: 2
backbone:
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, Conv, [thirty-two, 3, 2]]
head:
  - [-1, 1, Classify, [nc]]
"""


def yolo11_yamls(tmp_path) -> list[Path]:
    own = tmp_path / "yolo11-like.yaml"
    own.write_text(YOLO11_LIKE)
    found = [own]
    try:
        import importlib.util

        spec = importlib.util.find_spec("ultralytics")
        if spec and spec.origin:
            real = Path(spec.origin).parent / "cfg" / "models" / "11" / "yolo11.yaml"
            found += [real] if real.is_file() else []
    except (ImportError, ValueError):
        pass
    return found


@pytest.mark.parametrize("mode", ["summary", "train", "val", "predict"])
def test_unknown_module_one_line_in_every_mode(tmp_path, capsys, mode):
    data = write_yolo_data(tmp_path / "d", ["0 0.5 0.5 0.2 0.2"])
    for model in yolo11_yamls(tmp_path):
        assert main([mode, f"model={model}", f"data={data}", f"source={data.parent / 'images'}", *COMMON]) == 2
        err = one_line_error(capsys, mode)
        assert f"model={model}: module C3k2 (row 2) is not available in vistrain" in err
        assert "available: " in err and "C2f" in err and "did you mean" not in err


@pytest.mark.parametrize("mode", ["summary", "train", "val"])
def test_string_argument_one_line_in_every_mode(tmp_path, colour_folder, capsys, mode):
    model = tmp_path / "bad.yaml"
    model.write_text(STRING_ARG)
    assert main([mode, f"model={model}", f"data={colour_folder}", *COMMON]) == 2
    err = one_line_error(capsys, mode)
    assert f"model={model}: row 1 (Conv ['thirty-two', 3, 2]): argument 1 'thirty-two'" in err


@pytest.mark.parametrize("row, needle", [
    ("[-1, 1, Conv, [16, '3', 2]]", "row 1 (Conv [16, '3', 2]): argument 2 '3' is a string where a number belongs"),
    ("[-1, two, Conv, [16, 3, 2]]", "row 1: 'repeats' is 'two'; give a whole number"),
    ("[last, 1, Conv, [16, 3, 2]]", "row 1: 'from' is 'last'"),
    ("[-1, 1, SPFF, [16, 5]]", "module 'SPFF' (row 1) is unknown; did you mean 'SPPF'?"),
])
def test_model_yaml_row_errors(tmp_path, capsys, row, needle):
    model = tmp_path / "bad.yaml"
    model.write_text(f"nc: 2\nbackbone:\n  - [-1, 1, Conv, [16, 3, 2]]\n  - {row}\n"
                     f"head:\n  - [-1, 1, Classify, [nc]]\n")
    assert main(["summary", f"model={model}", "imgsz=32"]) == 2
    assert needle in one_line_error(capsys, "summary")


def _checkpoint(path: Path, model_yaml: dict | None = None) -> Path:
    """A minimal vistrain classification checkpoint (random weights) for val / predict."""
    from vistrain.nn.model import build_model

    m = build_model("yolov5n-cls", num_classes=3)
    torch.save({"model_yaml": model_yaml or m.yaml, "model": m.state_dict(), "task": "classify",
                "names": ["blue", "green", "red"], "imgsz": 32}, path)
    return path


@pytest.mark.parametrize("mode", ["val", "predict"])
def test_checkpoint_with_a_broken_model_yaml(tmp_path, colour_folder, capsys, mode):
    ckpt = _checkpoint(tmp_path / "bad.pt", yaml.safe_load(YOLO11_LIKE))
    assert main([mode, f"model={ckpt}", f"data={colour_folder}", f"source={colour_folder}", *COMMON]) == 2
    assert "its model YAML: module C3k2 (row 2) is not available" in one_line_error(capsys, mode)


# ------------------------------------------------------------------------------ 5: smaller defects
def test_label_file_with_a_bom_keeps_its_first_row(tmp_path):
    from vistrain.data.yolo import parse_label_file

    lbl = tmp_path / "x.txt"
    lbl.write_text("0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n", encoding="utf-8-sig")
    assert lbl.read_bytes().startswith(b"\xef\xbb\xbf")
    rows, messages, dropped = parse_label_file(lbl, nc=2)
    assert [r[0] for r in rows] == [0, 1] and messages == [] and dropped == 0


@pytest.mark.parametrize("typo, known", [("trian", "train"), ("vla", "val"), ("name", "names")])
def test_misspelt_data_yaml_key_is_named(tmp_path, capsys, typo, known):
    from vistrain.data.yolo import DataYAMLError, load_data_yaml

    data = write_yolo_data(tmp_path / "d", ["0 0.5 0.5 0.2 0.2"])
    d = yaml.safe_load(data.read_text())
    d[typo] = d.pop(known)
    data.write_text(yaml.safe_dump(d))
    with pytest.raises(DataYAMLError, match=f"unknown key '{typo}' in {data}; did you mean '{known}'\\?"):
        load_data_yaml(data)
    assert main(["train", "model=yolov8n", f"data={data}", *COMMON]) == 2
    assert f"did you mean '{known}'?" in one_line_error(capsys, "train")


def test_extra_data_yaml_keys_are_allowed(tmp_path):
    from vistrain.data.yolo import load_data_yaml

    data = write_yolo_data(tmp_path / "d", ["0 0.5 0.5 0.2 0.2"])
    d = {**yaml.safe_load(data.read_text()), "images": "JPEGImages", "license": "CC0", "roboflow": {"x": 1}}
    data.write_text(yaml.safe_dump(d))
    assert load_data_yaml(data)["nc"] == 2


def test_two_point_row_in_a_polygon_dataset_is_reported_and_dropped(tmp_path, caplog):
    from vistrain.data.yolo import load_data_yaml
    from vistrain.tasks.segment import SegmentTask

    poly = "0 0.1 0.1 0.5 0.1 0.3 0.5"
    data = write_yolo_data(tmp_path / "seg", [poly, "1 0.2 0.2 0.6 0.6"])  # a polygon, then 2 points
    task = SegmentTask()
    task.data_yaml = load_data_yaml(data)
    logger = logging.getLogger("vistrain")  # (the CLI's logging setup stops propagation to caplog's root handler)
    logger.addHandler(caplog.handler)
    try:
        labels, line = task.scan(task.data_yaml, "train", workers=1)
    finally:
        logger.removeHandler(caplog.handler)
    lbl = tmp_path / "seg" / "labels" / "train" / "0.txt"
    expected = f"{lbl}:2: 4 coordinates = 2 points; a polygon needs at least 3"
    assert any(m.startswith(expected) for m in labels.messages) and expected in caplog.text
    assert all(list(it.cls) == [0] and len(it.segments[0]) == 3 for it in labels.items)
    assert "2 lines dropped, 2 objects" in line
    # 3 values: named by file:line with the hint
    (tmp_path / "seg" / "labels" / "train" / "1.txt").write_text(f"{poly}\n1 0.2 0.2\n")
    labels, _ = task.scan(task.data_yaml, "train", workers=1)
    assert any(m.startswith(f"{lbl.with_name('1.txt')}:2: 3 values") and "at least 3 points" in m
               for m in labels.messages)


@pytest.mark.parametrize("content, reason", [(None, "cannot open video"), (b"", "empty file")])
def test_predict_with_nothing_readable_exits_2(tmp_path, capsys, content, reason):
    ckpt = _checkpoint(tmp_path / "ok.pt")
    src = tmp_path / ("x.mp4" if content is None else "empty.jpg")
    src.write_bytes(np.random.default_rng(0).bytes(4096) if content is None else content)
    assert main(["predict", f"model={ckpt}", f"source={src}", *COMMON]) == 2
    err = one_line_error(capsys, "predict")
    assert f"nothing could be predicted: {src}" in err and reason in err


def test_predict_skips_a_bad_file_when_others_succeed(tmp_path, colour_folder, capsys):
    ckpt = _checkpoint(tmp_path / "ok.pt")
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    Image.open(next((colour_folder / "red").iterdir())).save(src / "a.png")
    assert main(["predict", f"model={ckpt}", f"source={src}", *COMMON]) == 0
    assert "1 images predicted, 1 unreadable skipped" in capsys.readouterr().out


def test_empty_class_folder_stays_a_class_in_both_splits(tmp_path):
    from vistrain.data.classify import format_skip_summary, resolve_classify_data

    root = tmp_path / "pets"
    write_colour_folder(root / "train", per_class=2, size=16)
    write_colour_folder(root / "val", per_class=1, size=16, seed=1)
    (root / "train" / "amber").mkdir()  # empty: sorts first, so dropping it would shift every index
    (root / "val" / "amber").mkdir()
    train, val = resolve_classify_data(root, workers=1)
    assert train.names == val.names == ["amber", "blue", "green", "red"]
    assert {label for _, label in train.samples} == {1, 2, 3} and train.empty_classes == ["amber"]
    assert f"  empty class folder: {root / 'train' / 'amber'} (no valid images)" in format_skip_summary(train, "train")
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if readme.is_file():
        assert "stays a class" in readme.read_text()
