"""``freeze=`` for every model, and the frozen -> unfrozen schedule of one run (``freeze_epochs``,
``unfreeze_batch``, ``unfreeze_lr0``), the step decay ``lr_step_gamma`` and the ``cfg=`` recipe file.

Frozen means bit-unchanged: parameters and BatchNorm buffers of the frozen parts equal their start values after
training, in the raw weights and in the EMA, with weight decay and momentum on (SGD, Adam, AdamW).  A run killed in
either phase and resumed equals the uninterrupted run bit for bit, as tests/test_resume.py checks for plain runs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_colour_folder
from vistrain.cli import main
from vistrain.config import ConfigError, get_config, recipes
from vistrain.data.synthetic import make_dataset
from vistrain.engine.checkpoint import load_checkpoint
from vistrain.engine.freeze import model_layers, named_parts, parse_freeze
from vistrain.engine.trainer import Trainer
from vistrain.engine.utils import UserError
from vistrain.nn.model import build_model

COMMON = dict(seed=0, workers=0, threads=1, plots=False, verbose=False, exist_ok=True, deterministic=True)
CLS = dict(model="yolov5n-cls", imgsz=32, batch=6, nbs=12, **COMMON)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("freeze-data")
    shapes = make_dataset(root / "shapes", n=12, imgsz=64, seed=1, workers=1)
    return {"classify": write_colour_folder(root / "colours", per_class=8), "detect": shapes / "detect" / "data.yaml"}


def train(callbacks: dict | None = None, **kw) -> Trainer:
    cfg = get_config(kw)
    cfg["_user_keys"] = sorted(kw)
    trainer = Trainer(cfg, callbacks=callbacks)
    trainer.train()
    return trainer


def csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def snapshot(trainer: Trainer) -> None:
    """on_train_start: the weights and buffers (after freezing) that training starts from.  The EMA is put
    5000 updates on, where ``d * v + (1 - d) * v`` no longer rounds back to ``v`` (the decay is 0.92, not 0.0005)."""
    trainer.start_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    if trainer.ema:
        trainer.ema.updates = 5000


def under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------------------------------------- which parts
def test_parts_of_every_model_family():
    cls = build_model("yolov5n-cls", num_classes=3, imgsz=32)
    assert parse_freeze("3", cls) == ["model.0", "model.1", "model.2"]
    assert parse_freeze("0,1,2", cls) == parse_freeze("[0, 1, 2]", cls) == ["model.0", "model.1", "model.2"]
    assert parse_freeze("[5]", cls) == ["model.5"]  # ultralytics' list form: layer 5 only
    assert parse_freeze("backbone", cls) == [f"model.{i}" for i in range(len(cls.yaml["backbone"]))]
    assert parse_freeze("model.3,model.4.", cls) == ["model.3", "model.4"]  # state_dict prefixes
    assert parse_freeze(None, cls) == parse_freeze("", cls) == parse_freeze("0", cls) == []
    det = build_model("yolov5n", num_classes=3)
    assert parse_freeze("backbone", det) == [f"model.{i}" for i in range(10)]  # rows 0-9 of yolov5's backbone:
    resnet = build_model("resnet18", num_classes=3)
    assert model_layers(resnet) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert parse_freeze("backbone", resnet) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert parse_freeze("2", resnet) == ["conv1", "bn1"]
    effdet = build_model("efficientdet-d0", num_classes=3)
    assert model_layers(effdet) == ["backbone", "fpn", "class_net", "box_net"]
    assert parse_freeze("backbone", effdet) == ["backbone"] and parse_freeze("2", effdet) == ["backbone", "fpn"]
    assert set(named_parts(effdet)) == {"backbone", "fpn", "class_net", "box_net"}
    effnet = build_model("efficientnet-b0", num_classes=3)
    assert "classifier" not in parse_freeze("backbone", effnet) and "blocks" in parse_freeze("backbone", effnet)
    for spec, words in (("abc", ["'abc'", "backbone, fpn, class_net, box_net"]), ("7", ["4 layers"]),
                        ("1,9", ["no layer 9"])):
        with pytest.raises(UserError) as e:
            parse_freeze(spec, effdet)
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- frozen = unchanged
@pytest.mark.parametrize("family, freeze, optimizer", [("classify", "3", "SGD"), ("classify", "backbone", "Adam"),
                                                       ("detect", "10", "AdamW"), ("detect", "0,1,2", "SGD"),
                                                       ("efficientdet", "backbone", "Adam")])
def test_frozen_parts_stay_bit_equal(family, freeze, optimizer, data, tmp_path):
    if family == "efficientdet":  # timm's backbone: BatchNormAct2d layers, drop-path
        pytest.importorskip("vistrain.losses.effdet", reason="EfficientDet training (its loss) is not there yet")
    kw = (dict(CLS, data=str(data["classify"]), dropout=0.1) if family == "classify" else
          dict(model="yolov5n" if family == "detect" else "efficientdet-d0", data=str(data["detect"]),
               imgsz=64 if family == "detect" else 128, batch=4, nbs=8, mosaic=0.5, **COMMON))
    trainer = train({"on_train_start": [snapshot]}, **kw, epochs=2, warmup_epochs=1.0, optimizer=optimizer,
                    lr0=0.01, weight_decay=0.01, momentum=0.9, freeze=freeze, project=str(tmp_path))
    prefixes = trainer.freezer.prefixes
    start, ckpt = trainer.start_state, load_checkpoint(trainer.wdir / "last.pt")
    frozen = [k for k in start if under(k, prefixes)]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert frozen and trainable and not trainable & set(frozen)
    for part in ("train_model", "model"):  # the raw weights and the EMA
        changed = [k for k in frozen if not torch.equal(start[k].float().contiguous(), ckpt[part][k].float())]
        assert not changed, f"{part}: frozen {changed[:3]} changed"
        moved = [k for k in trainable if not torch.equal(start[k].float().contiguous(), ckpt[part][k].float())]
        # (a few BatchNorm weights may not move in 6 warmup batches: SGD's first steps have an lr near 0)
        assert len(moved) >= 0.9 * len(trainable), f"{part}: {sorted(trainable - set(moved))[:3]} ... never moved"
    bn_stats = [k for k in start if k.endswith("running_mean")]
    assert any(not torch.equal(start[k], ckpt["train_model"][k]) for k in bn_stats if not under(k, prefixes))
    assert all(len(g["params"]) == 0 or all(p.requires_grad for p in g["params"])
               for g in trainer.optimizer.param_groups)  # the optimizer never holds a frozen parameter
    assert {r["frozen"] for r in csv_rows(trainer.csv)} == {"1"}  # freeze_epochs=0: frozen the whole run


# ---------------------------------------------------------------------------------------------- two phases
def test_switch_to_unfrozen_phase_at_its_epoch(data, tmp_path):
    seen = []

    def on_epoch_start(t):
        head, body = t.model.model[-1], t.model.model[0]
        seen.append(dict(epoch=t.epoch, phase=t.phase, batch=t.train_loader.batch_size, accumulate=t.accumulate,
                         lr=t.optimizer.param_groups[0]["lr"], body_grad=body.conv.weight.requires_grad,
                         head_grad=next(head.parameters()).requires_grad,
                         params=sum(len(g["params"]) for g in t.optimizer.param_groups),
                         body=body.conv.weight.detach().clone()))

    trainer = train({"on_epoch_start": [on_epoch_start], "on_train_start": [snapshot]}, **{**CLS, "nbs": 0},
                    data=str(data["classify"]), epochs=4, freeze="backbone", freeze_epochs=2, unfreeze_batch=4,
                    unfreeze_lr0=0.002, optimizer="Adam", lr0=0.01, lr_step_gamma=0.5, warmup_epochs=0,
                    project=str(tmp_path))
    assert [s["phase"] for s in seen] == [1, 1, 2, 2]
    assert [s["batch"] for s in seen] == [6, 6, 4, 4] and [s["accumulate"] for s in seen] == [1, 1, 1, 1]
    assert [s["body_grad"] for s in seen] == [False, False, True, True] and all(s["head_grad"] for s in seen)
    assert seen[0]["params"] < seen[2]["params"] == sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert torch.equal(seen[2]["body"], trainer.start_state["model.0.conv.weight"])  # unchanged through phase 1
    assert not torch.equal(seen[3]["body"], seen[2]["body"])  # and trained in phase 2
    rows = csv_rows(trainer.csv)
    assert [r["frozen"] for r in rows] == ["1", "1", "0", "0"]
    # step decay from lr0, then from unfreeze_lr0 again (StepLR step_size=1): the lr each epoch ended with
    assert [float(r["lr/pg0"]) for r in rows] == pytest.approx([0.01, 0.005, 0.002, 0.001])


def test_unfrozen_phase_without_own_lr_runs_the_schedule_on(data, tmp_path):
    trainer = train(**CLS, data=str(data["classify"]), epochs=4, freeze="2", freeze_epochs=1, optimizer="SGD",
                    lr0=0.01, lrf=0.1, warmup_epochs=0, project=str(tmp_path))
    lrs = [float(r["lr/pg0"]) for r in csv_rows(trainer.csv)]
    assert lrs == pytest.approx([0.01 * (1 - e / 4 * 0.9) for e in range(4)])  # the linear schedule, no jump
    assert [r["frozen"] for r in csv_rows(trainer.csv)] == ["1", "0", "0", "0"]


KILLER = r"""
import json, os, signal, sys
from vistrain.config import get_config
from vistrain.engine.trainer import Trainer

