"""The peers' pickled weight files, read safely: an ultralytics ``.pt`` (YOLOv8 detect, segment, classify) and a yolov5
``.pt``, made by the oracle packages (random init), load with those packages unimportable and give the peer's raw
outputs; ``vistrain convert`` writes a vistrain checkpoint; files that would call anything else are refused and
run nothing."""

from __future__ import annotations

import copy
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from test_yolov5_oracle import ref  # noqa: F401  (the yolov5 oracle fixture)

import vistrain
from vistrain.cli import main
from vistrain.engine.checkpoint import load_checkpoint, load_pretrained
from vistrain.engine.utils import UserError
from vistrain.ops.boxes import decode_dfl


def unimportable(monkeypatch, package: str) -> None:
    """``import package`` (and its submodules) fails from here on in this test."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def outputs(out) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in outputs(o)] if isinstance(out, (list, tuple)) else []


@pytest.mark.parametrize("name", ["yolov8n", "yolov8n-seg"])
def test_ultralytics_file_loads_without_ultralytics_and_gives_its_outputs(name, ultralytics_home, tmp_path,
                                                                          monkeypatch):
    from ultralytics import YOLO

    torch.manual_seed(0)
    peer = YOLO(f"{name}.yaml")
    path = tmp_path / f"{name}.pt"
    peer.save(str(path))  # ultralytics' own checkpoint format (the model pickled in half precision)
    theirs = YOLO(str(path)).model.float().eval()
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        t = theirs(x)
    want = (t[0][0] if name.endswith("-seg") else t[0] if isinstance(t, (tuple, list)) else t).transpose(1, 2)
    unimportable(monkeypatch, "ultralytics")
    model = vistrain.Model(path)
    assert model.task == ("segment" if name.endswith("-seg") else "detect") and len(model.names) == 80
    net = model.model.eval()
    with torch.no_grad():
        out = net(x)
    levels = out[0] if name.endswith("-seg") else out
    got = decode_dfl(levels, net.model[-1].stride, net.model[-1].reg_max)  # [B, N, 4 + nc]: boxes, scores
    torch.testing.assert_close(got, want[..., :84], rtol=1e-4, atol=1e-3)
    if name.endswith("-seg"):
        torch.testing.assert_close(out[1].transpose(1, 2), want[..., 84:], rtol=1e-4, atol=1e-4)
    fresh = vistrain.build_model(name, num_classes=3)  # pretrained= with 3 classes: all but the class branch
    copied, total = load_pretrained(fresh, path)
    assert total - copied == sum(k.startswith("model.22.cv3.") and "num_batches" not in k for k in fresh.state_dict())
    out = tmp_path / "converted.pt"
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(path), str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)  # a plain vistrain checkpoint: no pickled objects
    assert ckpt["task"] == model.task and ckpt["converted_from"]["package"] == "ultralytics"
    assert vistrain.predict(out, torch.rand(3, 96, 128), conf=0.5)[0].orig_shape == (96, 128)


def test_ultralytics_classifier_file_loads_without_ultralytics(ultralytics_home, tmp_path, monkeypatch):
    """A yolov8n-cls file: its probabilities (eval) and logits (train mode, BatchNorm on batch statistics)."""
    from ultralytics import YOLO

    torch.manual_seed(0)
    path = tmp_path / "yolov8n-cls.pt"
    YOLO("yolov8n-cls.yaml").save(str(path))
    theirs = YOLO(str(path)).model.float()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        probs = theirs.eval()(x)
        logits = theirs.train()(x)
    probs = probs[0] if isinstance(probs, (tuple, list)) else probs
    unimportable(monkeypatch, "ultralytics")
    model = vistrain.Model(path)
    assert model.task == "classify" and len(model.names) == 1000
    net = model.model
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x).softmax(1), probs, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(net.train()(x), logits, rtol=1e-4, atol=1e-5)


def test_yolov5_file_loads_without_yolov5_and_gives_its_outputs(tmp_path, monkeypatch, request):
    """A checkpoint as the yolov5 package's train.py writes it (the model object in half precision, the EMA, the
    options), weights randomised so that outputs depend on every layer."""
    from test_yolov5_oracle import _randomise_weights, _reference_model

    ref = request.getfixturevalue("ref")  # the yolov5 oracle fixture (skips when it is not installed)
    torch.manual_seed(0)
    theirs = _reference_model(ref, "yolov5n", nc=3)
    _randomise_weights(theirs)
    theirs.names = ["cat", "dog", "eel"]
    path = tmp_path / "yolov5n.pt"
    torch.save({"epoch": -1, "model": copy.deepcopy(theirs).half(), "ema": None, "opt": {"imgsz": 320}}, path)
    theirs = theirs.half().float().eval()  # the weights as the file holds them
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        want = theirs(x)[1]
    unimportable(monkeypatch, "yolov5")
    ckpt = load_checkpoint(path)
    assert ckpt["task"] == "detect" and ckpt["imgsz"] == 320 and ckpt["names"] == ["cat", "dog", "eel"]
    assert ckpt["converted_from"]["class"] == "yolov5.models.yolo.DetectionModel"
    model = vistrain.Model(path).model
    with torch.no_grad():
        got = model(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


MARK = "vistrain-pwned"


class Evil:
    """Unpickles as a call of ``os.system``."""

    def __reduce__(self):
        return os.system, (f"touch {MARK}",)


def fake_peer_module(monkeypatch, modname: str):
    """A module named like a peer's, with a function that would write a file if it ever ran."""
    mod = types.ModuleType(modname)

    def run(arg):  # pragma: no cover - must never run
        Path(MARK).write_text(arg)

    run.__module__, run.__qualname__ = modname, "run"
    mod.run = run
    monkeypatch.setitem(sys.modules, modname, mod)
    return run


