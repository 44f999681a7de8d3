"""ResNet v1.5 (He et al. 2015, stride on the 3x3 conv), with torchvision's attribute names.

Built from a YAML such as ``resnet50.yaml`` (``arch: resnet``, ``block``, ``layers``), so that
``state_dict()`` keys and shapes equal ``torchvision.models.resnet50()``'s and its weights load
with ``strict=True``.

The tutorial's vocabulary: a *convolution block* is a residual block whose shortcut is a strided
1x1 projection (``downsample``); an *identity block* is one whose shortcut is the identity.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_block_shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: v1.5), 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet classifier. ``forward(x (Tensor[B, 3, H, W])) -> logits (Tensor[B, num_classes])``."""

    task = "classify"

    def __init__(self, yaml: dict, in_channels: int = 3):
        super().__init__()
        self.yaml = yaml
        block_name = yaml.get("block", "Bottleneck")
        if block_name not in BLOCKS:
            raise ValueError(f"resnet block {block_name!r} unknown; use one of {list(BLOCKS)}")
        block = BLOCKS[block_name]
        layers = yaml["layers"]
        num_classes = int(yaml.get("nc", 1000))
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for stage, (n_blocks, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            stride = 1 if stage == 1 else 2
            blocks = []
            for j in range(n_blocks):
                s = stride if j == 0 else 1
                shortcut = None
                if j == 0 and (s != 1 or c_in != width * block.expansion):
                    shortcut = _conv_block_shortcut(c_in, width * block.expansion, s)  # convolution block
                blocks.append(block(c_in, width, s, shortcut))  # identity blocks for j > 0
                c_in = width * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(float(yaml.get("dropout", 0.0)))
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
