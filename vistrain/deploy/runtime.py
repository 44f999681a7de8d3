"""Run exported files back: ONNX with onnxruntime, TorchScript with ``torch.jit``, OpenVINO with its runtime.

``load_exported(path)`` gives an ``ExportedModel``: called on RGB 0..1 ``Tensor[B, 3, H, W]`` it returns what
``InferenceModel`` returns (torch tensors), so ``predict`` and ``val`` treat a checkpoint and an exported file
alike.  A file exported with a fixed batch is run in chunks of that batch (the last one padded).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vistrain.engine.utils import UserError

EXPORTED_SUFFIXES = (".onnx", ".torchscript")


def is_exported(ref) -> bool:
    """Whether ``model=ref`` names an exported file: ``.onnx``, ``.torchscript``, an OpenVINO folder
    (``NAME_openvino_model/``) or its ``.xml``."""
    s = str(ref or "").rstrip("/")
    return s.endswith(EXPORTED_SUFFIXES) or s.endswith("_openvino_model") or s.endswith(".xml")


class ExportedModel:
    """An exported model, callable like ``InferenceModel``; ``meta`` is the metadata written at export."""

    exported = True
    training = False

    def __init__(self, path: Path, meta: dict, run, fmt: str):
        self.path, self.meta, self._run, self.format = path, meta, run, fmt

    def __call__(self, x: torch.Tensor):
        n = x.shape[0]
        fixed = None if self.meta.get("dynamic") else int(self.meta.get("batch") or 1)
        x = x.half() if self.meta.get("half") else x.float()
        if fixed is None or n == fixed:
            return self._pack(self._run(x))
        parts = []
        for i in range(0, n, fixed):
            chunk = x[i:i + fixed]
            if len(chunk) < fixed:  # pad the last chunk to the fixed batch; its padding rows are dropped
                chunk = torch.cat((chunk, chunk.new_zeros(fixed - len(chunk), *chunk.shape[1:])))
            parts.append(self._run(chunk))
        return self._pack([torch.cat([p[j] for p in parts])[:n] for j in range(len(parts[0]))])

    @staticmethod
    def _pack(outs: list[torch.Tensor]):
        outs = [o.float() for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def to(self, *args, **kwargs) -> "ExportedModel":
        return self

    def eval(self) -> "ExportedModel":
        return self

    def train(self, mode: bool = True) -> "ExportedModel":
        return self


def load_exported(path: str | Path, device: torch.device | None = None) -> ExportedModel:
    """Open an exported file (or OpenVINO folder); ``UserError`` naming the file and the fix when it cannot."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model={path}: not found")
    try:
        if path.suffix == ".onnx":
            return _onnx(path)
        if path.suffix == ".torchscript":
            return _torchscript(path, device or torch.device("cpu"))
        return _openvino(path)
    except UserError:
        raise
    except Exception as e:  # a truncated or foreign file: the runtimes raise their own types
        raise UserError(f"model={path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        f"export it again with vistrain export") from None


def _meta(path: Path, text: str | None) -> dict:
    if not text:
        raise UserError(f"model={path}: no vistrain metadata in it; give a file written by vistrain export")
    return json.loads(text)


def _onnx(path: Path) -> ExportedModel:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed; pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    meta = _meta(path, sess.get_modelmeta().custom_metadata_map.get("vistrain"))
    names = [o.name for o in sess.get_outputs()]

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in sess.run(names, {"images": x.detach().cpu().numpy()})]

    return ExportedModel(path, meta, run, "onnx")


def _torchscript(path: Path, device: torch.device) -> ExportedModel:
    import warnings

    files = {"metadata.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice: the format still loads
        module = torch.jit.load(str(path), map_location=device, _extra_files=files)
    meta = _meta(path, files["metadata.json"])

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            out = module(x.to(device))
        return [o.cpu() for o in (out if isinstance(out, (tuple, list)) else (out,))]

    return ExportedModel(path, meta, run, "torchscript")


def _openvino(path: Path) -> ExportedModel:
    try:
        import openvino as ov
    except ImportError:
        raise UserError("openvino is not installed; pip install 'vistrain[openvino]'") from None
    xml = path if path.suffix == ".xml" else next(iter(sorted(path.glob("*.xml"))), None)
    if xml is None:
        raise UserError(f"model={path}: no .xml model in this folder; give a folder written by vistrain export "
                        f"format=openvino")
    core = ov.Core()
    model = core.read_model(str(xml))
    text = model.get_rt_info(["model_info", "vistrain"]).astype(str) if model.has_rt_info(
        ["model_info", "vistrain"]) else None
    meta = _meta(xml, text)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        result = request.infer({0: x.detach().cpu().numpy()})
        return [torch.from_numpy(result[o].copy()) for o in compiled.outputs]

    return ExportedModel(path, meta, run, "openvino")
