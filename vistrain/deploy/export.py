"""The ``export`` mode: a trained checkpoint -> an ONNX file, a TorchScript file or an OpenVINO folder.

What is exported is ``InferenceModel``: the model (BatchNorm folded) followed by its task's ``decode``, the same
module ``predict`` runs in PyTorch, so an exported file and the checkpoint give the same outputs before NMS:

- classify: class probabilities ``[B, C]`` (softmax);
- detect: ``[B, N, C]`` per anchor: YOLOv5 (cx, cy, w, h, objectness, class probabilities), YOLOv8 (cx, cy, w, h,
  class probabilities), EfficientDet (x1, y1, x2, y2, class probabilities); boxes in input pixels;
- segment: YOLOv8's detect columns followed by 32 mask coefficients, and the prototypes ``[B, 32, H/4, W/4]``.

NMS, scaling back to the original image and masks stay in vistrain's task code, which serves the checkpoint
and the exported files alike (``vistrain.deploy.runtime`` runs them).  With ``nms=True`` (detect and segment) the
final detections come out of the graph instead: ``output0`` is ``[B, max_det, 6 (+32)]`` (``vistrain.deploy.nms``).
Every file carries its metadata (task, class names, input size, stride, head kind, NMS settings, model YAML,
vistrain version): ONNX ``metadata_props``, TorchScript extra file ``metadata.json``, OpenVINO ``rt_info``.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from vistrain.engine.utils import LOGGER, UserError

SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript", "openvino": "_openvino_model"}
DEFAULT_OPSET = 17
# an FP32 export whose outputs differ from PyTorch's by more than ATOL + RTOL x |value| gets a warning (outputs are
# probabilities and pixel coordinates: a 640 px box corner carries float32 rounding of ~6e-5 per operation)
ATOL, RTOL = 1e-4, 1e-5


class InferenceModel(nn.Module):
    """``task.decode(model(x))``: what ``predict`` runs and what ``export`` writes.  ``x`` is RGB 0..1
    ``Tensor[B, 3, H, W]``; the outputs are listed in the module docstring."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model = model
        self.task = task  # not a module: the task holds the head's kind and EfficientDet's anchors

    def forward(self, x: torch.Tensor):
        return self.task.decode(self.model(x))


def head_kind(task) -> str:
    return "classify" if task.name == "classify" else task.head_kind


def model_stride(model: nn.Module, kind: str) -> int:
    """The factor input sizes must be a multiple of: the largest detection stride (EfficientDet: ``2 ** max
    level``, 128 for D0-D7), 32 for classifiers."""
    if kind == "effdet":
        return 2 ** int(model.anchor_config()["max_level"])
    if kind in ("yolov5", "yolov8"):
        from vistrain.nn.modules import Detect, DetectDFL

        head = next(m for m in model.modules() if isinstance(m, (Detect, DetectDFL)))
        return int(head.stride.max())
    return 32


def output_names(task_name: str) -> list[str]:
    return ["output0", "output1"] if task_name == "segment" else ["output0"]


