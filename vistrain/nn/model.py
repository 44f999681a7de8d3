"""The model that runs a parsed YAML graph, and ``build_model`` (name / YAML / checkpoint -> module)."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
import yaml as pyyaml
from torch import nn

from vistrain.nn.modules import Detect, DetectDFL
from vistrain.nn.parser import ModelYAMLError, parse_model, scale_factors

MODELS_DIR = Path(__file__).resolve().parent.parent / "cfg" / "models"
_SCALED_NAME = re.compile(r"^(yolov\d+)([nslmx])(.*)$")
_DASH_SCALED = re.compile(r"^(efficientdet|efficientnet)-(\w+)$")  # efficientdet-d0, efficientnet-b3
TIMM_PREFIX = "timm:"
ARCHS = ("yaml", "resnet", "efficientdet", "efficientnet", "timm")


class YAMLModel(nn.Module):
    """A model built from YAML rows. ``forward(x)`` returns the last layer's raw output.

    Attributes: ``yaml`` (the dict it was built from, plain types only, enough to rebuild it),
    ``task`` (classify / detect / segment), ``layers`` (the ``nn.Sequential`` of rows, stored
    under the state_dict prefix ``model.`` as ultralytics does).
    """

    def __init__(self, cfg: dict, in_channels: int = 3):
        super().__init__()
        self.yaml = cfg
        self.model, self.save = parse_model(cfg, in_channels=in_channels, imgsz=cfg.get("imgsz"))
        self.task = cfg.get("task") or infer_task(cfg)
        norm = cfg.get("batchnorm")  # {eps, momentum} of every BatchNorm (default: the Conv module's 1e-3, 0.03)
        if norm:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eps, m.momentum = float(norm.get("eps", m.eps)), float(norm.get("momentum", m.momentum))
        head = self.model[-1]
        if isinstance(head, Detect):
            self._init_detect(head, in_channels)
        elif isinstance(head, DetectDFL):
            head.stride = self._find_strides(in_channels)
            head.bias_init()

    def _find_strides(self, in_channels: int, probe: int = 256) -> torch.Tensor:
        """Each detection level's stride, from the output sizes of a forward pass on a ``probe`` square."""
        with torch.no_grad():
            was = self.training
            self.eval()
            outs = self.forward(torch.zeros(1, in_channels, probe, probe))
            self.train(was)
        levels = outs[0] if isinstance(outs, tuple) else outs  # Segment: (levels, coefficients, prototypes)
        return torch.tensor([probe / o.shape[2] for o in levels], dtype=torch.float32)  # H of [B, (na,) H, ...]

    def _init_detect(self, head: Detect, in_channels: int) -> None:
        """Find the strides by a forward pass, express anchors in stride units, set the bias priors."""
        head.stride = self._find_strides(in_channels)
        order = head.anchors.prod(-1).mean(-1)  # anchor area per level must grow with stride
        if (order[-1] - order[0]).sign() != (head.stride[-1] - head.stride[0]).sign():
            head.anchors[:] = head.anchors.flip(0)
        head.anchors /= head.stride.view(-1, 1, 1)
        for conv, s in zip(head.m, head.stride):
            b = conv.bias.view(head.na, -1)
            with torch.no_grad():
                b[:, 4] += math.log(8 / (640 / float(s)) ** 2)  # about 8 objects per 640 px image
                b[:, 5:5 + head.nc] += math.log(0.6 / (head.nc - 0.99999))  # class prior

    @property
    def layers(self) -> nn.Sequential:
        return self.model

    def forward(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x


def set_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """Store ``model``'s 4-D weights NHWC (``channels_last``) or NCHW, in place.  With NHWC weights the
    convolutions produce NHWC activations whatever the input's layout; on CPU the oneDNN kernels run
    such models 15-25% faster (measured on yolov5n, yolov8n-seg and resnet50, training and inference).
    Outputs equal to rounding.  Returns ``model``."""
    return model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a ``Conv2d`` among a module's children into that convolution
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``), in place, for inference: same outputs (to rounding), one op
    fewer per layer.  Covers vistrain's ``Conv``, torchvision's ResNet blocks, timm's EfficientNet blocks (a
    ``BatchNormAct2d`` leaves its activation behind) and the BiFPN's convolutions; EfficientDet's head keeps its
    per-level BatchNorms (their convolutions are shared across levels).  Children are registered in the order
    they run in these models; the every-model test checks the outputs.  Only for eval mode; the model cannot
    be trained further afterwards.  Returns ``model``."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fuse_conv_bn: call model.eval() first (BatchNorm must use its running statistics)")
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if not isinstance(conv, nn.Conv2d) or type(bn).__name__ not in ("BatchNorm2d", "BatchNormAct2d"):
                continue
            setattr(parent, cname, fuse_conv_bn_eval(conv, bn))
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                     if m is not None and not isinstance(m, nn.Identity)]
            setattr(parent, bname, after[0] if len(after) == 1 else nn.Sequential(*after) if after else nn.Identity())
    return model


