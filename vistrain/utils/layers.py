"""Seeing inside a model without changing it: its layers as a user counts them, and forward hooks around them that
keep their outputs (feature maps, embeddings) or time them (profile).  ``model(x)`` returns what it always does.

The layers: a YAML model's rows (``0 .. N``, ultralytics' indices); other models' top-level parts, with the stage
containers opened (ResNet ``conv1 ... layer4, avgpool, fc``; EfficientNet ``conv_stem, bn1, blocks.0 ... blocks.6,
...``; EfficientDet ``backbone.*, fpn.cell.0 ..., class_net, box_net``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from vistrain.engine.utils import UserError
from vistrain.utils.summary import output_tensors as tensors  # a layer's output tensors, in order

OPEN = ("backbone", "fpn", "blocks", "cell")  # containers listed by their parts
SKIP_DEFAULT = (nn.Dropout, nn.Identity, nn.Flatten)  # never the default embedding layer


def unwrap(model: nn.Module) -> nn.Module:
    """The network itself: inside ``InferenceModel`` (predict's model + decode) and DDP."""
    while hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    inner = getattr(model, "model", None)
    if type(model).__name__ == "InferenceModel" and isinstance(inner, nn.Module):
        return inner
    return model


def model_layers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, type, module)`` of each layer, in model order."""
    net = unwrap(model)
    rows = getattr(net, "model", None)
    if isinstance(rows, nn.Sequential) and all(hasattr(m, "f") for m in rows):  # a YAML model
        return [(str(i), str(getattr(m, "type", type(m).__name__)).split(".")[-1], m) for i, m in enumerate(rows)]
    out: list[tuple[str, str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module, depth: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if depth < 3 and name in OPEN and len(list(child.children())) > 0:
                walk(full + ".", child, depth + 1)
            elif not isinstance(child, nn.ModuleDict):  # (BiFPN's resampling table: its members run inside cells)
                out.append((full, type(child).__name__, child))

    walk("", net, 0)
    return out


def head_start(layers: list[tuple[str, str, nn.Module]]) -> int:
    """Index of the first head layer: a YAML model's last row; ResNet ``fc``, EfficientNet ``classifier``,
    EfficientDet ``class_net``."""
    for k, (name, _, _) in enumerate(layers):
        if name in ("fc", "classifier", "class_net", "head"):
            return k
    return len(layers) - 1


def parse_layers(spec: Any, layers: list[tuple[str, str, nn.Module]], key: str) -> list[int] | None:
    """``True`` / ``all`` -> every layer; ``4,6,9`` (indices or names) -> those; empty / false -> None."""
    if spec is None or spec is False or str(spec).strip().lower() in ("", "false", "none", "0"):
        return None
    if spec is True or str(spec).strip().lower() in ("true", "all"):
        return list(range(len(layers)))
    names = {name: k for k, (name, _, _) in enumerate(layers)}
    items = spec if isinstance(spec, (list, tuple)) else str(spec).strip("[]() ").split(",")
    out = []
    for item in items:
        s = str(item).strip()
        k = names.get(s, int(s) if s.lstrip("-").isdigit() else None)
        if k is not None and k < 0:
            k += len(layers)
        if k is None or not 0 <= k < len(layers):
            shown = ", ".join(n for n, _, _ in layers[:8]) + (" ..." if len(layers) > 8 else "")
            raise UserError(f"{key}={spec}: no layer {s!r}; the model has layers 0..{len(layers) - 1} ({shown}; "
                            f"`vistrain summary` lists them)")
        out.append(k)
    return sorted(set(out))


@contextmanager
def capture(model: nn.Module, indices: list[int]) -> Iterator[dict[int, Any]]:
    """Inside, each forward pass stores layer ``k``'s output (detached) in the yielded dict under ``k``."""
    layers = model_layers(model)
    store: dict[int, Any] = {}

    def hook_for(k: int):
        def hook(_module, _inp, out):
            store[k] = out
        return hook

    handles = [layers[k][2].register_forward_hook(hook_for(k)) for k in indices]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def pooled(out: Any) -> torch.Tensor:
    """A layer's output as ``Tensor[B, D]``: each tensor global-average-pooled over its spatial axes, concatenated."""
    parts = []
    for t in tensors(out):
        t = t.detach().float()
        parts.append(t.flatten(2).mean(2) if t.ndim > 2 else t.reshape(t.shape[0], -1))
    return torch.cat(parts, 1)


def default_embed_layer(layers: list[tuple[str, str, nn.Module]]) -> int:
    """The layer before the head (skipping dropout and identities), as ultralytics' ``embed`` default."""
    k = head_start(layers) - 1
    while k > 0 and isinstance(layers[k][2], SKIP_DEFAULT):
        k -= 1
    return max(k, 0)