class CallsPeer:
    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return self.fn, ("x",)


@pytest.mark.parametrize("variant", ["os.system", "os.system inside a peer file", "peer function"])
def test_malicious_weight_files_are_refused_and_run_nothing(variant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    if variant == "os.system":
        torch.save({"model": Evil()}, path)
    elif variant == "os.system inside a peer file":
        torch.save({"model": {"weight": torch.zeros(2)}, "train_args": Evil(), "version": "8.4.0"}, path)
    else:  # a callable under the peers' module names: it becomes an inert placeholder, never called
        fn = fake_peer_module(monkeypatch, "ultralytics.utils.evil")
        torch.save({"model": CallsPeer(fn)}, path)
        monkeypatch.delitem(sys.modules, "ultralytics.utils.evil")
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and len(str(e.value).splitlines()) == 1
    if variant != "peer function":
        assert "loading it would call posix.system" in str(e.value) and "never runs code" in str(e.value)
    assert not (tmp_path / MARK).exists()
    assert main(["predict", f"model={path}", f"source={tmp_path}"]) == 2
    assert not (tmp_path / MARK).exists()
    with pytest.raises(pickle.UnpicklingError):  # and the file really was malicious: plain torch.load refuses too
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_state_dict_is_a_model(name, tmp_path):
    """A torchvision ResNet's weight file (a bare state_dict) as model=: the depth and the class count are read
    from the tensors, and the outputs are torchvision's."""
    import torchvision

    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None, num_classes=7).eval()
    path = tmp_path / f"{name}-custom.pth"
    torch.save(theirs.state_dict(), path)
    model = vistrain.Model(path)
    assert model.task == "classify" and len(model.names) == 7
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.model(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize("scale", ["d0", "d7x"])
def test_effdet_state_dict_and_safetensors_are_models(scale, tmp_path):
    """An effdet EfficientDet's weight file, as .pth and as .safetensors: the D-level (BiFPN width and cells,
    levels) and the class count come from the tensors; the outputs equal effdet's."""
    effdet = pytest.importorskip("effdet")
    from safetensors.torch import save_file

    cfg = effdet.get_efficientdet_config(f"tf_efficientdet_{scale}")
    cfg.num_classes, cfg.image_size = 20, (128, 128)
    torch.manual_seed(0)
    theirs = effdet.EfficientDet(cfg, pretrained_backbone=False).eval()
    sd = theirs.state_dict()
    torch.save(sd, tmp_path / "weights.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "weights.safetensors"))
    x = torch.rand(1, 3, 128, 128)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = outputs(theirs((x - mean) / std))
    for file in ("weights.pth", "weights.safetensors"):
        ckpt = load_checkpoint(tmp_path / file)
        assert ckpt["model_yaml"]["name"] == f"efficientdet-{scale}" and len(ckpt["names"]) == 20
        model = vistrain.Model(tmp_path / file).model
        with torch.no_grad():
            got = outputs(model(x))
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want)), file
