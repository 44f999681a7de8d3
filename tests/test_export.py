"""vistrain export: every built-in model YAML to ONNX and TorchScript (OpenVINO where installed), outputs equal to
PyTorch's at two input sizes and batch sizes; metadata in the files; bad input is one line.  (val and predict from
exported files: tests/test_efficientdet_train.py, on a trained model.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import vistrain
from vistrain import build_model
from vistrain.cli import main
from vistrain.config import get_config
from vistrain.engine.predictor import inference_model
from vistrain.deploy.runtime import load_exported
from vistrain.nn.model import MODELS_DIR
from vistrain.tasks.base import get_task

pytest.importorskip("onnx", reason="onnx is a dev extra")
pytest.importorskip("onnxruntime", reason="onnxruntime is a dev extra")
HAVE_OPENVINO = True
try:
    import openvino  # noqa: F401
except ImportError:
    HAVE_OPENVINO = False


def one_name_per_yaml() -> list[str]:
    """The smallest scale of every built-in model YAML (EfficientDet-D0, EfficientNet-B0, yolov5n, ...)."""
    names = []
    for p in sorted(MODELS_DIR.glob("*.yaml")):
        d = yaml.safe_load(p.read_text())
        scale = next(iter(d.get("scales") or {}), None)
        if scale is None:
            names.append(p.stem)
        elif d.get("arch") in ("efficientdet", "efficientnet"):
            names.append(f"{p.stem}-{scale}")
        else:
            m = re.match(r"^(yolov\d+)(.*)$", p.stem)
            names.append(f"{m.group(1)}{scale}{m.group(2)}")
    return names


MODELS = one_name_per_yaml()


def size_of(name: str) -> int:
    return 128 if name.startswith("efficientdet") else 64


def fresh_checkpoint(name: str, folder: Path, names=("a", "b", "c")) -> Path:
    """A checkpoint of a fresh model whose BatchNorms hold non-trivial running statistics (so folding them
    into the convolutions is exercised)."""
    torch.manual_seed(0)
    imgsz = size_of(name)
    model = build_model(name, num_classes=3, imgsz=imgsz)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, imgsz, imgsz))
    path = folder / f"{name}.pt"
    torch.save({"model": model.state_dict(), "model_yaml": model.yaml, "task": model.task, "names": list(names),
                "imgsz": imgsz}, path)
    return path


def reference(ckpt: Path):
    """The checkpoint's model as PyTorch runs it (unfused, NCHW): ``decode(model(x))``."""
    model = build_model(str(ckpt))
    task = get_task(model.task)
    cfg = get_config({"fuse": False, "channels_last": False, "imgsz": size_of(ckpt.stem)})
    return inference_model(model, task, cfg, torch.device("cpu"))


def outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_same_outputs(runner, ref, name: str, dynamic_hw: bool) -> None:
    """At two batch sizes, and two input sizes when they are dynamic: max abs diff <= 1e-4 (FP32)."""
    s = size_of(name)
    sizes = [(1, s, s), (2, s + 32, s + 64)] if dynamic_hw else [(1, s, s), (3, s, s)]
    for b, h, w in sizes:
        x = torch.rand(b, 3, h, w)
        with torch.no_grad():
            want = outputs(ref(x))
        got = outputs(runner(x))
        assert len(got) == len(want)
        for g, r in zip(got, want):
            assert g.shape == r.shape, (b, h, w)
            assert float((g - r).abs().max()) <= 1e-4, (name, b, h, w, float((g - r).abs().max()))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", MODELS)
def test_every_model_yaml_exports_with_equal_outputs(name, fmt, tmp_path):
    ckpt = fresh_checkpoint(name, tmp_path)
    path = vistrain.export(model=str(ckpt), format=fmt, dynamic=True, verbose=False)
    assert path == ckpt.with_suffix("." + fmt) and path.is_file()
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(path))
        onnx.checker.check_model(graph)
        assert graph.opset_import[0].version >= 17
        props = {p.key: p.value for p in graph.metadata_props}
        assert props["task"] == build_model(name, num_classes=3).task and yaml.safe_load(props["names"]) == ["a", "b", "c"]
    runner = load_exported(path)
    meta = runner.meta
    assert meta["names"] == ["a", "b", "c"] and meta["imgsz"] == [size_of(name)] * 2
    assert meta["model_yaml"]["name"] == build_model(name, num_classes=3).yaml["name"]
    assert meta["dynamic_hw"] == (not name.startswith(("efficientdet", "yolov5-backbone-cls")))  # fixed-size models
    assert_same_outputs(runner, reference(ckpt), name, meta["dynamic_hw"])


@pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino not installed (pip install 'vistrain[openvino]')")
@pytest.mark.parametrize("name", ["yolov8n-seg", "yolov5n", "efficientdet-d0", "resnet18"])
def test_openvino_exports_with_equal_outputs(name, tmp_path):
    ckpt = fresh_checkpoint(name, tmp_path)
    path = vistrain.export(model=str(ckpt), format="openvino", dynamic=True, verbose=False)
    assert path.name == f"{name}_openvino_model" and any(path.glob("*.xml")) and not any(path.glob("*.onnx"))
    runner = load_exported(path)
    assert runner.meta["task"] == build_model(name, num_classes=3).task
    assert_same_outputs(runner, reference(ckpt), name, runner.meta["dynamic_hw"])


def test_half_on_cpu(tmp_path, caplog):
    """half=True without CUDA: ONNX and TorchScript say so and export FP32 (as ultralytics does); OpenVINO stores
    FP16 weights (about half the file) whose outputs stay within FP16 rounding of PyTorch's.  (FP16 ONNX and
    TorchScript on CUDA need a GPU: not run here.)"""
    import logging

    ckpt = fresh_checkpoint("yolov5n", tmp_path)
    with caplog.at_level(logging.WARNING, logger="vistrain"):
        path = vistrain.export(model=str(ckpt), format="onnx", half=True, verbose=False)
    assert "half=True needs a CUDA device" in caplog.text
    runner = load_exported(path)
    assert runner.meta["half"] is False
    assert_same_outputs(runner, reference(ckpt), "yolov5n", dynamic_hw=False)
    if not HAVE_OPENVINO:
        pytest.skip("openvino not installed (pip install 'vistrain[openvino]')")
    fp32 = vistrain.export(model=str(ckpt), format="openvino", verbose=False)
    weights32 = sum(f.stat().st_size for f in fp32.glob("*.bin"))
    fp32.rename(tmp_path / "fp32_openvino_model")
    fp16 = vistrain.export(model=str(ckpt), format="openvino", half=True, verbose=False)
    weights16 = sum(f.stat().st_size for f in fp16.glob("*.bin"))
    assert 0.45 < weights16 / weights32 < 0.6, (weights16, weights32)
    runner = load_exported(fp16)
    assert runner.meta["half"] is True
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = outputs(reference(ckpt)(x))
    for g, r in zip(outputs(runner(x)), want):
        assert g.shape == r.shape and float((g - r).abs().max()) <= 1e-2 * float(r.abs().max())


def test_fixed_size_export_runs_larger_batches_in_chunks(tmp_path):
    ckpt = fresh_checkpoint("yolov5n", tmp_path)
    path = vistrain.export(model=str(ckpt), format="onnx", batch=2, verbose=False)
    runner = load_exported(path)
    assert not runner.meta["dynamic"] and runner.meta["batch"] == 2
    assert_same_outputs(runner, reference(ckpt), "yolov5n", dynamic_hw=False)  # batches 1 and 3: padded chunks


def test_predict_letterboxes_to_a_rectangle_where_the_model_takes_any_size(tmp_path):
    """A 96 x 64 image: PyTorch and a dynamic export get a 64 x 96 input (the next stride multiple), a fixed-size
    export and EfficientDet the square; the boxes come back in the original pixels either way."""
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 255, (64, 96, 3), dtype=torch.uint8).numpy())
    ckpt = fresh_checkpoint("yolov8n", tmp_path)
    model = reference(ckpt)
    task = model.task
    static = load_exported(vistrain.export(model=str(ckpt), format="onnx", verbose=False))
    assert task.predict_stride(model) == 32 and task.predict_stride(static) is None
    dyn = load_exported(vistrain.export(model=str(ckpt), format="onnx", dynamic=True, verbose=False))
    assert task.predict_stride(dyn) == 32
    x, (ratio, pad, shape, input_hw) = task.predict_preprocess(image, 96, 32)
    assert x.shape == (3, 64, 96) and input_hw == (64, 96) and pad == (0, 0) and shape == (64, 96)
    x, (ratio, pad, shape, input_hw) = task.predict_preprocess(image, 96)
    assert x.shape == (3, 96, 96) and pad == (0, 16)
    effdet = reference(fresh_checkpoint("efficientdet-d0", tmp_path))
    assert effdet.task.predict_stride(effdet) is None


