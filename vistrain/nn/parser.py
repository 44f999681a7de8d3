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


# modules of ultralytics' model YAMLs (YOLO11, YOLOv9/10, RT-DETR, YOLO-World, ...) that vistrain does not
# implement: named as such, without a "did you mean" (C3k2 is not a misspelt C3)
ULTRALYTICS_ONLY = frozenset({
    "A2C2f", "AConv", "ADown", "AIFI", "C1", "C2", "C2PSA", "C2fAttn", "C2fCIB", "C2fPSA", "C3Ghost", "C3TR", "C3k",
    "C3k2", "C3x", "CBFuse", "CBLinear", "ConvTranspose", "DWConv", "DWConvTranspose2d", "ELAN1", "GhostBottleneck",
    "GhostConv", "HGBlock", "HGStem", "ImagePoolingAttn", "Index", "OBB", "Pose", "PSA", "RTDETRDecoder", "RepC3",
    "RepConv", "RepNCSPELAN4", "ResNetLayer", "SCDown", "SPPELAN", "TorchVision", "WorldDetect", "YOLOEDetect",
    "YOLOESegment", "v10Detect"})


def lookup_module(name: str, row_index: int) -> type[nn.Module]:
    key = name[3:] if name.startswith("nn.") else name
    if key not in REGISTRY:
        import difflib

        available = f"available: {', '.join(sorted(REGISTRY))}"
        if key in ULTRALYTICS_ONLY:
            raise ModelYAMLError(f"module {name} (row {row_index}) is not available in vistrain (an ultralytics "
                                 f"module); {available}")
        by_lower = {k.lower(): k for k in REGISTRY}
        close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
        hint = f"; did you mean {by_lower[close[0]]!r}?" if close else ""
        raise ModelYAMLError(f"module {name!r} (row {row_index}) is unknown{hint} ({available})")
    return REGISTRY[key]


def _first_string_arg(raw_args: list, d: dict) -> str:
    """``argument K 'x' is a string ...`` for the first string among a row's args that is neither a top-level
    YAML key (``nc``) nor a mode like 'nearest', or ''."""
    for k, a in enumerate(raw_args, 1):
        if isinstance(a, str) and a not in ("nearest", "bilinear", "None") and a not in d:
            return f"argument {k} {a!r} is a string where a number belongs"
    return ""


def _check_row(i: int, f, n, args) -> None:
    """The types of a row's ``from``, ``repeats`` and ``args`` fields, before anything uses them."""
    if not (isinstance(f, int) and not isinstance(f, bool)) and not (
            isinstance(f, list) and f and all(isinstance(x, int) and not isinstance(x, bool) for x in f)):
        raise ModelYAMLError(f"row {i}: 'from' is {f!r}; give a layer index (-1 = the previous layer) or a list "
                             f"of them, e.g. [-1, 6]")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ModelYAMLError(f"row {i}: 'repeats' is {n!r}; give a whole number >= 1")
    if args is not None and not isinstance(args, list):
        raise ModelYAMLError(f"row {i}: 'args' is {args!r}; give a list, e.g. [64, 3, 2]")


def scale_factors(d: dict, scale: str | None) -> tuple[float, float, float, str | None]:
    """Return (depth, width, max_channels, scale) for the YAML ``d`` and the requested scale."""
    scales = d.get("scales")
    if scales:
        if not scale:
            scale = next(iter(scales))
        if scale not in scales:
            raise ModelYAMLError(f"scale {scale!r} not in this YAML's scales {list(scales)}")
        try:
            depth, width, max_channels = scales[scale]
            return float(depth), float(width), float(max_channels), scale
        except (TypeError, ValueError):
            raise ModelYAMLError(f"scales: {scale}: {scales[scale]!r}; give [depth, width, max_channels] "
                                 f"numbers, e.g. [0.33, 0.25, 1024]") from None
    try:
        return float(d.get("depth_multiple", 1.0)), float(d.get("width_multiple", 1.0)), float("inf"), None
    except (TypeError, ValueError):
        raise ModelYAMLError(f"depth_multiple {d.get('depth_multiple')!r} / width_multiple "
                             f"{d.get('width_multiple')!r}: give numbers, e.g. 0.33 and 0.25") from None


