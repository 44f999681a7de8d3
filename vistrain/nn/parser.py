"""Parse an ultralytics-format model YAML into an ``nn.Sequential`` of layers.

A YAML holds ``nc``, optional ``scales: {n: [depth, width, max_channels], ...}`` (or the
yolov5-style ``depth_multiple`` / ``width_multiple``), and ``backbone`` + ``head`` lists of rows
``[from, repeats, module, args]``.  Modules are looked up in ``REGISTRY`` - never ``eval``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vistrain.nn import modules as M


class ModelYAMLError(ValueError):
    """A model YAML that cannot be built; the message names the row and what is wrong."""


# name in YAML -> module class.  ``nn.X`` spellings are accepted for torch modules.
REGISTRY: dict[str, type[nn.Module]] = {
    "Conv": M.Conv,
    "Bottleneck": M.Bottleneck,
    "C3": M.C3,
    "BottleneckCSP": M.BottleneckCSP,
    "C2f": M.C2f,
    "Focus": M.Focus,
    "SPP": M.SPP,
    "SPPF": M.SPPF,
    "Concat": M.Concat,
    "Classify": M.Classify,
    "Detect": M.Detect,  # [nc, anchors]: anchor-based (YOLOv5); [nc]: anchor-free DetectDFL (YOLOv8, YOLOv5u)
    "Segment": M.Segment,
    "Upsample": nn.Upsample,
    "Flatten": nn.Flatten,
    "Linear": nn.Linear,
    "ReLU": nn.ReLU,
    "SiLU": nn.SiLU,
    "Dropout": nn.Dropout,
    "MaxPool2d": nn.MaxPool2d,
    "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d,
    "Identity": nn.Identity,
}

# modules whose first two args are (in_channels, out_channels) and whose out_channels scale with width
CHANNEL_MODULES = {M.Conv, M.Bottleneck, M.C3, M.BottleneckCSP, M.C2f, M.Focus, M.SPP, M.SPPF}
# modules whose third arg is the number of repeats (inserted by the parser)
REPEAT_MODULES = {M.C3, M.BottleneckCSP, M.C2f}
# modules that take an ``act=`` keyword (the YAML's top-level ``act``)
ACT_MODULES = CHANNEL_MODULES | {M.Classify}


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x``."""
    return int(math.ceil(x / divisor) * divisor)


