"""Gate families: per cell, a weight in [0, 1) for each of its paths.

A gate maps the cell input [B, C, H, W] to weights [B, n_paths] in the cell's own path order
(the allowed slots of [up, keep, down]). ``build_gate`` is the one place that picks the family,
so a second kind (DRNets' Gumbel-Softmax router) plugs in beside the soft gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from divdr.config import GateConfig
from divdr.ops import conv_bn, kaiming_init

SMALL_GATE_FACTOR = 4  # "small gate": the gate sees the input bilinearly down-sampled by 4


def soft_gate_activation(logits: torch.Tensor) -> torch.Tensor:
    """DR eq. 4: delta(x) = max(0, tanh(x)); exact zeros let inference skip paths."""
    return torch.relu(torch.tanh(logits))


def gate_input(x: torch.Tensor, small_gate: bool) -> torch.Tensor:
    """What the gate looks at: the cell input, bilinearly down-sampled by 4 for the small gate."""
    if not small_gate:
        return x
    size = (max(1, x.shape[-2] // SMALL_GATE_FACTOR), max(1, x.shape[-1] // SMALL_GATE_FACTOR))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SoftGate(nn.Module):
    """DR's soft conditional gate: 1x1 conv (C -> C/2) + BN + ReLU, global average pool,
    1x1 conv (C/2 -> n_paths, bias initialised to ``bias_init``), then max(0, tanh)."""

    def __init__(self, channels: int, n_paths: int, small_gate: bool, bias_init: float) -> None:
        super().__init__()
        self.small_gate = small_gate
        self.reduce = conv_bn(channels, channels // 2, 1)
        self.project = nn.Conv2d(channels // 2, n_paths, 1, bias=True)
        kaiming_init(self, bias=bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.reduce(gate_input(x, self.small_gate)).mean(dim=(2, 3), keepdim=True)
        return soft_gate_activation(self.project(pooled).flatten(1))


class OpenGate(nn.Module):
    """No gate ("Network-Fix"): every path open with weight 1, nothing learned, no cost."""

    def __init__(self, n_paths: int) -> None:
        super().__init__()
        self.n_paths = n_paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones(x.shape[0], self.n_paths)


def build_gate(config: GateConfig, channels: int, n_paths: int) -> nn.Module:
    if not config.enabled:
        return OpenGate(n_paths)
    if config.kind == "soft":
        return SoftGate(channels, n_paths, config.small_gate, config.bias_init)
    raise NotImplementedError(f"gate kind {config.kind!r}")
