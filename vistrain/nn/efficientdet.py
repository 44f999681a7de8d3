"""EfficientDet (Tan, Pang, Le 2020) and EfficientNet classifiers on timm's EfficientNet.

``EfficientDet`` is a timm ``tf_efficientnet_bN`` feature backbone (TF "SAME" padding, BatchNorm eps 1e-3,
drop-path 0.2), a BiFPN over P3-P7 (P8 for D7x) with fast normalised fusion (``relu(w) / (sum(relu(w)) +
1e-4)``; plain sum for D6-D7x) and class / box nets shared over the levels with one BatchNorm per level.
Its ``state_dict`` keys and shapes equal effdet's ``tf_efficientdet_dN`` and, given the same weights and
input, its outputs are bit-equal (tests/test_efficientdet.py).  Unlike effdet's, the model is not tied to
one input size: up-sampling targets the size of the level it feeds, so any input (a multiple of 128 keeps
every level exact, others are padded the TF way) and rectangular validation batches run.

``forward(x: Tensor[B, 3, H, W]) -> (cls_outs, box_outs)``: two lists over levels of
``Tensor[B, A * nc, H_l, W_l]`` and ``Tensor[B, A * 4, H_l, W_l]`` (A = 9 anchors per cell), raw logits and
box codes as effdet returns them.  ``x`` is RGB in 0..1 like every vistrain detector's input; the model
normalises it with the ImageNet mean / std first (non-persistent buffers, so the state_dict is effdet's), and
from there computes exactly what effdet's model computes on the normalised image.
Anchors, box coding, the loss and post-processing live in ``vistrain.ops.retina`` and
``vistrain.losses.effdet``; ``anchor_config()`` gives what they need.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF's BatchNorm defaults, as the released weights were trained with
# vistrain's default running-statistics rate: TF's 0.01 leaves them stale for the first ~500 steps, so that a short
# run validates far below its training loss (8-image overfit, 50 epochs: mAP50 0.015 at 0.01, 0.88 at 0.1);
# eval outputs and weights do not depend on it.  ``bn_momentum: 0.01`` in a model YAML restores TF's.
DEFAULT_BN_MOMENTUM = 0.1
ASPECT_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
NUM_SCALES = 3
CLASS_PRIOR = 0.01  # initial foreground probability of every class logit (focal-loss prior)

# EfficientNet input sizes at which the compound-scaled classifiers were defined (timm's defaults)
EFFICIENTNET_IMGSZ = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600}


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _act() -> nn.Module:
    return nn.SiLU(inplace=True)


def _same_conv(c_in: int, c_out: int, k: int, bias: bool, groups: int = 1) -> nn.Conv2d:
    """Stride-1 convolution with TF 'SAME' padding: for odd kernels it is symmetric and static."""
    return nn.Conv2d(c_in, c_out, k, 1, (k - 1) // 2, groups=groups, bias=bias)


class MaxPool2dSame(nn.Module):
    """3x3 / stride-2 max-pool with TF 'SAME' padding: pad (right / bottom first) with -inf, so padding never
    wins the max (zero padding would, on negative features)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.k, self.s = kernel_size, stride

    def _pad(self, size: int) -> tuple[int, int]:
        total = max((math.ceil(size / self.s) - 1) * self.s + self.k - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self._pad(x.shape[-2]), self._pad(x.shape[-1])
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=-float("inf"))
        return F.max_pool2d(x, self.k, self.s)


class ConvBn(nn.Sequential):
    """1x1 convolution (with bias, as the TF models) + BatchNorm: the channel adapter of a resample."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(OrderedDict(conv=nn.Conv2d(c_in, c_out, 1, bias=True), bn=_bn(c_out)))


class SeparableConv(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 (+ BatchNorm): BiFPN and head convolutions."""

    def __init__(self, c_in: int, c_out: int, bias: bool = True, bn: bool = True):
        super().__init__()
        self.conv_dw = _same_conv(c_in, c_in, 3, bias=False, groups=c_in)
        self.conv_pw = _same_conv(c_in, c_out, 1, bias=bias)
        self.bn = _bn(c_out) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_pw(self.conv_dw(x))
        return x if self.bn is None else self.bn(x)


