"""The t-SimCNE network: a small-kernel ResNet-18 backbone and an MLP projection head.

Layout (reference doc §1): 3x3 stride-1 stem without max-pool, four stages of two BasicBlocks with
widths w, 2w, 4w, 8w (w = 64 for the reference) and first strides 1, 2, 2, 2, global average pooling
to h in R^{8w}; head Linear(8w -> 1024) -> ReLU -> Linear(1024 -> out). `width` < 64 gives the
CPU-sized backbones; `stem_stride=2` (CPU recipes only) runs every stage at half the resolution, which
costs a quarter of the compute: on CPUs without bf16 units that buys four times the epochs.

`forward` returns (z, h) like the reference. Stage 2 swaps the last head layer for a fresh
Linear(1024 -> 2) drawn from N(0, 1) and freezes the rest (`to_map_output`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from training.config import TrainConfig

HEAD_HIDDEN = 1024


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus identity or 1x1-conv shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallKernelResNet18(nn.Module):
    """CIFAR-style ResNet-18; output is the pooled feature vector of size 8 * width."""

    def __init__(self, width: int = 64, in_channels: int = 3, stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        layers = []
        channels = width
        for multiplier, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            out_channels = width * multiplier
            layers.append(
                nn.Sequential(BasicBlock(channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1))
            )
            channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layers(self.stem(x))), 1)


class TSimCNENet(nn.Module):
    """Backbone + MLP head; forward(x) -> (z, h)."""

    def __init__(self, width: int = 64, out_dim: int = 128, stem_stride: int = 1) -> None:
        super().__init__()
        self.backbone = SmallKernelResNet18(width, stem_stride=stem_stride)
        self.head = nn.Sequential(
            nn.Linear(self.backbone.feature_dim, HEAD_HIDDEN), nn.ReLU(), nn.Linear(HEAD_HIDDEN, out_dim)
        )
        self.frozen_trunk = False

    @property
    def out_dim(self) -> int:
        return self.head[-1].out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen_trunk and self.training:
            # Stage 2: nothing before the last layer trains, so skip building its autograd graph
            # (BatchNorm still updates its running statistics in train mode, as in the reference).
            with torch.no_grad():
                h = self.backbone(x)
                hidden = self.head[1](self.head[0](h))
            return self.head[2](hidden), h
        h = self.backbone(x)
        return self.head(h), h

    def to_map_output(self, out_dim: int = 2, generator: torch.Generator | None = None) -> None:
        """Stage 1 -> 2: new last layer Linear(1024 -> out_dim) with weights ~ N(0, 1), all else frozen.

        The bias keeps PyTorch's default U(-1/sqrt(1024), 1/sqrt(1024)) as in the reference. The layer is
        drawn on the CPU (where `generator` lives) and then moved, so a seed gives the same layer on any device.
        """
        old = self.head[-1]
        new = nn.Linear(HEAD_HIDDEN, out_dim)
        with torch.no_grad():
            new.weight.normal_(0.0, 1.0, generator=generator)
            bound = HEAD_HIDDEN**-0.5
            new.bias.uniform_(-bound, bound, generator=generator)
        self.head[-1] = new.to(device=old.weight.device, dtype=old.weight.dtype)
        self.set_trainable(last_layer_only=True)

    def set_trainable(self, last_layer_only: bool) -> None:
        """Stage 2 trains only the last head layer; stages 1 and 3 train everything."""
        for parameter in self.parameters():
            parameter.requires_grad_(not last_layer_only)
        for parameter in self.head[-1].parameters():
            parameter.requires_grad_(True)
        self.frozen_trunk = last_layer_only


def build_model(config: TrainConfig) -> TSimCNENet:
    """The stage-1 network a TrainConfig describes (width, 128-D output, stem stride)."""
    return TSimCNENet(config.width, config.pretrain_dim, stem_stride=config.stem_stride)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