def feature_grid(fmap: torch.Tensor, path: Path, n: int = 32, cols: int = 8, tile: int = 96) -> None:
    """The first ``n`` channels of ``fmap (Tensor[C, H, W])`` as a grid (``cols`` per row), each channel scaled to
    its own range, coloured with viridis and enlarged (nearest) to about ``tile`` pixels; written to ``path``."""
    from matplotlib import colormaps
    from PIL import Image

    maps = fmap[:n].detach().float().cpu()
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
    maps = ((maps - lo) / (hi - lo).clamp(min=1e-12)).numpy()
    h, w = maps.shape[1:]
    scale = max(1, tile // max(h, w))
    c, cols = len(maps), min(cols, len(maps))
    rows, pad = -(-c // cols), 2
    th, tw = h * scale, w * scale
    grid = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, np.uint8)
    lut = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    for j, m in enumerate(maps):
        r, q = divmod(j, cols)
        img = lut[(m * 255).astype(np.uint8)].repeat(scale, 0).repeat(scale, 1)
        y, x = pad + r * (th + pad), pad + q * (tw + pad)
        grid[y:y + th, x:x + tw] = img
    Image.fromarray(grid).save(path)


def save_feature_maps(outputs: dict[int, Any], layers: list[tuple[str, str, nn.Module]], b: int, stem: str,
                      save_dir: Path) -> list[Path]:
    """Image ``b``'s feature maps of every captured layer: ``STEM_stageK_MODULE_features.png`` per layer with a
    spatial output (the first such tensor of a layer with several outputs)."""
    written = []
    for k in sorted(outputs):
        maps = [t for t in tensors(outputs[k]) if t.ndim == 4 and t.shape[2] > 1 and t.shape[3] > 1]
        if not maps:
            continue
        kind = layers[k][1]
        fmap = maps[0][b]
        path = save_dir / f"{stem}_stage{k}_{kind}_features.png"
        feature_grid(fmap, path)
        written.append(path)
    return written


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_gflops(model: nn.Module, x: torch.Tensor) -> tuple[list[float], float]:
    """GFLOPs of each layer and of the whole model for input ``x`` (torch's FlopCounterMode: 2 per multiply-add),
    counted as ``summary`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    net = unwrap(model)
    layers = model_layers(net)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    counts = counter.get_flop_counts()
    root = type(net).__name__
    per = [sum(counts.get(f"{root}.{_fqn(net, m)}", {}).values()) / 1e9 for _, _, m in layers]
    return per, sum(counts.get("Global", {}).values()) / 1e9


def _fqn(net: nn.Module, module: nn.Module) -> str:
    for name, m in net.named_modules():
        if m is module:
            return name
    return ""


def profile_layers(model: nn.Module, x: torch.Tensor, runs: int = 3) -> dict[str, Any]:
    """Time each layer with hooks before and after it over ``runs`` forward passes (after one warm-up), and each
    whole pass measured the same way; GFLOPs per layer.  A layer's ms is its median over the passes, ``layers_ms``
    the median over the passes of the layers' sum, ``total_ms`` the median whole pass.  Returns ``{"rows": [...],
    "total_ms", "layers_ms", "gflops"}``, each row ``(index, name, type, ms, share of time, GFLOPs, share of
    GFLOPs)``."""
    net = unwrap(model)
    layers = model_layers(net)
    device = x.device
    per_run = [[0.0] * len(layers) for _ in range(runs)]  # a layer run twice in a pass counts twice
    start: dict[int, float] = {}
    run = [0]

    def pre(k):
        def hook(_m, _i):
            sync(device)
            start[k] = time.perf_counter()
        return hook

    def post(k):
        def hook(_m, _i, _o):
            sync(device)
            per_run[run[0]][k] += (time.perf_counter() - start.pop(k)) * 1e3
        return hook

    def median(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    totals = []
    with torch.no_grad():
        net(x)  # warm-up
        handles = [h for k, (_, _, m) in enumerate(layers)
                   for h in (m.register_forward_pre_hook(pre(k)), m.register_forward_hook(post(k)))]
        try:
            for r in range(runs):
                run[0] = r
                sync(device)
                t0 = time.perf_counter()
                net(x)
                sync(device)
                totals.append((time.perf_counter() - t0) * 1e3)
        finally:
            for h in handles:
                h.remove()
    ms = [median([per_run[r][k] for r in range(runs)]) for k in range(len(layers))]
    gflops, total_gflops = layer_gflops(net, x)
    total_ms, layer_ms = median(totals), median([sum(t) for t in per_run])
    share = sum(ms)
    rows = [(k, name, kind, ms[k], ms[k] / max(share, 1e-12), gflops[k], gflops[k] / max(total_gflops, 1e-12))
            for k, (name, kind, _) in enumerate(layers)]
    return {"rows": rows, "total_ms": total_ms, "layers_ms": layer_ms, "gflops": total_gflops}


def profile_table(prof: dict[str, Any], top: int = 10) -> list[str]:
    """The profile as printed lines: every layer in order, then the slowest ``top``."""
    head = f"{'layer':>6} {'name':<22} {'type':<18} {'ms':>9} {'time %':>7} {'GFLOPs':>9} {'FLOPs %':>8}"

    def line(r) -> str:
        return (f"{r[0]:>6} {r[1][:22]:<22} {r[2][:18]:<18} {r[3]:>9.3f} {100 * r[4]:>6.1f}% {r[5]:>9.4f} "
                f"{100 * r[6]:>7.1f}%")

    out = [head, *(line(r) for r in prof["rows"]),
           f"{'':>6} {'all layers':<22} {'':<18} {prof['layers_ms']:>9.3f} {'':>7} {prof['gflops']:>9.4f}",
           f"{'':>6} {'whole forward':<22} {'':<18} {prof['total_ms']:>9.3f}",
           f"slowest {min(top, len(prof['rows']))} layers:"]
    out += [line(r) for r in sorted(prof["rows"], key=lambda r: -r[3])[:top]]
    return out
