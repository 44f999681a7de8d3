"""``freeze=``: which parts of a model stay fixed while the rest trains (ultralytics' ``freeze`` for every model).

``freeze`` takes a number N (the first N layers), layer indices (``0,1,2``, ultralytics' list form) or names
(``backbone``, a top-level child such as ``fpn``, or any state_dict prefix such as ``model.3`` or
``backbone.blocks.0``).  Layers are, in order: the rows of a YAML model (``model.0``, ``model.1``, ...), the
top-level children that hold parameters otherwise (ResNet: conv1, bn1, layer1..layer4, fc; EfficientDet:
backbone, fpn, class_net, box_net; timm EfficientNet: conv_stem, bn1, blocks, conv_head, bn2, classifier).
``backbone`` is the YAML's ``backbone:`` rows, EfficientDet's ``backbone``, and for other classifiers every
layer but the classifier.

A frozen part keeps ``requires_grad=False`` (the optimizer never gets it, so neither weight decay nor momentum
touch it) and its BatchNorm layers run in eval mode (running statistics unchanged, as torchvision's frozen
detection backbones; ultralytics leaves them in train mode, so there the statistics of frozen layers still
move): its state stays bit-equal to the start, in the model and in the EMA.
"""

from __future__ import annotations

import re

from torch import nn

from vistrain.engine.utils import UserError
from vistrain.nn.model import YAMLModel

_BATCHNORM = nn.modules.batchnorm._BatchNorm


def model_layers(model: nn.Module) -> list[str]:
    """The state_dict prefixes of the model's layers, in order (what ``freeze=N`` counts)."""
    if isinstance(model, YAMLModel):
        return [f"model.{i}" for i in range(len(model.model))]
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]


def named_parts(model: nn.Module) -> dict[str, list[str]]:
    """Part names ``freeze=`` accepts besides state_dict prefixes -> the prefixes they stand for."""
    layers = model_layers(model)
    if isinstance(model, YAMLModel):  # the rows of its backbone: and head: sections
        n = len(model.yaml.get("backbone") or ())
        return {"backbone": layers[:n], "head": layers[n:]}
    parts = {name: [name] for name in layers}
    if "backbone" not in parts and len(layers) > 1:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        head = str(cfg.get("classifier") or layers[-1]).split(".")[0]  # timm names it; ResNet's fc is last
        parts["backbone"] = [name for name in layers if name != head]
    return parts


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def parse_freeze(spec, model: nn.Module) -> list[str]:
    """``freeze`` (``None``, ``"10"``, ``"0,1,2"``, ``"[0, 1]"``, ``"backbone"``, ``"backbone,fpn"``, ``"model.3"``)
    -> the state_dict prefixes to freeze; a value that names nothing in ``model`` is a one-line ``UserError``."""
    text = "" if spec is None else str(spec).strip()
    layers, parts = model_layers(model), named_parts(model)
    valid = (f"valid: a number of layers 0..{len(layers)}, layer indices (0,1,2; 0..{len(layers) - 1}), or the "
             f"parts {', '.join(parts)} (or any state_dict prefix, e.g. {layers[0] if layers else 'backbone'})")
    if text.lower() in ("", "none", "false", "[]"):
        return []
    tokens = [t.strip().strip("'\"") for t in re.split(r"[,\s]+", text.strip("[]()")) if t.strip()]
    if len(tokens) == 1 and tokens[0].isdigit() and not text.startswith("["):  # freeze=N: the first N layers
        n = int(tokens[0])
        if n > len(layers):
            raise UserError(f"freeze={text}: this model has {len(layers)} layers; {valid}")
        return layers[:n]
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_modules() if n}
    names |= set(model.state_dict())
    prefixes: list[str] = []
    for t in tokens:
        if t.isdigit():
            if int(t) >= len(layers):
                raise UserError(f"freeze={text}: no layer {t}, this model has {len(layers)} (0..{len(layers) - 1}); "
                                f"{valid}")
            found = [layers[int(t)]]
        elif t in parts:
            found = parts[t]
        elif t.rstrip(".") in names:
            found = [t.rstrip(".")]
        else:
            raise UserError(f"freeze={text}: no part '{t}' in this model; {valid}")
        prefixes += [p for p in found if p not in prefixes]
    return prefixes


def check_phase_keys(cfg: dict) -> None:
    """Keys of the frozen -> unfrozen schedule that would be silently ignored, or that contradict each other."""
    if cfg.get("freeze_epochs") and not cfg.get("freeze"):
        raise UserError(f"freeze_epochs={cfg['freeze_epochs']} needs freeze= (what to freeze for those epochs), e.g. "
                        f"freeze=backbone")
    second = [k for k in ("unfreeze_batch", "unfreeze_lr0") if cfg.get(k) is not None]
    if second and not (cfg.get("freeze") and cfg.get("freeze_epochs")):
        raise UserError(f"{second[0]}={cfg[second[0]]} sets the unfrozen phase after freeze_epochs; give freeze= and "
                        f"freeze_epochs= too")
    if cfg.get("lr_step_gamma") and cfg.get("cos_lr"):
        raise UserError(f"cos_lr=True and lr_step_gamma={cfg['lr_step_gamma']}: choose one learning-rate schedule")


class Freezer:
    """Freezes and unfreezes the parts ``prefixes`` of a model, and keeps their BatchNorm layers in eval mode."""

    def __init__(self, prefixes: list[str]):
        self.prefixes = list(prefixes)
        self.frozen: list[str] = []  # the parameters this froze (ones that were trainable), for unfreeze

    def covers(self, name: str) -> bool:
        return any(_is_under(name, p) for p in self.prefixes)

    def freeze(self, model: nn.Module) -> int:
        """Set ``requires_grad=False`` on the parts; returns the number of parameter elements frozen."""
        count = 0
        for name, p in model.named_parameters():
            if p.requires_grad and self.covers(name):
                p.requires_grad_(False)
                self.frozen.append(name)
                count += p.numel()
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError(f"freeze={','.join(self.prefixes)}: that freezes every parameter, nothing is left to "
                            f"train; freeze fewer layers")
        self.bn_eval(model)
        return count

    def unfreeze(self, model: nn.Module) -> None:
        """Make the parameters this froze trainable again (parameters that were never trainable stay so)."""
        params = dict(model.named_parameters())
        for name in self.frozen:
            params[name].requires_grad_(True)
        self.frozen = []

    def bn_eval(self, model: nn.Module) -> None:
        """BatchNorm layers of frozen parts in eval mode (call after every ``model.train()``)."""
        if self.frozen:
            for name, m in model.named_modules():
                if isinstance(m, _BATCHNORM) and self.covers(name):
                    m.eval()

    def copy_frozen(self, src: nn.Module, dst: nn.Module) -> None:
        """Copy the frozen parts' state from ``src`` to ``dst`` (the EMA: an average of a constant is the constant,
        but ``d * v + (1 - d) * v`` may round to another float)."""
        if self.frozen:
            own = src.state_dict()
            for k, v in dst.state_dict().items():
                if self.covers(k):
                    v.copy_(own[k])