def infer_task(cfg: dict) -> str:
    """The task a YAML's last layer implies."""
    if cfg.get("arch") in ("resnet", "efficientnet", "timm"):
        return "classify"
    if cfg.get("arch") == "efficientdet":
        return "detect"
    rows = list(cfg.get("backbone") or []) + list(cfg.get("head") or [])
    last = str(rows[-1][2]).replace("nn.", "") if rows else ""
    return {"Detect": "detect", "Segment": "segment"}.get(last, "classify")


def builtin_models() -> list[str]:
    """Names accepted by ``build_model``: every YAML stem, plus each scale of scaled YOLO YAMLs."""
    names = []
    for p in sorted(MODELS_DIR.glob("*.yaml")):
        d = pyyaml.safe_load(p.read_text())
        m = re.match(r"^(yolov\d+)(.*)$", p.stem)
        if d.get("scales") and m:
            names += [f"{m.group(1)}{s}{m.group(2)}" for s in d["scales"]]
        elif d.get("scales") and _DASH_SCALED.match(f"{p.stem}-x"):
            names += [f"{p.stem}-{s}" for s in d["scales"]]
        else:
            names.append(p.stem)
    return names


def load_model_yaml(name_or_path: str | Path) -> dict:
    """Resolve a built-in name (``resnet50``, ``yolov5s-cls``) or a YAML path to a YAML dict.

    A scaled name picks the scale: ``yolov5s-cls`` -> ``yolov5-cls.yaml`` with ``scale: s``.
    """
    s = str(name_or_path)
    if s.startswith(TIMM_PREFIX):
        return {"arch": "timm", "task": "classify", "timm_name": s[len(TIMM_PREFIX):], "nc": 1000, "name": s}
    path = Path(s)
    dash = _DASH_SCALED.match(s)
    if dash and (MODELS_DIR / f"{dash.group(1)}.yaml").exists():
        d = pyyaml.safe_load((MODELS_DIR / f"{dash.group(1)}.yaml").read_text())
        if dash.group(2) not in d["scales"]:
            raise FileNotFoundError(f"model {s!r}: {dash.group(1)} comes in "
                                    f"{', '.join(dash.group(1) + '-' + k for k in d['scales'])}")
        return {**d, "scale": dash.group(2), "name": s}
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            builtin = MODELS_DIR / path.name
            if not builtin.exists():
                if len(path.parts) == 1:  # yolov8n.yaml, as ultralytics names it: the built-in yolov8n
                    try:
                        return load_model_yaml(path.stem)
                    except FileNotFoundError:
                        pass
                raise FileNotFoundError(f"{s}: model YAML not found")
            path = builtin
        d = pyyaml.safe_load(path.read_text())
        stem = path.stem
    else:
        stem = s
        path = MODELS_DIR / f"{s}.yaml"
        if not path.exists():
            m = _SCALED_NAME.match(s)
            if not m or not (MODELS_DIR / f"{m.group(1)}{m.group(3)}.yaml").exists():
                import difflib

                close = difflib.get_close_matches(s, builtin_models(), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise FileNotFoundError(f"model {s!r} is not a built-in model, a YAML or a checkpoint{hint} "
                                        f"(`vistrain help models` lists them)")
            path = MODELS_DIR / f"{m.group(1)}{m.group(3)}.yaml"
        d = pyyaml.safe_load(path.read_text())
    if not isinstance(d, dict):
        raise ModelYAMLError(f"{path}: a model YAML must be a mapping")
    if d.get("arch") in ("efficientdet", "efficientnet"):
        d.setdefault("scale", (d.get("scales") or ["d0" if d["arch"] == "efficientdet" else "b0"])[0])
        d.setdefault("name", f"{stem}-{d['scale']}" if d.get("scales") else stem)
        return d
    if d.get("scales") and not d.get("scale"):
        m = _SCALED_NAME.match(stem)
        d["scale"] = m.group(2) if m and m.group(2) in d["scales"] else next(iter(d["scales"]))
    d.setdefault("name", stem)
    return d


def model_from_yaml(d: dict, num_classes: int | None = None, imgsz: int | None = None,
                    in_channels: int = 3) -> nn.Module:
    """Build a fresh (randomly initialised) model from a YAML dict; ``num_classes``/``imgsz`` override."""
    d = copy.deepcopy(d)
    if num_classes is not None:
        d["nc"] = int(num_classes)
    if imgsz is not None and d.get("imgsz") is not None:
        d["imgsz"] = int(imgsz)
    arch = d.get("arch")
    if arch == "efficientdet":
        from vistrain.nn.efficientdet import EFFICIENTDET, EfficientDet

        if d.get("scale", "d0") not in EFFICIENTDET:
            raise ModelYAMLError(f"efficientdet scale {d.get('scale')!r} unknown; use one of {list(EFFICIENTDET)}")
        return EfficientDet(d, in_channels=in_channels)
    if arch in ("efficientnet", "timm"):
        from vistrain.nn.efficientdet import EFFICIENTNET_IMGSZ, efficientnet

        if arch == "efficientnet" and d.get("scale", "b0") not in EFFICIENTNET_IMGSZ:
            raise ModelYAMLError(f"efficientnet scale {d.get('scale')!r} unknown; use one of "
                                 f"{list(EFFICIENTNET_IMGSZ)}")
        return efficientnet(d, in_channels=in_channels)
    scale_factors(d, d.get("scale"))  # validates the scale early
    if d.get("arch") == "resnet":
        from vistrain.nn.resnet import ResNet

        return ResNet(d, in_channels=in_channels)
    if d.get("arch") not in (None, "yaml"):
        raise ModelYAMLError(f"unknown arch {d['arch']!r}; use one of {', '.join(ARCHS[1:])} or leave it out for "
                             f"YAML rows")
    return YAMLModel(d, in_channels=in_channels)


def build_model(name_or_path: str | Path, num_classes: int | None = None, imgsz: int | None = None,
                in_channels: int = 3) -> nn.Module:
    """Build a model from a built-in name, a model YAML path, or a vistrain checkpoint (``.pt``).

    >>> build_model("resnet50", num_classes=1000)  # torchvision-compatible keys
    >>> build_model("yolov5-backbone-cls", num_classes=4, imgsz=224)
    >>> build_model("runs/classify/train/weights/best.pt")  # weights loaded, in eval mode
    """
    s = str(name_or_path)
    if s.endswith((".pt", ".pth", ".safetensors")):
        from vistrain.engine.checkpoint import load_model_from_checkpoint

        model, _ = load_model_from_checkpoint(s, num_classes=num_classes)
        return model.eval()  # trained weights are loaded for inference; call .train() to fine-tune
    return model_from_yaml(load_model_yaml(s), num_classes=num_classes, imgsz=imgsz, in_channels=in_channels)
