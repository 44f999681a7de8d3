"""Building blocks of the YAML models.

Attribute names (``conv``, ``bn``, ``cv1``, ``m`` ...) follow the layout used by
the ultralytics/yolov5 model files, so that a state_dict produced there for the
same YAML has the same keys here.  Every activation is a constructor argument:
nothing in this module is switched process-wide.

Shapes: ``x (Tensor[B, C, H, W])`` unless stated otherwise.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def autopad(k: int | tuple[int, int], p: int | None = None, d: int = 1) -> int | tuple[int, int]:
    """Padding that keeps the spatial size for stride 1 ("same"), for kernel ``k`` and dilation ``d``."""
    if p is not None:
        return p
    if isinstance(k, int):
        k = d * (k - 1) + 1 if d > 1 else k
        return k // 2
    return tuple((d * (x - 1) + 1) // 2 for x in k)


# SiLU is out of place: its backward needs its input, so an in-place SiLU makes autograd keep a copy
# of the BatchNorm output anyway (measured 2-7% slower training steps on CPU than out of place).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "relu": lambda: nn.ReLU(inplace=True),
    "leakyrelu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "gelu": lambda: nn.GELU(),
    "identity": nn.Identity,
}


def make_act(act: bool | str | nn.Module = True) -> nn.Module:
    """``True`` -> SiLU, ``False``/``None`` -> Identity, a name from ACTIVATIONS, or a module."""
    if isinstance(act, nn.Module):
        return act
    if act is True:
        return nn.SiLU()
    if not act:
        return nn.Identity()
    try:
        return ACTIVATIONS[str(act).lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}") from None


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + activation; padding defaults to "same"."""

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g: int = 1, d: int = 1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two convolutions with an optional residual add (only when ``c1 == c2``)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k=((1, 1), (3, 3)), e: float = 0.5,
                 act=True):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, k[0], 1, act=act)
        self.cv2 = Conv(hidden, c2, k[1], 1, g=g, act=act)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convolutions: two 1x1 branches, ``n`` bottlenecks on one, then fused."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5, act=True):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1, act=act)
        self.cv2 = Conv(c1, hidden, 1, 1, act=act)
        self.cv3 = Conv(2 * hidden, c2, 1, act=act)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class BottleneckCSP(nn.Module):
    """The CSP bottleneck of YOLOv5 before v4.0: the bottleneck branch and a plain 1x1 branch are
    concatenated, batch-normalised together and fused."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5, act=True):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1, act=act)
        self.cv2 = nn.Conv2d(c1, hidden, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(hidden, hidden, 1, 1, bias=False)
        self.cv4 = Conv(2 * hidden, c2, 1, 1, act=act)
        self.bn = nn.BatchNorm2d(2 * hidden, eps=1e-3, momentum=0.03)
        self.act = make_act(act)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class C2f(nn.Module):
    """YOLOv8's CSP block: split, ``n`` bottlenecks whose every output is kept, one fusing 1x1 conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5, act=True):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1, act=act)
        self.cv2 = Conv((2 + n) * self.c, c2, 1, act=act)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=((3, 3), (3, 3)), e=1.0, act=act)
                               for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class Focus(nn.Module):
    """Space-to-depth (every 2x2 pixel block to 4 channels) followed by a Conv: the YOLOv5 v3 stem."""

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g: int = 1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, H, W] -> [B, 4C, H/2, W/2]
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling with parallel max-pools of kernels ``k`` (YOLOv3/v5 v3)."""

    def __init__(self, c1: int, c2: int, k=(5, 9, 13), act=True):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1, act=act)
        self.cv2 = Conv(hidden * (len(k) + 1), c2, 1, 1, act=act)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class SPPF(nn.Module):
    """SPP-Fast: three chained max-pools of kernel ``k``, equal to SPP(k, 2k-1, 3k-2) and cheaper."""

    def __init__(self, c1: int, c2: int, k: int = 5, act=True):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1, act=act)
        self.cv2 = Conv(hidden * 4, c2, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension``."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Classify(nn.Module):
    """Classification head: 1x1 Conv to ``hidden`` channels, global average pool, dropout, Linear.

    Input ``x (Tensor[B, c1, H, W])`` (or a list, concatenated after pooling); returns raw logits
    ``Tensor[B, c2]`` in train and eval mode alike (softmax belongs to post-processing).
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p=None, g: int = 1, dropout: float = 0.0,
                 hidden: int = 1280, act=True):
        super().__init__()
        self.conv = Conv(c1, hidden, k, s, p, g, act=act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(p=dropout, inplace=True)
        self.linear = nn.Linear(hidden, c2)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(x, list):
            x = torch.cat(x, 1)
        return self.linear(self.drop(self.pool(self.conv(x)).flatten(1)))


class Detect(nn.Module):
    """Anchor-based YOLOv5 detection head: one 1x1 conv per level to ``na * (nc + 5)`` channels.

    ``forward(xs: list[Tensor[B, ch_i, H_i, W_i]]) -> list[Tensor[B, na, H_i, W_i, nc + 5]]`` raw
    (un-activated) predictions, in train and eval mode alike; decoding with ``anchors`` and
    ``stride`` is post-processing (``vistrain.ops``). ``anchors`` (a buffer, as in yolov5's files)
    holds the anchor sizes per level in units of that level's stride once ``stride`` is known.
    """

    def __init__(self, nc: int = 80, anchors=(), ch: tuple[int, ...] = ()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, x in enumerate(xs):
            y = self.m[i](x)
            b, _, h, w = y.shape
            out.append(y.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out


class DFL(nn.Module):
    """Distribution Focal Loss integral: ``reg_max`` logits per box side -> the expected distance in bins.

    ``forward(x: Tensor[B, 4 * reg_max, N]) -> Tensor[B, 4, N]`` = sum_k softmax(x)_k * k per side.  The bin
    values live in a frozen 1x1 conv (``conv.weight`` = 0..reg_max-1), the layout of ultralytics' files.
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n = x.shape
        bins = self.conv.weight.view(1, 1, self.reg_max, 1).to(x.dtype)
        return (x.view(b, 4, self.reg_max, n).softmax(2) * bins).sum(2)


def _branch(c1: int, c_mid: int, c_out: int) -> nn.Sequential:
    """Two 3x3 Convs and a 1x1 output conv with bias: one output branch of the anchor-free heads."""
    return nn.Sequential(Conv(c1, c_mid, 3), Conv(c_mid, c_mid, 3), nn.Conv2d(c_mid, c_out, 1))


class DetectDFL(nn.Module):
    """Anchor-free YOLOv8 detection head (the original, "legacy" layout of ultralytics' YOLOv8 files).

    Per level, a box branch ``cv2`` (``4 * reg_max`` distance logits: left, top, right, bottom, each a
    distribution over ``reg_max`` bins) and a class branch ``cv3`` (``nc`` logits).
    ``forward(xs: list[Tensor[B, ch_i, H_i, W_i]]) -> list[Tensor[B, 4 * reg_max + nc, H_i, W_i]]``, raw, in
    train and eval mode alike; decoding (:func:`vistrain.ops.boxes.decode_dfl`) is post-processing.
    """

    def __init__(self, nc: int = 80, ch: tuple[int, ...] = (), reg_max: int = 16):
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), reg_max
        self.no = nc + 4 * reg_max
        c_box, c_cls = max(16, ch[0] // 4, 4 * reg_max), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(_branch(c, c_box, 4 * reg_max) for c in ch)
        self.cv3 = nn.ModuleList(_branch(c, c_cls, nc) for c in ch)
        self.dfl = DFL(reg_max)
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1) for i, x in enumerate(xs)]

    def bias_init(self, imgsz: int = 640) -> None:
        """Box logits start at 2.0; class logits at the prior of ~5 objects per ``imgsz`` image over all classes."""
        with torch.no_grad():
            for box, cls, s in zip(self.cv2, self.cv3, self.stride.tolist()):
                box[-1].bias.fill_(2.0)
                cls[-1].bias.fill_(math.log(5 / self.nc / (imgsz / s) ** 2))


class Proto(nn.Module):
    """Prototype masks for instance segmentation: 3x3 Conv, 2x transposed-conv upsampling, 3x3 Conv, 1x1 Conv
    to ``c2`` prototypes: ``Tensor[B, c1, H, W] -> Tensor[B, c2, 2H, 2W]``."""

    def __init__(self, c1: int, c_: int = 256, c2: int = 32):
        super().__init__()
        self.cv1 = Conv(c1, c_, 3)
        self.upsample = nn.ConvTranspose2d(c_, c_, 2, 2, 0, bias=True)
        self.cv2 = Conv(c_, c_, 3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


class Segment(DetectDFL):
    """YOLOv8 instance segmentation head: :class:`DetectDFL` plus ``nm`` mask coefficients per anchor point
    (branch ``cv4``) and ``nm`` prototype masks at stride 4 (``proto``, from the first level).

    ``forward(xs) -> (per-level detect outputs as DetectDFL, coefficients Tensor[B, nm, N], prototypes
    Tensor[B, nm, H_0 * 2, W_0 * 2])``; an instance's mask is ``sigmoid(coefficients @ prototypes)``.
    """

    def __init__(self, nc: int = 80, nm: int = 32, npr: int = 256, ch: tuple[int, ...] = (), reg_max: int = 16):
        super().__init__(nc, ch, reg_max)
        self.nm, self.npr = nm, npr
        self.proto = Proto(ch[0], npr, nm)
        self.cv4 = nn.ModuleList(_branch(c, max(ch[0] // 4, nm), nm) for c in ch)

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        coef = torch.cat([self.cv4[i](x).flatten(2) for i, x in enumerate(xs)], 2)
        return super().forward(xs), coef, self.proto(xs[0])
