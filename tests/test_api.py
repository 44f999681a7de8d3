"""The Python API as an ultralytics user meets it: ``vistrain.Model``, ``Result`` accessors (boxes, masks, probs,
plot, save, JSON), in-memory sources (numpy BGR, PIL, tensors), ``stream=True``, and nothing written from Python
unless ``save=True``."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vistrain
from vistrain import build_model
from vistrain.engine.results import Boxes, Result
from vistrain.engine.utils import UserError


def checkpoint(name: str, folder: Path, imgsz: int = 64, names=("a", "b", "c")) -> Path:
    """A fresh model's checkpoint."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=len(names), imgsz=imgsz)
    path = folder / f"{name}.pt"
    torch.save({"model": model.state_dict(), "model_yaml": model.yaml, "task": model.task, "names": list(names),
                "imgsz": imgsz}, path)
    return path


def test_boxes_accessors_and_indexing():
    data = torch.tensor([[10.0, 20.0, 50.0, 60.0, 0.9, 2.0], [0.0, 0.0, 100.0, 50.0, 0.4, 0.0]])
    b = Boxes(data, (100, 200))  # h 100, w 200
    assert torch.equal(b.xyxy, data[:, :4]) and torch.equal(b.conf, data[:, 4]) and torch.equal(b.cls, data[:, 5])
    assert torch.equal(b.xywh[0], torch.tensor([30.0, 40.0, 40.0, 40.0]))
    assert torch.allclose(b.xyxyn[1], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert torch.allclose(b.xywhn[0], torch.tensor([0.15, 0.4, 0.2, 0.4]))
    assert len(b) == 2 and b.shape == (2, 6) and b[0].xyxy.shape == (1, 4) and len(list(b)) == 2
    high = b[b.conf > 0.5]
    assert isinstance(high, Boxes) and len(high) == 1 and float(high.cls[0]) == 2.0
    assert torch.equal(b[:, :4], data[:, :4]) and b.tolist() == data.tolist()
    assert np.asarray(b).shape == (2, 6)


def test_result_plot_save_and_json(tmp_path):
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0, 0.9, 1.0]])
    masks = torch.zeros(1, 100, 200, dtype=torch.bool)
    masks[0, 30:50, 20:40] = True
    r = Result("x.jpg", ["a", "b"], (100, 200), boxes=boxes, masks=masks, orig_img=image)
    drawn = r.plot()
    assert drawn.shape == (100, 200, 3) and drawn.dtype == np.uint8
    assert tuple(drawn[5, 150]) == (30, 20, 10)  # BGR, untouched background
    assert Path(r.save(tmp_path / "x.jpg")).is_file()
    (det,) = json.loads(r.to_json())
    assert det["name"] == "b" and det["class"] == 1 and det["confidence"] == 0.9
    assert det["box"] == {"x1": 10.0, "y1": 20.0, "x2": 50.0, "y2": 60.0}
    assert min(det["segments"]["x"]) == 20 and max(det["segments"]["y"]) == 49
    assert r.masks.xy[0].shape[1] == 2 and r.masks.data.dtype == torch.bool
    c = Result("y.jpg", ["cat", "dog", "eel"], (10, 10), probs=torch.tensor([0.2, 0.7, 0.1]), orig_img=image)
    assert c.probs.top1 == 1 and c.probs.top5 == [1, 0, 2] and abs(float(c.probs.top1conf) - 0.7) < 1e-6
    assert c.summary()[0] == {"name": "dog", "class": 1, "confidence": 0.7} and c.plot().shape == (100, 200, 3)


def test_in_memory_sources_give_the_file_predictions_and_nothing_is_written(tmp_path):
    """A file, the same image as a numpy BGR array (cv2.imread), a PIL image and a CHW tensor in 0..1: the same
    boxes.  From Python without save=True no run folder appears; stream=True yields the results."""
    import cv2

    ckpt = checkpoint("yolov8n", tmp_path)
    rng = np.random.default_rng(0)
    path = tmp_path / "im.png"
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path)
    kw = {"conf": 0.0001, "max_det": 20, "project": str(tmp_path / "runs")}
    want = vistrain.predict(ckpt, path, **kw)[0]
    assert len(want.boxes) > 0 and not (tmp_path / "runs").exists()
    rgb = np.asarray(Image.open(path))
    sources = [cv2.imread(str(path)), Image.open(path), torch.from_numpy(rgb.copy()).permute(2, 0, 1) / 255.0]
    got = vistrain.predict(ckpt, sources, **kw)
    assert [r.path for r in got] == ["image0.jpg", "image1.jpg", "image2.jpg"]
    for r in got:
        assert r.orig_shape == (48, 80) and torch.equal(r.boxes.data, want.boxes.data)
    stream = vistrain.predict(ckpt, [str(path), str(path)], stream=True, **kw)
    assert isinstance(stream, types.GeneratorType) and len(list(stream)) == 2
    assert not (tmp_path / "runs").exists()
    saved = vistrain.predict(ckpt, f"{path},{path}", save=True, **kw)  # a comma-separated string is a list
    assert len(saved) == 2 and (Path(saved[0].extra["save_dir"]) / "im.jpg").is_file()


def test_urls_and_unknown_sources_are_one_line(tmp_path):
    ckpt = checkpoint("yolov8n", tmp_path)
    with pytest.raises(UserError, match="vistrain does not download"):
        vistrain.predict(ckpt, "https://example.com/bus.jpg")
    with pytest.raises(UserError, match="item 0 is a dict"):
        vistrain.predict(ckpt, [{"not": "an image"}])
    with pytest.raises(UserError, match="HxW or HxWx3"):
        vistrain.predict(ckpt, np.zeros((2, 3, 4, 5), np.uint8))


def test_model_object_trains_validates_predicts_and_exports(colour_folder, tmp_path):
    model = vistrain.Model("yolov5n-cls")
    assert model.task == "classify" and model.model.training is False
    info = model.info(imgsz=32, verbose=False)
    assert info.total_params == sum(p.numel() for p in model.model.parameters()) and info.gflops > 0
    res = model.train(data=str(colour_folder), epochs=1, imgsz=32, batch=8, nbs=8, workers=0, plots=False,
                      project=str(tmp_path / "runs"), verbose=False)
    assert model.source.endswith("best.pt") and model.names == ["blue", "green", "red"]
    assert model.val(workers=0, plots=False, verbose=False)["metrics/accuracy_top1"] == pytest.approx(
        res["metrics/accuracy_top1"], abs=1e-6)
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 2] = 220  # red, in BGR
    (r,) = model(image, imgsz=32)
    assert r.probs.data.shape == (3,) and model.names[r.probs.top1] in model.names
    built = model._prepared[1][1]
    (again,) = model.predict([image], imgsz=32)  # the model is built once, not per call
    assert model._prepared[1][1] is built and torch.equal(again.probs.data, r.probs.data)
    onnx = vistrain.Model(model.export(format="onnx", verbose=False))
    assert onnx.task == "classify" and onnx.names == model.names
    assert torch.allclose(onnx.predict(image, imgsz=32)[0].probs.data, r.probs.data, atol=1e-4)