kw, (kill_epoch, kill_batch) = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cfg = get_config(kw)
cfg["_user_keys"] = sorted(kw)
trainer = Trainer(cfg)
seen = {}

def kill(t):
    seen[t.epoch] = seen.get(t.epoch, 0) + 1
    if t.epoch == kill_epoch and seen[t.epoch] == kill_batch:
        os.kill(os.getpid(), signal.SIGKILL)

trainer.add_callback("on_batch_end", kill)
trainer.train()
"""


def two_phase_run(data: dict[str, Path]) -> dict:
    """4 epochs, 2 frozen: gradients accumulate over 2 batches of 6 in phase 1 and 3 batches of 4 in phase 2 (nbs
    12), so accumulations span the kills; warmup, dropout and colour jitter draw random numbers."""
    return dict(CLS, data=str(data["classify"]), epochs=4, freeze="backbone", freeze_epochs=2, unfreeze_batch=4,
                unfreeze_lr0=0.003, optimizer="AdamW", lr0=0.01, lr_step_gamma=0.8, warmup_epochs=1.0,
                dropout=0.2, hsv=0.3)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    return train(**two_phase_run(data), project=str(tmp_path_factory.mktemp("full")), name="full").wdir / "last.pt"


# (epoch index, batch) of the kill: in phase 1; in phase 2's first epoch (last.pt is phase 1's: resume makes the
# switch); in phase 2's second epoch (last.pt is phase 2's: resume starts unfrozen with phase 2's batch and lr)
@pytest.mark.parametrize("kill_at", [(1, 2), (2, 2), (3, 4)])
def test_killed_in_either_phase_and_resumed_equals_uninterrupted(kill_at, data, uninterrupted, tmp_path):
    cfg = {**two_phase_run(data), "project": str(tmp_path / "runs"), "name": "killed"}
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg), json.dumps(kill_at)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    last = tmp_path / "runs" / "classify" / "killed" / "weights" / "last.pt"
    assert load_checkpoint(last)["phase"]["phase"] == (1 if kill_at[0] <= 2 else 2)

    seen = []
    train({"on_epoch_start": [lambda t: seen.append((t.epoch, t.phase, t.train_loader.batch_size))]},
          resume=str(last))
    assert seen[0] == (kill_at[0], 1 if kill_at[0] < 2 else 2, 6 if kill_at[0] < 2 else 4)

    a, b = load_checkpoint(uninterrupted), load_checkpoint(last)
    assert b["epoch"] == a["epoch"] == 3 and b["phase"] == a["phase"]
    for part in ("train_model", "model"):
        diff = [k for k, v in a[part].items() if not torch.equal(v, b[part][k])]
        assert not diff, f"{part}: {len(diff)} of {len(a[part])} tensors differ, first {diff[0]}"
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert all(torch.equal(va[s], vb[s]) for s in va), f"optimizer state {ka}"
    full = csv_rows(uninterrupted.parent.parent / "results.csv")
    rows = csv_rows(last.parent.parent / "results.csv")
    assert [r["frozen"] for r in rows] == ["1", "1", "0", "0"]
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == \
           [{k: v for k, v in r.items() if k != "time"} for r in full]


# ---------------------------------------------------------------------------------------------- bad values, cfg=
@pytest.mark.parametrize("args, words", [
    (["freeze=abc"], ["freeze=abc: no part 'abc'", "backbone, head"]),
    (["freeze=40"], ["freeze=40: this model has 10 layers"]),
    (["freeze=0,1,2,3,4,5,6,7,8,9"], ["freezes every parameter"]),
    (["freeze_epochs=2"], ["freeze_epochs=2 needs freeze="]),
    (["freeze=2", "unfreeze_lr0=0.001"], ["unfreeze_lr0=0.001", "freeze_epochs="]),
    (["lr_step_gamma=0.9", "cos_lr=True"], ["choose one"]),
    (["lr_step_gamma=1.5"], ["lr_step_gamma=1.5: must lie between 0 and 1"]),
    (["unfreeze_batch=0"], ["unfreeze_batch=0: must be greater than 0"]),
    (["cfg=no-such-recipe"], ["cfg=no-such-recipe: no such file", "efficientdet-tutorial"]),
])
def test_bad_values_are_one_line_errors(args, words, data, capsys):
    code = main(["train", "model=yolov5n-cls", f"data={data['classify']}", "imgsz=32", "epochs=1", "workers=0",
                 "plots=False", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err


def test_cfg_file_and_recipe(tmp_path):
    cfg = get_config(kw := {"cfg": "efficientdet-tutorial", "epochs": 3})
    assert "efficientdet-tutorial" in recipes()
    assert (cfg["model"], cfg["optimizer"], cfg["freeze"], cfg["freeze_epochs"]) == ("efficientdet-d0", "Adam",
                                                                                      "backbone", 50)
    assert (cfg["lr0"], cfg["unfreeze_lr0"], cfg["batch"], cfg["unfreeze_batch"]) == (1e-3, 1e-4, 8, 4)
    assert (cfg["weight_decay"], cfg["lr_step_gamma"], cfg["nbs"], cfg["warmup_epochs"]) == (5e-4, 0.94, 0, 0.0)
    assert cfg["epochs"] == 3  # keys given beside cfg= win
    assert {"model", "freeze", "lr0", "epochs", "cfg"} <= set(kw)  # the file's keys count as the user's keys
    assert get_config({"cfg": "efficientdet-tutorial.yaml"})["epochs"] == 100
    mine = tmp_path / "mine.yaml"
    mine.write_text("freeze: [0, 1, 2]\nbatch: 4\n")
    assert (get_config({"cfg": str(mine)})["freeze"], get_config({"cfg": str(mine)})["batch"]) == ("[0,1,2]", 4)
    mine.write_text("epoch: 4\n")
    with pytest.raises(ConfigError, match=r"cfg=.*mine.yaml: unknown key 'epoch'; did you mean 'epochs'"):
        get_config({"cfg": str(mine)})
    model_yaml = tmp_path / "net.yaml"
    model_yaml.write_text("nc: 3\nbackbone: []\nhead: []\n")
    with pytest.raises(ConfigError, match="a model YAML.*model="):
        get_config({"cfg": str(model_yaml)})
