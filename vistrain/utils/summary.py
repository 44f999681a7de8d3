"""Model summary in the style of ``torchsummary``: per-layer output shapes and
parameter counts, plus totals, GFLOPs and an estimated memory footprint.

FLOP convention: a multiply-add counts as **2 FLOPs**, as
``torch.utils.flop_counter.FlopCounterMode`` does (so a ``k x k`` convolution
costs ``2 * C_out * C_in * k * k * H_out * W_out`` FLOPs per image).
``ModelSummary.gflops`` is that count / 1e9 for one forward pass at batch 1.

Memory estimates follow ``torchsummary`` and assume 4 bytes per element (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["LayerInfo", "ModelSummary", "summarize"]

_MB = 2**20


@dataclass
class LayerInfo:
    index: int
    name: str
    type: str
    from_: str
    output_shape: tuple | list[tuple]  # one tuple per output tensor if several; () if never called
    params: int


@dataclass
class ModelSummary:
    layers: list[LayerInfo]
    total_params: int
    trainable_params: int
    non_trainable_params: int
    gflops: float  # 1 multiply-add = 2 FLOPs; batch 1
    input_mb: float
    forward_backward_mb: float
    params_mb: float
    total_mb: float

    def table(self) -> str:
        """The printed summary text."""
        header = ("idx", "from", "type", "output shape", "params")
        rows = [(str(l.index), l.from_, l.type, _fmt_shape(l.output_shape), f"{l.params:,}")
                for l in self.layers]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(5)]
        right = (True, True, False, False, True)  # right-align numeric columns

        def line(cells) -> str:
            return "  ".join(c.rjust(w) if r else c.ljust(w)
                             for c, w, r in zip(cells, widths, right)).rstrip()

        sep = "=" * max(sum(widths) + 2 * 4, 40)
        g = self.gflops
        gtxt = f"{g:.2f}" if g == 0 or g >= 0.01 else f"{g:.2g}"
        out = [line(header), sep, *(line(r) for r in rows), sep,
               f"Total params: {self.total_params:,}",
               f"Trainable params: {self.trainable_params:,}",
               f"Non-trainable params: {self.non_trainable_params:,}",
               f"GFLOPs: {gtxt}",
               f"Input size (MB): {self.input_mb:,.2f}",
               f"Forward/backward pass size (MB): {self.forward_backward_mb:,.2f}",
               f"Params size (MB): {self.params_mb:,.2f}",
               f"Estimated Total Size (MB): {self.total_mb:,.2f}"]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _fmt_shape(shape: tuple | list[tuple]) -> str:
    if isinstance(shape, list):
        return ", ".join(_fmt_shape(s) for s in shape) if shape else "-"
    if not shape:
        return "-"
    return str([-1, *shape[1:]])  # batch dimension shown as -1


def output_tensors(obj) -> list[torch.Tensor]:
    """All tensors in a (possibly nested) tuple / list / dict output, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in output_tensors(o)]
    return []


def _select_layers(model: nn.Module) -> list[tuple[int, str, str, str, nn.Module]]:
    """(index, name, type, from, module) for each row of the summary."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        named = list(layers.items())
    elif isinstance(layers, (nn.Sequential, nn.ModuleList)) or (
            isinstance(layers, (list, tuple)) and layers and all(isinstance(m, nn.Module) for m in layers)):
        named = [(str(k), m) for k, m in enumerate(layers)]
    else:
        named = None
    if named is not None:
        out = []
        for k, (n, m) in enumerate(named):
            i, f, t = getattr(m, "i", k), getattr(m, "f", -1), getattr(m, "type", None)
            out.append((i if isinstance(i, int) else k, f"layers.{n}",
                        t if isinstance(t, str) else type(m).__name__,  # nn.Module.type is a method
                        str(list(f) if isinstance(f, tuple) else f), m))
        return out
    return [(k, n, type(m).__name__, "-1", m) for k, (n, m) in enumerate(model.named_children())]


def summarize(model: nn.Module, imgsz: int | tuple[int, int] = 224, in_channels: int = 3,
              device="cpu") -> ModelSummary:
    """Summarize ``model`` with one batch-1 forward pass of a zeros image.

    Rows are ``model.layers`` when the model exposes it (using each layer's ``i``,
    ``f`` and ``type`` attributes when present), else ``model.named_children()``.
    The model is not moved: ``device`` is where the input is created and must match
    the model's device. Train/eval flags of every submodule are restored afterwards.
    A module called several times reports the shape of its first call; all calls
    count towards the activation memory.
    """
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    params = list(model.parameters())  # de-duplicates shared parameters
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    x = torch.zeros(1, in_channels, h, w, device=device, dtype=dtype)

    rows = _select_layers(model)
    shapes: dict[int, tuple | list[tuple]] = {}
    act_numel = [0]

    def make_hook(k: int):
        def hook(_module, _inp, out):
            ts = output_tensors(out)
            act_numel[0] += sum(t.numel() for t in ts)
            if k not in shapes:
                s = [tuple(t.shape) for t in ts]
                shapes[k] = s[0] if isinstance(out, torch.Tensor) else s
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [r[4].register_forward_hook(make_hook(k)) for k, r in enumerate(rows)]
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        flops = counter.get_total_flops()
    finally:
        for hd in handles:
            hd.remove()
        for m, training in modes.items():
            m.training = training

    layers = [LayerInfo(index=i, name=n, type=t, from_=f, output_shape=shapes.get(k, ()),
                        params=sum(p.numel() for p in m.parameters()))
              for k, (i, n, t, f, m) in enumerate(rows)]
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    input_mb = x.numel() * 4 / _MB
    fb_mb = 2 * act_numel[0] * 4 / _MB
    params_mb = total * 4 / _MB
    return ModelSummary(layers=layers, total_params=total, trainable_params=trainable,
                        non_trainable_params=total - trainable, gflops=flops / 1e9,
                        input_mb=input_mb, forward_backward_mb=fb_mb, params_mb=params_mb,
                        total_mb=input_mb + fb_mb + params_mb)