def flat_outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def export(cfg: dict) -> Path:
    """Export ``cfg['model']`` (a vistrain checkpoint) to ``cfg['format']``; returns the written path."""
    from vistrain.engine.run import resolve_task_and_model, user_keys
    from vistrain.engine.utils import select_device
    from vistrain.nn.model import fuse_conv_bn

    cfg["_mode"] = "export"
    ref = str(cfg.get("model") or "")
    if not ref.endswith((".pt", ".pth")):
        raise UserError(f"model={ref or '(empty)'}: export needs a trained vistrain checkpoint, e.g. "
                        f"model=runs/detect/train/weights/best.pt")
    fmt = cfg.get("format") or "onnx"
    task, model, ckpt = resolve_task_and_model(cfg, need_model=True)
    device = select_device(cfg.get("device"))
    half = bool(cfg.get("half"))
    if half and device.type != "cuda" and fmt != "openvino":
        LOGGER.warning("WARNING half=True needs a CUDA device (device=0) for ONNX and TorchScript; exporting FP32")
        half = False
    model = model.to(device).eval()
    if hasattr(task, "setup_model"):
        task.setup_model(model, None, cfg, train=False)
    kind = head_kind(task)
    stride = model_stride(model, kind)
    imgsz = int(cfg["imgsz"]) if "imgsz" in user_keys(cfg) or not ckpt.get("imgsz") else int(ckpt["imgsz"])
    fixed = ckpt["model_yaml"].get("imgsz")  # a model built for one input size (an MLP head on flattened features)
    if fixed is not None and imgsz != int(fixed):
        raise UserError(f"imgsz={imgsz}: {ref} was built for {fixed} x {fixed} inputs; use imgsz={fixed}")
    if imgsz % stride:
        up = -(-imgsz // stride) * stride
        raise UserError(f"imgsz={imgsz}: not a multiple of the model's stride {stride}; use imgsz={up}")
    fuse_conv_bn(model)
    net = InferenceModel(model, task).eval()
    nms = nms_settings_for_export(cfg, task) if cfg.get("nms") else None
    if nms is not None:
        from vistrain.deploy.nms import NMSModel

        net = NMSModel(net, task, nms).eval()
    batch = int(cfg.get("batch") or 1) if "batch" in user_keys(cfg) else 1
    dynamic = bool(cfg.get("dynamic"))
    dynamic_hw = dynamic and kind != "effdet" and fixed is None
    if dynamic and not dynamic_hw:
        why = ("EfficientDet's anchors and TF 'SAME' paddings are fixed per input size" if kind == "effdet" else
               "its head takes flattened features of one input size")
        LOGGER.info(f"export: {why}: dynamic=True makes the batch dynamic, height and width stay {imgsz}")
    x = torch.rand(batch, 3, imgsz, imgsz, device=device)
    if half:
        net, x = net.half(), x.half()
    names = list(ckpt.get("names") or [])
    meta = {"vistrain_version": _version(), "task": task.name, "head": kind, "names": names, "nc": len(names),
            "imgsz": [imgsz, imgsz], "stride": stride, "batch": batch, "dynamic": dynamic,
            "dynamic_hw": dynamic_hw, "half": half, "format": fmt, "nms": nms,
            "outputs": output_names(task.name), "model_yaml": ckpt["model_yaml"],
            "train_args": {"data": (ckpt.get("train_args") or {}).get("data")},
            "source": str(Path(ref).resolve())}
    out = Path(ref).with_suffix("")
    out = out.parent / (out.name + SUFFIX[fmt])
    t0 = time.time()
    LOGGER.info(f"export: {ref} -> {fmt} (imgsz {imgsz}, batch {batch}{', dynamic' if dynamic else ''}"
                f"{', half' if half else ''}{', NMS ' + str(nms) if nms else ''})")
    with torch.no_grad():
        ref_out = flat_outputs(net(x))
        if fmt == "torchscript":
            write_torchscript(net, x, out, meta)
        else:
            onnx_path = out if fmt == "onnx" else out / (Path(ref).stem + ".onnx")
            write_onnx(net, x, onnx_path, meta, opset=int(cfg.get("opset") or DEFAULT_OPSET),
                       simplify=bool(cfg.get("simplify")) and fmt == "onnx", dynamic_hw=meta["dynamic_hw"],
                       dynamic=dynamic)
            if fmt == "openvino":
                write_openvino(onnx_path, out, meta, half=half)
    diff = check_export(out, net, x, ref_out, meta)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    LOGGER.info(f"export: {out} ({size / 1e6:.1f} MB) in {time.time() - t0:.1f}s; outputs equal PyTorch's to "
                f"{diff:.1e} (max abs)")
    return out


def nms_settings_for_export(cfg: dict, task) -> dict:
    """``nms=True``: the predict-mode NMS settings (conf 0.25 unless given), fixed into the graph."""
    if task.name == "classify":
        raise UserError("nms=True: a classifier has no NMS; export it without nms")
    if cfg.get("soft_nms"):
        raise UserError("nms=True with soft_nms=True: soft-NMS is not exported into the graph; export without nms "
                        "(vistrain's predict then applies soft-NMS) or without soft_nms")
    s = task.nms_settings(cfg, "predict")
    return {"conf": s["conf"], "iou": s["iou"], "max_det": s["max_det"], "classes": s["classes"],
            "agnostic": s["agnostic"]}


def _version() -> str:
    import vistrain

    return vistrain.__version__


def dynamic_axes(meta: dict, dynamic: bool, dynamic_hw: bool) -> dict | None:
    if not dynamic:
        return None
    axes = {"images": {0: "batch", **({2: "height", 3: "width"} if dynamic_hw else {})}}
    for name in meta["outputs"]:
        axes[name] = {0: "batch", **({1: "anchors"} if meta["task"] != "classify" and name == "output0"
                                     and dynamic_hw and not meta["nms"] else {})}
        if name == "output1" and dynamic_hw:
            axes[name].update({2: "mask_height", 3: "mask_width"})
    return axes


def write_onnx(net: nn.Module, x: torch.Tensor, path: Path, meta: dict, opset: int, simplify: bool,
               dynamic_hw: bool, dynamic: bool) -> None:
    """Trace ``net`` to ONNX (torch's TorchScript-based exporter, which keeps traced sizes symbolic, so dynamic
    height and width work), write ``meta`` into ``metadata_props`` and check the file with ``onnx.checker``."""
    onnx = _require("onnx", "onnx")
    if opset < 17:
        raise UserError(f"opset={opset}: use 17 or newer (the opsets vistrain's exports are checked with)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: the sizes they name are checked below
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=meta["outputs"], dynamic_axes=dynamic_axes(meta, dynamic, dynamic_hw),
                          do_constant_folding=True)
    graph = onnx.load(str(path))
    if simplify:
        onnxslim = _require("onnxslim", "onnxslim")
        graph = onnxslim.slim(graph)
    del graph.metadata_props[:]
    for k, v in metadata_strings(meta).items():
        graph.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def metadata_strings(meta: dict) -> dict[str, str]:
    """``meta`` as string pairs: ``vistrain`` (all of it, JSON) and a readable key per scalar field."""
    out = {"vistrain": json.dumps(meta)}
    for k in ("task", "head", "names", "imgsz", "stride", "batch", "dynamic", "half", "vistrain_version"):
        out[k] = json.dumps(meta[k]) if not isinstance(meta[k], str) else meta[k]
    return out


def write_torchscript(net: nn.Module, x: torch.Tensor, path: Path, meta: dict) -> None:
    """``torch.jit.trace`` (traced sizes stay symbolic where the graph reads them, so dynamic sizes run) with
    ``metadata.json`` as an extra file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and TorchScript deprecation warnings
        traced = torch.jit.freeze(torch.jit.trace(net, x, strict=False, check_trace=False))
        torch.jit.save(traced, str(path), _extra_files={"metadata.json": json.dumps(meta)})


def write_openvino(onnx_path: Path, folder: Path, meta: dict, half: bool) -> None:
    """Convert the ONNX file with OpenVINO (``ov.convert_model``), metadata into ``rt_info``; the folder holds
    ``NAME.xml`` / ``NAME.bin`` (the ONNX file it came from is removed)."""
    ov = _require("openvino", "openvino", extra="openvino")
    model = ov.convert_model(str(onnx_path))
    for k, v in metadata_strings(meta).items():
        model.set_rt_info(v, ["model_info", k])
    ov.save_model(model, str(folder / (onnx_path.stem + ".xml")), compress_to_fp16=half)
    onnx_path.unlink()


def _require(module: str, package: str, extra: str | None = None):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        how = f"pip install 'vistrain[{extra}]'" if extra else f"pip install {package}"
        raise UserError(f"{module} is not installed; {how}") from None


def check_export(path: Path, net: nn.Module, x: torch.Tensor, ref_out: tuple, meta: dict) -> float:
    """Run the written file on ``x`` (and, when its sizes are dynamic, on another batch and size) and return the
    largest difference from PyTorch; beyond ``ATOL + RTOL x |value|`` (FP32) a warning gives the numbers."""
    from vistrain.deploy.runtime import load_exported

    runner = load_exported(path, device=x.device)
    inputs = [(x, ref_out)]
    if meta["dynamic"]:
        h = x.shape[2] + (meta["stride"] if meta["dynamic_hw"] else 0)
        w = x.shape[3] + (2 * meta["stride"] if meta["dynamic_hw"] else 0)
        x2 = torch.rand(x.shape[0] + 1, 3, h, w, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            inputs.append((x2, flat_outputs(net(x2))))
    worst, close = 0.0, True
    for xi, want in inputs:
        got = flat_outputs(runner(xi))
        for g, w in zip(got, want):
            if g.shape != w.shape:
                raise UserError(f"{path}: output shape {tuple(g.shape)} differs from PyTorch's {tuple(w.shape)} at input "
                                f"{tuple(xi.shape)}; please report this model")
            g, w = g.float().cpu(), w.float().cpu()
            worst = max(worst, float((g - w).abs().max()) if g.numel() else 0.0)
            close &= bool(torch.allclose(g, w, rtol=RTOL, atol=ATOL))
    if not meta["half"] and not close:
        LOGGER.warning(f"WARNING {path}: outputs differ from PyTorch's by up to {worst:.2e} (more than {ATOL} + "
                       f"{RTOL} x |value|)")
    return worst


__all__ = ["export", "InferenceModel", "SUFFIX"]
