"""Seeing inside a model in predict: feature maps (``visualize``), embeddings (``embed``, ``Model.embed``) and a
per-layer profile (``profile``, also in ``summary``), by hooks around the forward pass: ``model(x)`` is unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_api import checkpoint

import vistrain
from vistrain.engine.utils import UserError
from vistrain.nn.model import build_model
from vistrain.utils.layers import default_embed_layer, layer_gflops, model_layers, profile_layers
from vistrain.utils.summary import summarize


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("name, chosen", [("yolov8n", "2,4,15"), ("yolov8n-seg", "4,9"), ("yolov5n-cls", "0,8"),
                                          ("resnet18", "layer1,layer4"), ("efficientdet-d0", "backbone.blocks.2")])
def test_visualize_writes_one_readable_grid_per_chosen_layer(name, chosen, images, tmp_path):
    ckpt = checkpoint(name, tmp_path, imgsz=128 if name.startswith("efficientdet") else 64)
    res = vistrain.predict(ckpt, str(images[0]), visualize=chosen, project=str(tmp_path / "runs"), name="vis")
    files = res[0].extra["feature_maps"]
    layers = model_layers(build_model(name, num_classes=3, imgsz=128 if name.startswith("efficientdet") else 64))
    picked = [k for k, (n, _, _) in enumerate(layers) if n in chosen.split(",")] if not chosen[0].isdigit() else \
        [int(k) for k in chosen.split(",")]
    assert [f.split("_stage")[1].split("_")[0] for f in files] == [str(k) for k in picked]
    for f in files:
        assert f.startswith(str(tmp_path / "runs")) and f.endswith("_features.png") and "img0_stage" in f
        a = np.asarray(Image.open(f).convert("L"), dtype=float)
        assert a.std() > 5  # not blank
    every = vistrain.predict(ckpt, str(images[0]), visualize=True, project=str(tmp_path / "runs"), name="all")
    assert len(every[0].extra["feature_maps"]) >= 5


def test_embeddings_are_stable_distinct_and_shaped(images, tmp_path):
    ckpt = checkpoint("yolov8n", tmp_path)
    model = vistrain.Model(ckpt)
    e1, e2 = model.embed([str(p) for p in images]), model.embed([str(p) for p in images])
    layers = model_layers(build_model("yolov8n", num_classes=3))
    k = default_embed_layer(layers)
    assert k == len(layers) - 2  # the layer before the Detect head, as ultralytics
    assert e1.shape == (2, 256) and torch.equal(e1, e2)  # yolov8n's last neck layer: 256 channels
    assert float((e1[0] - e1[1]).abs().max()) > 0.05 * float(e1.abs().max())  # (a fresh net's features are tiny)
    two = model.embed(str(images[0]), layers="15,21")  # 64 + 256 channels, concatenated
    assert two.shape == (1, 64 + 256)  # (batch 1 against batch 2: other kernels, the last bits differ)
    torch.testing.assert_close(two[0, 64:], e1[0], rtol=1e-4, atol=1e-4 * float(e1.abs().max()))
    res = vistrain.predict(ckpt, str(images[0]), embed="21")
    torch.testing.assert_close(res[0].embedding, e1[0], rtol=1e-4, atol=1e-4 * float(e1.abs().max()))
    assert res[0].boxes is not None  # predictions as usual beside it
    saved = vistrain.predict(ckpt, str(images[1]), embed=True, save=True, save_json=True,
                             project=str(tmp_path / "runs"), name="emb")
    records = json.loads((tmp_path / "runs" / "detect" / "emb" / "embeddings.json").read_text())
    assert records[0]["layers"] == ["21"] and len(records[0]["embedding"]) == 256
    assert np.allclose(records[0]["embedding"], saved[0].embedding.numpy(), rtol=1e-5, atol=1e-6 * float(
        e1.abs().max()))
    with pytest.raises(UserError, match=r"embed=99: no layer '99'; the model has layers 0..22"):
        model.embed(str(images[0]), layers=99)
    for name, dim in (("resnet18", 512), ("efficientnet-b0", 1280)):
        assert vistrain.Model(checkpoint(name, tmp_path)).embed(str(images[0])).shape == (1, dim)


@pytest.mark.parametrize("name", ["yolov8n", "resnet18"])
def test_profile_sums_to_the_forward_and_counts_summarys_gflops(name):
    model = build_model(name, num_classes=3).eval()
    x = torch.zeros(1, 3, 128, 128)  # (at 64 px Python's overhead between layers is a larger share of the time)
    prof = profile_layers(model, x, runs=9)
    assert abs(prof["layers_ms"] - prof["total_ms"]) <= 0.2 * prof["total_ms"], prof
    assert prof["gflops"] == pytest.approx(summarize(model, imgsz=128).gflops, rel=1e-9)
    per, total = layer_gflops(model, x)
    assert sum(per) == pytest.approx(total, rel=1e-6)  # every FLOP belongs to one layer
    assert abs(sum(r[4] for r in prof["rows"]) - 1) < 1e-6 and all(r[3] >= 0 for r in prof["rows"])


def test_profile_in_predict_and_summary(images, tmp_path, capsys):
    from vistrain.cli import main

    ckpt = checkpoint("yolov5n-cls", tmp_path)
    assert main(["predict", f"model={ckpt}", f"source={images[0]}", "profile=True", "save=False"]) == 0
    out = capsys.readouterr().out
    assert "profile: batch (1, 3, 64, 64)" in out and "slowest 10 layers:" in out and "whole forward" in out
    assert main(["summary", "model=yolov5n-cls", "imgsz=64", "profile=True"]) == 0
    assert "GFLOPs" in capsys.readouterr().out


def test_hooks_leave_the_model_as_it_was(images, tmp_path):
    ckpt = checkpoint("yolov8n-seg", tmp_path)
    plain = vistrain.predict(ckpt, str(images[0]), conf=0.01)
    seen = vistrain.predict(ckpt, str(images[0]), conf=0.01, visualize="9", embed="true", profile=True,
                            project=str(tmp_path / "runs"))
    assert torch.equal(plain[0].boxes.data, seen[0].boxes.data)
    assert plain[0].embedding is None and seen[0].embedding.ndim == 1


def test_yolov8_classifier_trains_with_the_classification_task(colour_folder):
    res = vistrain.train(model="yolov8n-cls", data=str(colour_folder), imgsz=32, epochs=1, batch=8, nbs=8, workers=0,
                         plots=False, name="v8cls")
    assert res["metrics/accuracy_top1"] >= 0 and (torch.load(f"{res['save_dir']}/weights/best.pt",
                                                             weights_only=True)["model_yaml"]["name"] == "yolov8n-cls")