def lookup_module(name: str, row_index: int) -> type[nn.Module]:
    key = name[3:] if name.startswith("nn.") else name
    if key not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(key, list(REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known modules: {', '.join(sorted(REGISTRY))}"
        raise ModelYAMLError(f"layer {row_index}: unknown module {name!r}{hint}")
    return REGISTRY[key]


def scale_factors(d: dict, scale: str | None) -> tuple[float, float, float, str | None]:
    """Return (depth, width, max_channels, scale) for the YAML ``d`` and the requested scale."""
    scales = d.get("scales")
    if scales:
        if not scale:
            scale = next(iter(scales))
        if scale not in scales:
            raise ModelYAMLError(f"scale {scale!r} not in this YAML's scales {list(scales)}")
        depth, width, max_channels = scales[scale]
        return float(depth), float(width), float(max_channels), scale
    return float(d.get("depth_multiple", 1.0)), float(d.get("width_multiple", 1.0)), float("inf"), None


def _resolve_args(args: list, d: dict) -> list:
    """Replace bare names that are top-level YAML keys (``nc``, ``anchors``) by their values, and the
    Python spelling ``None`` (ultralytics YAMLs use it) by None."""
    return [None if a == "None" else d[a] if isinstance(a, str) and a in d and a not in ("nearest", "bilinear")
            else a for a in args]


def parse_model(d: dict, in_channels: int = 3, imgsz: int | None = None, verbose: bool = False
                ) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of YAML dict ``d``.

    Returns ``(layers, save)``: ``layers`` an ``nn.Sequential`` whose modules carry ``i`` (index),
    ``f`` (from), ``type`` (YAML name) and ``np`` (parameter count); ``save`` the indices whose
    outputs later layers read.  When a ``Linear`` needs the flattened size, the spatial shapes are
    found by running a zeros tensor of ``imgsz`` through the layers as they are built.
    """
    nc = d.get("nc")
    depth, width, max_channels, _ = scale_factors(d, d.get("scale"))
    act = d.get("act", True)
    rows = list(d.get("backbone") or []) + list(d.get("head") or [])
    if not rows:
        raise ModelYAMLError("the model YAML has no 'backbone'/'head' rows")
    needs_shapes = any(str(r[2]).split(".")[-1] == "Linear" for r in rows if isinstance(r, (list, tuple)) and len(r) == 4)
    if needs_shapes and not imgsz:
        raise ModelYAMLError("this model has a Linear layer whose input size follows imgsz: pass imgsz")
    probe = torch.zeros(1, in_channels, imgsz, imgsz) if needs_shapes else None
    outputs: list[torch.Tensor | None] = []

    ch = [in_channels]
    layers, save = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise ModelYAMLError(f"layer {i}: expected [from, repeats, module, args], got {row!r}")
        f, n, name, args = row
        cls = lookup_module(str(name), i)
        args = _resolve_args(list(args or []), d)
        try:
            c_in = ch[f] if isinstance(f, int) else None
        except IndexError:
            raise ModelYAMLError(f"layer {i}: 'from' {f} points before the input") from None
        n = max(round(n * depth), 1) if n > 1 else n
        kwargs: dict[str, Any] = {}
        if cls in CHANNEL_MODULES:
            c2 = args[0]
            if c2 != nc:
                c2 = make_divisible(min(c2, max_channels) * width, 8)
            args = [c_in, c2, *args[1:]]
            if cls in REPEAT_MODULES:
                args.insert(2, n)
                n = 1
        elif cls is M.Classify:
            c2 = args[0]
            args = [c_in, *args]
        elif (cls is M.Detect and len(args) < 2) or cls is M.Segment:  # anchor-free: [nc] / [nc, nm, npr]
            if not isinstance(f, list):
                raise ModelYAMLError(f"layer {i}: {name} takes a list of input layers, e.g. [15, 18, 21]")
            ch_in = [ch[x] for x in f]
            if cls is M.Segment:
                nm = int(args[1]) if len(args) > 1 else 32  # mask coefficients = prototypes
                npr = args[2] if len(args) > 2 else 256  # prototype branch channels, scaled like a Conv's
                args = [args[0], nm, make_divisible(min(npr, max_channels) * width, 8), ch_in]
            else:
                cls, args = M.DetectDFL, [args[0], ch_in]
            c2 = None
        elif cls is M.Detect:
            anchors = args[1]
            if isinstance(anchors, int):  # number of anchors per level, sizes found later by autoanchor
                anchors = [list(range(anchors * 2))] * len(f)
            if len(anchors) != len(f):
                raise ModelYAMLError(f"layer {i}: {len(anchors)} anchor rows for {len(f)} input levels")
            args = [args[0], anchors, [ch[x] for x in f]]
            c2 = None
        elif cls is M.Concat:
            c2 = sum(ch[x] for x in f)
        elif cls is nn.Linear:
            src = outputs[f] if isinstance(f, int) and f != -1 else outputs[-1]
            c2 = args[0]
            args = [int(src[0].numel()), *args]
        else:
            c2 = c_in if c_in is not None else ch[f[0]]
        if cls in ACT_MODULES and act is not True:
            kwargs["act"] = act
        try:
            m = nn.Sequential(*(cls(*args, **kwargs) for _ in range(n))) if n > 1 else cls(*args, **kwargs)
        except TypeError as e:
            raise ModelYAMLError(f"layer {i}: {name}{tuple(args)}: {e}") from None
        m.i, m.f, m.type = i, f, str(name).replace("nn.", "")
        m.np = sum(p.numel() for p in m.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m)
        if probe is not None:
            with torch.no_grad():
                m.eval()
                x = outputs[-1] if outputs else probe
                if f != -1:
                    x = outputs[f] if isinstance(f, int) else [outputs[j] for j in f]
                outputs.append(m(x))
                m.train()
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(set(save))