class Resample(nn.Sequential):
    """Bring a feature map to ``c_out`` channels (1x1 conv + BN if they differ) and, for a coarser target
    level, down-sample it by a 'SAME' max-pool.  Up-sampling is done in ``FuseNode`` (to the target's size)."""

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        if c_in != c_out:
            self.add_module("conv", ConvBn(c_in, c_out))
        if down:
            self.add_module("downsample", MaxPool2dSame())


class Combine(nn.Module):
    """Resample each input of a BiFPN node to its level and fuse them: fast normalised fusion
    (``fastattn``), or a plain sum (``sum``, D6-D7x)."""

    def __init__(self, inputs: list[tuple[int, int, int]], level: int, channels: int, weight: str):
        super().__init__()
        self.offsets = [o for o, _, _ in inputs]
        self.resample = nn.ModuleDict({str(o): Resample(c, channels, down=lvl < level) for o, c, lvl in inputs})
        self.weight = weight
        self.edge_weights = nn.Parameter(torch.ones(len(inputs))) if weight == "fastattn" else None

    def forward(self, x: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        nodes = []
        for offset, resample in zip(self.offsets, self.resample.values()):
            t = resample(x[offset])
            if t.shape[-2:] != size:  # a finer level: nearest up-sampling to this level's size
                t = F.interpolate(t, size=size, mode="nearest")
            nodes.append(t)
        if self.edge_weights is not None:
            w = F.relu(self.edge_weights.to(nodes[0].dtype))
            total = w.sum() + 1e-4
            nodes = [n * w[i] / total for i, n in enumerate(nodes)]
        return torch.stack(nodes, -1).sum(-1)


class FuseNode(nn.Module):
    """One BiFPN node: combine its inputs, then swish + separable conv + BN."""

    def __init__(self, combine: Combine, channels: int):
        super().__init__()
        self.combine = combine
        self.after_combine = nn.Sequential(OrderedDict(act=_act(), conv=SeparableConv(channels, channels)))

    def forward(self, x: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.after_combine(self.combine(x, size))


def bifpn_nodes(min_level: int, max_level: int) -> list[tuple[int, list[int]]]:
    """The BiFPN graph: per node (its level, the offsets of its inputs into the running list of features,
    which starts with the ``max_level - min_level + 1`` input levels).  Top-down from max_level - 1 to
    min_level (each node: the level's latest feature and the coarser level's latest), then bottom-up from
    min_level + 1 to max_level (the level's every feature so far and the finer level's latest)."""
    ids = {lvl: [i] for i, lvl in enumerate(range(min_level, max_level + 1))}
    nodes, n = [], max_level - min_level + 1
    for lvl in range(max_level - 1, min_level - 1, -1):
        nodes.append((lvl, [ids[lvl][-1], ids[lvl + 1][-1]]))
        ids[lvl].append(n)
        n += 1
    for lvl in range(min_level + 1, max_level + 1):
        nodes.append((lvl, ids[lvl] + [ids[lvl - 1][-1]]))
        ids[lvl].append(n)
        n += 1
    return nodes


class BiFpnCell(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, min_level: int, max_level: int, weight: str):
        super().__init__()
        self.num_levels = max_level - min_level + 1
        info = [(c, min_level + i) for i, c in enumerate(in_channels)]  # (channels, level) of each feature
        self.levels = []
        self.fnode = nn.ModuleList()
        for level, offsets in bifpn_nodes(min_level, max_level):
            combine = Combine([(o, *info[o]) for o in offsets], level, channels, weight)
            self.fnode.append(FuseNode(combine, channels))
            self.levels.append(level - min_level)
            info.append((channels, level))

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        x = list(x)
        sizes = [t.shape[-2:] for t in x]
        for node, level in zip(self.fnode, self.levels):
            x.append(node(x, sizes[level]))
        return x[-self.num_levels:]


class BiFpn(nn.Module):
    """Extra levels beyond the backbone's (P6 = 1x1 conv + BN + max-pool of C5; P7, P8 = max-pool), then
    ``repeats`` BiFPN cells."""

    def __init__(self, backbone_channels: list[int], channels: int, repeats: int, min_level: int, max_level: int,
                 weight: str):
        super().__init__()
        self.resample = nn.ModuleDict()
        chs = list(backbone_channels)
        for i in range(len(chs), max_level - min_level + 1):
            self.resample[str(i)] = Resample(chs[-1], channels, down=True)
            chs.append(channels)
        self.cell = nn.Sequential(*[BiFpnCell(chs if r == 0 else [channels] * len(chs), channels, min_level,
                                              max_level, weight) for r in range(repeats)])

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        x = list(x)
        for resample in self.resample.values():
            x.append(resample(x[-1]))
        for cell in self.cell:
            x = cell(x)
        return x


class HeadNet(nn.Module):
    """Class or box net: ``repeats`` separable convs shared over levels, each followed by a per-level BN and
    swish, then a separable conv predicting ``num_outputs`` per anchor."""

    def __init__(self, channels: int, repeats: int, num_levels: int, num_outputs: int, num_anchors: int):
        super().__init__()
        self.conv_rep = nn.ModuleList([SeparableConv(channels, channels, bn=False) for _ in range(repeats)])
        self.bn_rep = nn.ModuleList([nn.ModuleList([nn.Sequential(OrderedDict(bn=_bn(channels)))
                                                    for _ in range(num_levels)]) for _ in range(repeats)])
        self.act = _act()
        self.predict = SeparableConv(channels, num_outputs * num_anchors, bn=False)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for level, t in enumerate(x):
            for conv, bn in zip(self.conv_rep, self.bn_rep):
                t = self.act(bn[level](conv(t)))
            out.append(self.predict(t))
        return out


# name -> (backbone, imgsz, fpn channels, fpn repeats, head repeats, anchor scale, max level, fusion)
EFFICIENTDET = {
    "d0": ("b0", 512, 64, 3, 3, 4.0, 7, "fastattn"),
    "d1": ("b1", 640, 88, 4, 3, 4.0, 7, "fastattn"),
    "d2": ("b2", 768, 112, 5, 3, 4.0, 7, "fastattn"),
    "d3": ("b3", 896, 160, 6, 4, 4.0, 7, "fastattn"),
    "d4": ("b4", 1024, 224, 7, 4, 4.0, 7, "fastattn"),
    "d5": ("b5", 1280, 288, 7, 4, 4.0, 7, "fastattn"),
    "d6": ("b6", 1280, 384, 8, 5, 4.0, 7, "sum"),
    "d7": ("b6", 1536, 384, 8, 5, 5.0, 7, "sum"),
    "d7x": ("b7", 1536, 384, 8, 5, 4.0, 8, "sum"),
}


def efficientdet_config(scale: str) -> dict:
    """The compound-scaled configuration of EfficientDet-``scale`` (d0 ... d7x) as a plain dict."""
    b, imgsz, ch, fpn_rep, head_rep, anchor_scale, max_level, weight = EFFICIENTDET[scale]
    return {"backbone": f"tf_efficientnet_{b}", "imgsz": imgsz, "fpn_channels": ch, "fpn_repeats": fpn_rep,
            "head_repeats": head_rep, "anchor_scale": anchor_scale, "min_level": 3, "max_level": max_level,
            "fpn_weight": weight, "drop_path_rate": 0.2}


def _glorot_uniform_(w: torch.Tensor, groups: int = 1) -> None:
    fan_in = w.shape[1] * w[0, 0].numel()
    fan_out = w.shape[0] * w[0, 0].numel() // groups
    limit = math.sqrt(3.0 / max(1.0, (fan_in + fan_out) / 2.0))
    nn.init.uniform_(w, -limit, limit)


def _variance_scaling_(w: torch.Tensor) -> None:
    nn.init.normal_(w, std=math.sqrt(1.0 / max(1.0, w.shape[1] * w[0, 0].numel())))


class EfficientDet(nn.Module):
    """EfficientDet-D0 ... D7x.  Built from a dict (``efficientdet.yaml`` with ``scale``), which it keeps in
    ``yaml`` so that a checkpoint rebuilds it."""

    task = "detect"

    def __init__(self, yaml: dict, in_channels: int = 3):
        super().__init__()
        import timm

        self.yaml = yaml
        c = {**efficientdet_config(yaml.get("scale") or "d0"), **(yaml.get("config") or {})}
        self.cfg = c
        self.nc = int(yaml.get("nc", 90))
        self.backbone = timm.create_model(c["backbone"], features_only=True, out_indices=(2, 3, 4),
                                          pretrained=False, in_chans=in_channels,
                                          drop_path_rate=float(c["drop_path_rate"]))
        levels = c["max_level"] - c["min_level"] + 1
        self.fpn = BiFpn(self.backbone.feature_info.channels(), c["fpn_channels"], c["fpn_repeats"], c["min_level"],
                         c["max_level"], c["fpn_weight"])
        na = NUM_SCALES * len(ASPECT_RATIOS)
        self.class_net = HeadNet(c["fpn_channels"], c["head_repeats"], levels, self.nc, na)
        self.box_net = HeadNet(c["fpn_channels"], c["head_repeats"], levels, 4, na)
        self.stride = torch.tensor([2.0 ** lvl for lvl in range(c["min_level"], c["max_level"] + 1)])
        momentum = float(yaml.get("bn_momentum", DEFAULT_BN_MOMENTUM))
        for m in self.modules():  # the running statistics' update rate; not in the weights or eval outputs
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """TF EfficientDet's initialisation: Glorot-uniform BiFPN convs, variance-scaling (fan-in) head convs,
        zero biases except the class prior ``-log((1 - 0.01) / 0.01)`` on the class logits; BN 1 / 0."""
        for name, m in self.named_modules():
            if name.startswith("backbone"):
                continue
            head = name.startswith(("class_net", "box_net"))
            if isinstance(m, nn.Conv2d):
                if head:
                    _variance_scaling_(m.weight)
                else:
                    _glorot_uniform_(m.weight, m.groups)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.class_net.predict.conv_pw.bias, -math.log((1 - CLASS_PRIOR) / CLASS_PRIOR))

    def anchor_config(self) -> dict:
        """What anchors are made from: levels, scales per octave, aspect ratios, anchor scale."""
        return {"min_level": self.cfg["min_level"], "max_level": self.cfg["max_level"], "num_scales": NUM_SCALES,
                "aspect_ratios": ASPECT_RATIOS, "anchor_scale": self.cfg["anchor_scale"]}

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats = self.fpn(self.backbone((x - self.mean) / self.std))
        return self.class_net(feats), self.box_net(feats)


def efficientnet(yaml: dict, in_channels: int = 3) -> nn.Module:
    """EfficientNet-B0 ... B7 classifier (timm's ``tf_efficientnet_bN``: TF padding and BN eps, so that its
    backbone weights carry over to EfficientDet), or any timm model for ``arch: timm`` (``timm_name``).
    The module is timm's own, so its state_dict keys are timm's."""
    import timm

    if yaml.get("arch") == "timm":
        name, kw = yaml["timm_name"], {}
    else:
        name, kw = f"tf_efficientnet_{yaml.get('scale') or 'b0'}", {"drop_path_rate": 0.2}
    if yaml.get("dropout") is not None:
        kw["drop_rate"] = float(yaml["dropout"])
    try:
        model = timm.create_model(name, pretrained=False, num_classes=int(yaml.get("nc", 1000)),
                                  in_chans=in_channels, **kw)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        import difflib

        from vistrain.nn.parser import ModelYAMLError

        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        raise ModelYAMLError(f"{e}{f'; did you mean timm:{close[0]}?' if close else ''}") from None
    model.yaml = yaml
    model.task = "classify"
    return model