def _resolve_args(args: list, d: dict) -> list:
    """Replace bare names that are top-level YAML keys (``nc``, ``anchors``) by their values, and the
    Python spelling ``None`` (ultralytics YAMLs use it) by None."""
    return [None if a == "None" else d[a] if isinstance(a, str) and a in d and a not in ("nearest", "bilinear")
            else a for a in args]


def check_rows(d: dict) -> None:
    """Cheap checks of every row (shape, module name, field types) without building anything, so a bad
    model YAML stops a run before its data are scanned.  ``parse_model`` finds the rest (argument values)."""
    if not isinstance(d.get("backbone") or [], list) or not isinstance(d.get("head") or [], list):
        raise ModelYAMLError("'backbone' and 'head' must be lists of rows [from, repeats, module, args]")
    for i, row in enumerate(list(d.get("backbone") or []) + list(d.get("head") or [])):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise ModelYAMLError(f"row {i}: expected [from, repeats, module, args], got {row!r}")
        cls = lookup_module(str(row[2]), i)
        _check_row(i, *row[:2], row[3])
        c2 = (row[3] or [None])[0]
        if cls in CHANNEL_MODULES | {M.Classify} and not (
                isinstance(c2, (int, float)) and not isinstance(c2, bool) or isinstance(c2, str) and c2 in d):
            raise ModelYAMLError(f"row {i} ({row[2]} {row[3]}): argument 1 {c2!r} (output channels) is not a "
                                 f"number")


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
            raise ModelYAMLError(f"row {i}: expected [from, repeats, module, args], got {row!r}")
        f, n, name, args = row
        cls = lookup_module(str(name), i)
        _check_row(i, f, n, args)
        try:
            m, c2 = _build_row(i, f, n, name, cls, list(args or []), d, ch, outputs, probe, depth, width,
                               max_channels, act)
        except (TypeError, ValueError, IndexError, KeyError) as e:
            if isinstance(e, ModelYAMLError):
                raise
            what = _first_string_arg(list(args or []), d) or str(e).splitlines()[0]
            raise ModelYAMLError(f"row {i} ({name} {list(args or [])}): {what}") from None
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(set(save))


def _build_row(i: int, f, n: int, name: str, cls: type[nn.Module], args: list, d: dict, ch: list, outputs: list,
               probe: torch.Tensor | None, depth: float, width: float, max_channels: float, act
               ) -> tuple[nn.Module, int | None]:
    """The module of row ``i`` and its output channels (None for heads); appends its probe output."""
    nc = d.get("nc")
    args = _resolve_args(args, d)
    try:
        c_in = ch[f] if isinstance(f, int) else None
    except IndexError:
        raise ModelYAMLError(f"row {i}: 'from' {f} points before the input") from None
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
            raise ModelYAMLError(f"row {i}: {name} takes a list of input layers, e.g. [15, 18, 21]")
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
            raise ModelYAMLError(f"row {i}: {len(anchors)} anchor rows for {len(f)} input levels")
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
    m = nn.Sequential(*(cls(*args, **kwargs) for _ in range(n))) if n > 1 else cls(*args, **kwargs)
    m.i, m.f, m.type = i, f, str(name).replace("nn.", "")
    m.np = sum(p.numel() for p in m.parameters())
    if probe is not None:
        with torch.no_grad():
            m.eval()
            x = outputs[-1] if outputs else probe
            if f != -1:
                x = outputs[f] if isinstance(f, int) else [outputs[j] for j in f]
            outputs.append(m(x))
            m.train()
    return m, c2
