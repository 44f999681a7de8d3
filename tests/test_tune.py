"""``vistrain tune`` on Ray Tune: a 3-trial, 2-epoch search on tiny data; every trial trains with the values Ray
sampled for it (the peers' trials have ignored them), and ``best.yaml`` runs the best trial again."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_colour_folder
from vistrain.config import get_config
from vistrain.engine.checkpoint import load_checkpoint
from vistrain.engine.utils import UserError

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}"}


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_search_trains_each_trial_with_its_sampled_values(tmp_path):
    pytest.importorskip("ray")
    data = write_colour_folder(tmp_path / "colours", per_class=8)
    space = tmp_path / "space.yaml"
    space.write_text("lr0: {loguniform: [0.0001, 0.01]}\nmomentum: [0.6, 0.95]\nfliplr: {choice: [0.0, 0.5]}\n")
    args = ["model=yolov5n-cls", f"data={data}", "imgsz=32", "epochs=2", "iterations=3", "batch=8", "workers=0",
            "plots=False", f"space={space}", "cpu_per_trial=1"]
    proc = subprocess.run([sys.executable, "-m", "vistrain", "tune", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tune_dir = tmp_path / "runs" / "classify" / "tune"
    trials = rows(tune_dir / "results.csv")
    assert len(trials) == 3 and (tune_dir / "fitness.png").stat().st_size > 0
    assert len({t["lr0"] for t in trials}) == 3
    for t in trials:
        run = Path(t["save_dir"])
        assert run.parent == tune_dir / "trials" and not t["error"]
        saved = yaml.safe_load((run / "args.yaml").read_text())
        assert saved["lr0"] == float(t["lr0"]) and saved["momentum"] == float(t["momentum"])
        assert saved["fliplr"] == float(t["fliplr"]) and saved["epochs"] == 2
        # and the optimizer did take them (optimizer=auto keeps a sampled lr0 and momentum)
        group = load_checkpoint(run / "weights" / "last.pt")["optimizer"]["param_groups"][0]
        assert group["initial_lr"] == float(t["lr0"]) and group["betas"][0] == float(t["momentum"])
    best = yaml.safe_load((tune_dir / "best.yaml").read_text())
    top = max(trials, key=lambda t: float(t["fitness"]))
    assert best["lr0"] == float(top["lr0"]) and best["data"] == str(data)
    # best.yaml runs the best trial again: the same results, epoch by epoch, for the epochs it ran
    proc = subprocess.run([sys.executable, "-m", "vistrain", "train", f"cfg={tune_dir / 'best.yaml'}", "name=again"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = rows(tmp_path / "runs" / "classify" / "again" / "results.csv")
    trial = rows(Path(top["save_dir"]) / "results.csv")
    for a, b in zip(again, trial):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}


def test_without_ray_one_line_names_the_extra(monkeypatch, colour_folder):
    from vistrain.engine.tune import tune

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'vistrain\[tune\]'"):
        tune(get_config({"model": "yolov5n-cls", "data": str(colour_folder)}))


def test_space_file_typo_is_one_line(tmp_path, colour_folder):
    pytest.importorskip("ray")
    from vistrain.engine.tune import tune

    space = tmp_path / "space.yaml"
    space.write_text("lr: [0.001, 0.01]\n")
    cfg = get_config({"model": "yolov5n-cls", "data": str(colour_folder), "space": str(space)})
    with pytest.raises(UserError, match=r"space=.*space.yaml: unknown key 'lr'; did you mean 'lr0'\?"):
        tune(cfg)
    space.write_text("lr0: [0.01, 0.001]\n")
    with pytest.raises(UserError, match=r"lr0: .*low must be below high"):
        tune(cfg)