@pytest.mark.parametrize("kind", ["yolov8", "yolov5", "effdet"])
def test_nms_in_the_graph_gives_the_detections_of_vistrains_nms(kind, tmp_path):
    """NMSModel's batch selection (what export nms=True traces) against task.select, the per-image NMS predict
    runs, on random decoded outputs (continuous scores: no ties): equal in PyTorch, and from ONNX Runtime at other
    batch sizes and anchor counts than the export's, class-wise, agnostic and with a class filter."""
    import onnxruntime as ort
    from torch import nn

    from vistrain.deploy.nms import NMSModel, unpad

    nc = 5
    task = get_task("detect")
    task.set_head_kind(kind, nc)
    gen = torch.Generator().manual_seed(0)

    def decoded(b: int, n: int) -> torch.Tensor:
        xy, wh = torch.rand(b, n, 2, generator=gen) * 300, torch.rand(b, n, 2, generator=gen) * 80 + 5
        box = torch.cat((xy, xy + wh) if kind == "effdet" else (xy, wh), -1)
        obj = [torch.rand(b, n, 1, generator=gen)] if kind == "yolov5" else []
        return torch.cat([box] + obj + [torch.rand(b, n, nc, generator=gen) ** 3], -1)

    for i, keys in enumerate([{}, {"agnostic_nms": True}, {"classes": "0,3", "max_det": 20}]):
        settings = task.nms_settings({"conf": 0.05, "max_det": 50, "_user_keys": ["max_det"], **keys}, "predict")
        net = NMSModel(nn.Identity(), task, settings).eval()
        d = decoded(3, 700)
        assert all(torch.equal(g, w) for g, w in zip(unpad(net(d), settings), task.select(d, settings)))
        path = tmp_path / f"{kind}{i}.onnx"
        torch.onnx.export(net, (d,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b", 1: "n"}, "y": {0: "b"}})
        session = ort.InferenceSession(str(path))
        for b, n in ((1, 700), (2, 400), (4, 30)):
            d = decoded(b, n)
            want = task.select(d, settings)
            got = unpad(torch.from_numpy(session.run(None, {"x": d.numpy()})[0]), settings)
            assert [len(w) for w in want] == [len(g) for g in got] and sum(len(w) for w in want) > 0, (keys, b, n)
            assert all(not len(w) or float((g - w).abs().max()) <= 1e-4 for g, w in zip(got, want)), (keys, b, n)


@pytest.mark.parametrize("args,words", [
    (["model=yolov8n.yaml"], "needs a trained vistrain checkpoint"),
    (["format=tflite"], "format=tflite: not one of onnx, torchscript, openvino"),
    (["imgsz=100"], "imgsz=100: not a multiple of the model's stride 32; use imgsz=128"),
    (["opset=11"], "opset=11: use 17 or newer"),
    (["nms=True", "soft_nms=True"], "soft-NMS is not exported into the graph"),
])
def test_bad_export_input_is_one_line(args, words, tmp_path, capsys):
    ckpt = fresh_checkpoint("yolov5n", tmp_path)
    argv = ["export", f"model={ckpt}", *args] if not args[0].startswith("model=") else ["export", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_classifier_nms_export_is_one_line(tmp_path, capsys):
    assert main(["export", f"model={fresh_checkpoint('yolov5n-cls', tmp_path)}", "nms=True"]) == 2
    assert "a classifier has no NMS" in capsys.readouterr().err


def test_exported_file_without_metadata_is_refused(tmp_path, capsys):
    import onnx

    ckpt = fresh_checkpoint("yolov5n", tmp_path)
    path = vistrain.export(model=str(ckpt), format="onnx", verbose=False)
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    onnx.save(graph, str(path))
    assert main(["predict", f"model={path}", f"source={tmp_path}"]) == 2
    assert "no vistrain metadata" in capsys.readouterr().err
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    assert main(["val", f"model={tmp_path / 'broken.onnx'}"]) == 2
    assert "cannot be loaded" in capsys.readouterr().err



def test_benchmark_table(colour_folder, tmp_path, monkeypatch, capsys):
    """vistrain benchmark: a row per format with size, top-1 and ms per image; the metric is the same in every
    format; a format that fails (here OpenVINO made to fail) keeps its row with the reason, the others go on."""
    import csv

    import vistrain.deploy.export as export_module
    from vistrain.engine.utils import UserError

    ckpt = fresh_checkpoint("yolov5n-cls", tmp_path, names=["blue", "green", "red"])  # the folder's classes

    def no_openvino(*args, **kwargs):
        raise UserError("openvino is not installed; pip install 'vistrain[openvino]'")

    monkeypatch.setattr(export_module, "write_openvino", no_openvino)
    assert main(["benchmark", f"model={ckpt}", f"data={colour_folder}", "workers=0", "imgsz=64",
                 f"project={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "openvino     failed: openvino is not installed" in out
    rows = list(csv.DictReader((tmp_path / "runs" / "classify" / "benchmark" / "benchmark.csv").open()))
    assert [r["format"] for r in rows] == ["pytorch", "torchscript", "onnx", "openvino"]
    ok = rows[:3]
    assert all(not r["error"] and float(r["ms"]) > 0 and float(r["size_mb"]) > 0 for r in ok)
    assert max(float(r["metric"]) for r in ok) - min(float(r["metric"]) for r in ok) <= 1e-3
    assert float(ok[0]["speedup"]) == 1.0 and rows[3]["error"].startswith("openvino is not installed")
