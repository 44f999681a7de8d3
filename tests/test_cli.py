"""The CLI: help, summary, and its error paths (one line, exit status 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vistrain.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vistrain", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["train", "epoch=3"], "unknown key 'epoch'; did you mean 'epochs'?"),
    (["train", "epochs=abc"], "epochs='abc': expected an integer"),
    (["train", "data=/no/such/folder", "epochs=1"], "/no/such/folder: folder does not exist"),
    (["train", "optimizer=adamm"], "did you mean 'Adam'"),
    (["val", "model=/no/such/best.pt"], "/no/such/best.pt: checkpoint not found"),
    (["predict", "model=resnet18"], "needs trained weights"),
    (["trian"], "unknown mode 'trian'; did you mean 'train'?"),
    (["train", "batch=0"], "batch=0: must be greater than 0"),
    (["train", "model=resnet05"], "did you mean 'resnet50'"),
])
def test_errors_one_line_exit_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1, err


def test_error_in_a_real_process_has_no_traceback():
    p = run_cli("train", "lr=0.1")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "did you mean 'lr0'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_help_lists_keys_with_defaults(capsys, monkeypatch):
    from vistrain import cli

    # (building every model for the params / GFLOPs columns takes a minute; test_cli_habits checks those numbers)
    monkeypatch.setattr(cli, "model_stats", lambda rows: {r[0]: (0, 0.0) for r in rows})
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    for key in ("model", "data", "epochs", "batch", "imgsz", "nc", "device", "workers", "project", "name",
                "resume", "seed", "optimizer", "lr0", "patience", "time", "save_json"):
        assert f"  {key}=" in out, key
    assert "epochs=10" in out and "number of epochs" in out
    assert main(["train", "help"]) == 0
    assert main(["help", "models"]) == 0
    assert "resnet152" in capsys.readouterr().out


def test_summary_of_tutorial_classifier(capsys):
    assert main(["summary", "model=yolov5-backbone-cls", "nc=4", "imgsz=224"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 21,729,592" in out
    assert "[-1, 64, 113, 113]" in out and "[-1, 1024, 8, 8]" in out
    assert "GFLOPs:" in out and "Estimated Total Size (MB):" in out


def test_data_make_writes_every_layout(tmp_path, capsys):
    assert main(["data", "make", f"out={tmp_path / 'shapes'}", "n=12", "imgsz=64", "seed=3", "workers=1"]) == 0
    root = tmp_path / "shapes"
    assert "written to" in capsys.readouterr().out
    for sub in ["classify/train", "classify/val", "detect/images/train", "detect/labels/val", "segment/labels/train",
                "voc/Annotations", "data.yaml"]:
        assert (root / sub).exists(), sub
    assert main(["data", "bake"]) == 2


def test_predict_sources_folder_glob_and_missing(tmp_path):
    from vistrain.engine.predictor import resolve_sources
    from vistrain.engine.utils import UserError

    (tmp_path / "imgs").mkdir()
    for name in ["b.jpg", "a.png", "notes.txt"]:
        (tmp_path / "imgs" / name).write_bytes(b"x")
    assert [p.name for p in resolve_sources(str(tmp_path / "imgs"))] == ["a.png", "b.jpg"]
    assert [p.name for p in resolve_sources(str(tmp_path / "imgs" / "*.jpg"))] == ["b.jpg"]
    assert len(resolve_sources([str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs")])) == 3
    with pytest.raises(UserError, match="no such file"):
        resolve_sources(str(tmp_path / "nope.jpg"))
    with pytest.raises(UserError, match="no images or videos found"):
        resolve_sources(str(tmp_path / "imgs" / "*.gif"))


def test_nms_keys_are_config_keys():
    """The detection NMS keys predict and val read (a default.yaml edit once dropped them without a failing test)."""
    from vistrain.config import get_config

    cfg = get_config({"classes": "0,2", "soft_nms": True, "agnostic_nms": True, "max_det": 10, "conf": 0.5,
                      "iou": 0.6})
    assert (cfg["classes"], cfg["soft_nms"], cfg["agnostic_nms"], cfg["max_det"]) == ("0,2", True, True, 10)


def test_ultralytics_habits(capsys, tmp_path, monkeypatch):
    """Task first (`vistrain detect train ...`, checked against the model's task), `version`, `checks`, `train help`
    without predict / export keys, `help models` as a naturally sorted table with parameters and GFLOPs,
    `model=yolov8n.yaml` as the built-in, and `summary` at each model's own size."""
    import vistrain
    from vistrain.nn.model import builtin_models

    assert main(["version"]) == 0 and capsys.readouterr().out.strip() == vistrain.__version__
    assert main(["checks"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"vistrain {vistrain.__version__}\nPython ") and "torch 2." in out and "RAM:" in out
    assert main(["train", "help"]) == 0
    keys = [line.split("=")[0].strip() for line in capsys.readouterr().out.splitlines() if "=" in line]
    assert "epochs" in keys and "mosaic" in keys and not {"source", "format", "opset", "save", "nms"} & set(keys)
    import vistrain.cli as cli

    # counting every model takes a minute (then cached): here three are counted, the others shown as 0
    picked, real = {"resnet50", "yolov8n", "efficientdet-d0"}, cli.model_stats
    monkeypatch.setattr(cli, "model_stats", lambda rows: {**{r[0]: (0, 0.0) for r in rows},
                                                          **real([r for r in rows if r[0] in picked])})
    assert main(["help", "models"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    names = [r[0] for r in rows]
    assert names.index("resnet18") < names.index("resnet50") < names.index("resnet101")
    table = {r[0]: tuple(r[1:]) for r in rows}
    assert table["yolov8n-seg"][:2] == ("segment", "640")
    # parameters as the peers count them (torchvision, ultralytics, effdet); GFLOPs as `vistrain summary` counts
    # them (torchvision: ResNet-50 4.09 GMACs; ultralytics: YOLOv8n 8.7 GFLOPs; effdet: D0 2.54 GMACs)
    assert table["resnet50"][2:] == ("25,557,032", "8.2")
    assert table["yolov8n"][2:] == ("3,157,200", "8.7")
    assert table["efficientdet-d0"][1:] == ("512", "3,880,067", "5.0")
    assert len(table) == len(builtin_models())
    assert main(["summary", "model=yolov8n.yaml"]) == 0  # ultralytics' file name: the built-in yolov8n
    out = capsys.readouterr().out
    assert out.startswith("yolov8n.yaml at 640 x 640:") and "GFLOPs: 8.7" in out  # ultralytics: 8.7 GFLOPs
    assert main(["detect", "summary", "model=efficientdet-d0"]) == 0
    assert capsys.readouterr().out.startswith("efficientdet-d0 at 512 x 512:")
    assert main(["classify", "train", "model=yolov8n", "epochs=1", f"project={tmp_path}"]) == 2
    assert "task" in capsys.readouterr().err


def test_compare_trains_each_model_and_writes_one_table(tmp_path, capsys):
    """Three detectors on the same tiny data: a row each (params, GFLOPs, train time, img/s, mAP50-95, ms) in
    compare.csv / compare.md and a point each in compare.png; a model that cannot be built keeps its row."""
    import csv

    from vistrain.data.synthetic import make_dataset

    root = make_dataset(tmp_path / "shapes", n=8, imgsz=64, seed=0, workers=1)
    assert main(["compare", f"data={root / 'detect' / 'data.yaml'}", "models=yolov5n,yolov8n,nosuchnet,efficientdet-d0",
                 "epochs=1", "imgsz=64", "batch=4", "nbs=4", "workers=0", f"project={tmp_path / 'runs'}",
                 "plots=False"]) == 0
    folder = tmp_path / "runs" / "detect" / "compare"
    rows = list(csv.DictReader((folder / "compare.csv").open()))
    assert [r["model"] for r in rows] == ["yolov5n", "yolov8n", "nosuchnet", "efficientdet-d0"]
    for r in (rows[0], rows[1], rows[3]):
        assert not r["error"] and float(r["params_M"]) > 1 and float(r["gflops"]) > 0 and float(r["ms"]) > 0
        assert 0 <= float(r["metric"]) <= 1 and float(r["train_img_s"]) > 0
        assert (folder / r["model"] / "weights" / "best.pt").is_file()
    assert "not a built-in model" in rows[2]["error"]
    assert (folder / "compare.png").is_file() and (folder / "compare.md").read_text().count("\n| ") == 4
    assert "| yolov8n |" in capsys.readouterr().out
