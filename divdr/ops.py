"""Small building blocks of the DR network, as in the official code (op_with_flops.py, dynamic_cell.py)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from divdr import fused


def conv_bn(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            relu: bool = True, bn: bool = True) -> nn.Sequential:
    """Conv (no bias) + optional BN + optional ReLU, the official ``Conv2d(norm=, activation=)``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    ]
    if bn:
        layers.append(nn.BatchNorm2d(out_ch))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


NormKind = Literal["batch", "group"]
GROUP_NORM_MAX_GROUPS = 8  # GroupNorm: at most 8 groups, at least 2 channels per group


def group_norm_for(bn: nn.BatchNorm2d) -> nn.GroupNorm:
    channels = bn.num_features
    groups = math.gcd(channels, max(1, min(GROUP_NORM_MAX_GROUPS, channels // 2)))
    return nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)


def convert_norm(module: nn.Module, kind: NormKind) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place, also returned) by the normalisation ``kind``,
    as torch's ``SyncBatchNorm.convert_sync_batchnorm`` does for SyncBN. ``batch`` keeps BN.

    Why ``group``: with BN the gates' output A(x) in training depends on the other images of the
    batch and differs from the eval-mode A(x) that K-means clusters; with GroupNorm every image's
    A(x) is its own, the same in training and evaluation.
    """
    if kind == "batch":
        return module
    if kind != "group":
        raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, group_norm_for(child))
        else:
            convert_norm(child, kind)
    return module


def _drop_counter_on_load(state_dict: dict, prefix: str, *args: object) -> None:
    state_dict.pop(prefix + "num_batches_tracked", None)  # written by checkpoints of before the counter went


def drop_batch_counters(module: nn.Module) -> nn.Module:
    """Remove every BatchNorm's ``num_batches_tracked`` counter (in place, also returned).

    The counter is only read when ``momentum`` is None (a cumulative average); with the momentum kept
    (0.1) it is dead weight, yet it costs one kernel per BatchNorm per training step (280 of them in
    Layer16). Checkpoints that hold it still load: the key is dropped on load.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and m.track_running_stats:
            m.num_batches_tracked = None
            m._register_load_state_dict_pre_hook(_drop_counter_on_load)
    return module


def kaiming_init(module: nn.Module, bias: float = 0.0) -> None:
    """Official ``kaiming_init_module(mode='fan_in')``: He-normal conv weights, constant biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, bias)


class SepConv3x3x2(nn.Module):
    """Two stacked separable 3x3 convolutions ("SepConv3x3x2", best in DR Table 2).

    dw3x3 -> pw1x1+BN+ReLU -> dw3x3 -> pw1x1+BN, as the official SepConv.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            conv_bn(channels, channels, 3, groups=channels, relu=False, bn=False),
            conv_bn(channels, channels, 1),
            conv_bn(channels, channels, 3, groups=channels, relu=False, bn=False),
            conv_bn(channels, channels, 1, relu=False),
        )
        kaiming_init(self.op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def bilinear(x: torch.Tensor, size: tuple[int, int] | None = None, scale_factor: float | None = None) -> torch.Tensor:
    """Bilinear resize (align_corners=False) in ``x``'s own dtype. CUDA autocast runs upsampling in
    float32: its float32 output then promoted every sum and product after it (the cell's paths, the
    next cell's residual) to float32, so a bf16 step moved twice the bytes and cast each tensor back
    (measured on an H100: after the convolutions' backward, float32 adds, multiplies and casts took the most
    device time). A
    bilinear blend of bf16 values is as exact as bf16 itself, so autocast is switched off around it.
    With ``divdr.fused.set_fused_kernels`` a CUDA tensor is resized by a Triton kernel (the same values)."""
    with torch.autocast(x.device.type, enabled=False):
        resized = fused.resize(x, size, scale_factor)
        if resized is not None:
            return resized
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=False)


class UpTransform(nn.Module):
    """Resolution up, width down: ReLU, 1x1 conv to C/2 + BN + ReLU, bilinear x2.

    ``project`` is the part after the ReLU: a cell computes ReLU(h) once for all of its paths."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), conv_bn(channels, channels // 2, 1))
        kaiming_init(self.conv)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.project(self.conv[0](x), weight)

    def project(self, activated: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` ([B, 1, 1, 1], optional): the path's per-image weight, applied before the resize rather than
        after it (the same, as the resize is linear): on a quarter of the pixels, and a per-image product is a
        slow broadcasting kernel on a GPU (2.5x an add of the same size, measured on an H200)."""
        projected = self.conv[1](activated)
        return bilinear(projected if weight is None else fused.scaled_sum(projected, weight), scale_factor=2)


class DownTransform(nn.Module):
    """Resolution down, width up: ReLU, 1x1 conv stride 2 to 2C + BN + ReLU (``project``: after the ReLU)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), conv_bn(channels, 2 * channels, 1, stride=2))
        kaiming_init(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.conv[0](x))

    def project(self, activated: torch.Tensor) -> torch.Tensor:
        return self.conv[1](activated)


class Stem(nn.Module):
    """Down-sample by 4: conv3x3/2 (3->C) + BN + ReLU; sep (dw3x3 + pw + BN + ReLU); sep with dw stride 2."""

    def __init__(self, out_channels: int, in_channels: int = 3) -> None:
        super().__init__()
        c = out_channels
        self.layers = nn.Sequential(
            conv_bn(in_channels, c, 3, stride=2),
            conv_bn(c, c, 3, groups=c, relu=False, bn=False),
            conv_bn(c, c, 1),
            conv_bn(c, c, 3, stride=2, groups=c, relu=False, bn=False),
            conv_bn(c, c, 1),
        )
        kaiming_init(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
