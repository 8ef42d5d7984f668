"""Gate families: per cell, a weight in [0, 1] for each of its paths.

A gate maps the cell input [B, C, H, W] to weights [B, n_paths] in the cell's own path order
(the allowed slots of [up, keep, down]). A family is a ``GateFamily`` registered under the name
``GateConfig.kind`` selects: how to build its gate, what the gate costs, how a cell's use is read from
its weights (``cell_usage``), whether the gate returns an extra "skip the cell" column. Everything else
(cells, FLOPs, the training loop) asks the registry, so a new family is one module that registers itself:

- ``soft`` (here): DR's soft conditional gate, max(0, tanh), each path on its own;
- ``gumbel`` (``divdr.gumbel``): DRNets' RouterNet, Gumbel-Softmax over the cell's branches.

A gate with a temperature keeps it as a ``tau`` buffer (checkpoints keep it, inference depends on it);
the training loop sets it with ``set_temperature`` or ``anneal_temperature``, never via forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from divdr.config import ConfigError, GateConfig, TemperatureConfig
from divdr.costs import Convention, conv, conv_bn_relu
from divdr.ops import bilinear, conv_bn, kaiming_init

SMALL_GATE_FACTOR = 4  # "small gate": the gate sees the input bilinearly down-sampled by 4



def soft_gate_activation(logits: torch.Tensor, closed_gradient: float = 0.0) -> torch.Tensor:
    """DR eq. 4: delta(x) = max(0, tanh(x)); exact zeros let inference skip paths. With
    ``closed_gradient`` c > 0 (GateConfig.closed_gradient) the forward is the same and a closed gate
    gets c * tanh'(x) of the gradient instead of none, so the losses can reopen it."""
    # threshold(., 0, 0) is ReLU; it keeps its input for the backward where relu keeps its output,
    # which costs two more kernels (a detach each way) per gate
    gate = torch.tanh(logits)
    weights = F.threshold(gate, 0.0, 0.0)
    if closed_gradient > 0:
        # exactly 0 in the forward (x - x), c * d tanh / dx in the backward where the gate is closed
        weights = weights + closed_gradient * (gate - gate.detach()) * (gate < 0)
    return weights


# GateConfig.input_norm: the variance floor of the per-image normalisation (a constant map stays 0).
INPUT_NORM_EPS = 1e-5


def gate_input(x: torch.Tensor, small_gate: bool, input_norm: bool = False) -> torch.Tensor:
    """What the gate looks at: the cell input, bilinearly down-sampled by 4 for the small gate, and
    with ``input_norm`` normalised per image and channel (GateConfig.input_norm)."""
    if small_gate:
        # in x's own dtype (divdr.ops.bilinear): CUDA autocast would copy a bf16 cell input whole to float32
        # first, and back in the backward (with the logits' contiguous resize, 91.5 -> 87.1 ms of a Layer16 step on
        # an H200). The gate's convolution runs in bf16 either way, and a bilinear resize rounds once, so the gate
        # sees the same values.
        size = (max(1, x.shape[-2] // SMALL_GATE_FACTOR), max(1, x.shape[-1] // SMALL_GATE_FACTOR))
        x = bilinear(x, size=size)
    if input_norm:
        if x.shape[-2] * x.shape[-1] == 1:
            # a 1x1 map (a coarse cell of a small crop) normalises to exactly 0. aten's kernel returns
            # rounding noise there (1e-14, its sign CPU-dependent), which the gate's GroupNorm and ReLU
            # turned into gradients that flow or not by that sign: a shape test, so no graph break
            return torch.zeros_like(x)
        # aten's instance norm directly: F.instance_norm refuses a 1x1 map
        x = torch.instance_norm(x, None, None, None, None, True, 0.0, INPUT_NORM_EPS, False)
    return x


class Gate(nn.Module):
    """Base class of every gate family's module (what ``gate_parameters`` finds)."""


class SoftGate(Gate):
    """DR's soft conditional gate: 1x1 conv (C -> C/2) + BN + ReLU, global average pool,
    1x1 conv (C/2 -> n_paths, bias initialised to ``bias_init``), then max(0, tanh)."""

    def __init__(self, channels: int, n_paths: int, small_gate: bool, bias_init: float,
                 input_norm: bool = False, closed_gradient: float = 0.0) -> None:
        super().__init__()
        self.small_gate = small_gate
        self.input_norm = input_norm
        self.closed_gradient = closed_gradient
        self.reduce = conv_bn(channels, channels // 2, 1)
        self.project = nn.Conv2d(channels // 2, n_paths, 1, bias=True)
        kaiming_init(self, bias=bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.reduce(gate_input(x, self.small_gate, self.input_norm)).mean(dim=(2, 3), keepdim=True)
        return soft_gate_activation(self.project(pooled).flatten(1), self.closed_gradient)


class OpenGate(nn.Module):
    """No gate ("Network-Fix"): every path open with weight 1, nothing learned, no cost."""

    def __init__(self, n_paths: int) -> None:
        super().__init__()
        self.n_paths = n_paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones(x.shape[0], self.n_paths)


@dataclass(frozen=True)
class GateFamily:
    """What the library needs to know of a gate family.

    ``build(config, channels, n_paths)``: the gate of a cell with ``n_paths`` paths;
    ``cost(h, w, channels, n_paths, config, convention)``: its FLOPs on an h x w input;
    ``cell_usage``: a cell's probability of running, from its weights: their ``max`` (independent
    paths, DR's soft gate) or their ``sum`` (weights that are a distribution over the branches);
    ``skip_branch(config)``: whether the gate returns a last column "skip the cell" (DRNets).
    """

    build: Callable[[GateConfig, int, int], nn.Module]
    cost: Callable[[int, int, int, int, GateConfig, Convention], int]
    cell_usage: Literal["max", "sum"] = "max"
    skip_branch: Callable[[GateConfig], bool] = lambda config: False


GATE_FAMILIES: dict[str, GateFamily] = {}


def register_gate_family(name: str, family: GateFamily) -> None:
    GATE_FAMILIES[name] = family


def gate_family(name: str) -> GateFamily:
    if name not in GATE_FAMILIES:
        raise ConfigError(f"gate.kind must be {' or '.join(map(repr, GATE_FAMILIES))}, got {name!r}")
    return GATE_FAMILIES[name]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every gate in ``model`` (any family; a DDP wrapper works too), e.g. for an
    optimizer parameter group of their own."""
    return [p for m in model.modules() if isinstance(m, Gate) for p in m.parameters()]


def has_skip_branch(config: GateConfig) -> bool:
    """Whether the gate returns a last column for DRNets' fast-forward branch ("skip the cell")."""
    return config.enabled and gate_family(config.kind).skip_branch(config)


def build_gate(config: GateConfig, channels: int, n_paths: int) -> nn.Module:
    if not config.enabled:
        return OpenGate(n_paths)
    return gate_family(config.kind).build(config, channels, n_paths)


def soft_gate_cost(h: int, w: int, channels: int, n_paths: int, config: GateConfig, cv: Convention) -> int:
    """1x1 conv C -> C/2 + BN + ReLU on the (small-gate) input, global pooling, 1x1 conv to the paths."""
    if config.small_gate:
        h, w = max(1, h // SMALL_GATE_FACTOR), max(1, w // SMALL_GATE_FACTOR)
    c = channels
    return conv_bn_relu(h, w, c, c // 2, 1, cv) + cv.pool * h * w * (c // 2) + conv(1, 1, c // 2, n_paths, 1)


register_gate_family("soft", GateFamily(
    build=lambda config, channels, n_paths: SoftGate(channels, n_paths, config.small_gate, config.bias_init,
                                                     config.input_norm, config.closed_gradient),
    cost=soft_gate_cost, cell_usage="max"))


def temperature_schedule(progress: float, config: TemperatureConfig) -> float:
    """tau at ``progress`` = step / total steps (DRNets' two-stage scheme): ``pretrain`` during the
    first ``pretrain_fraction``, then reset to ``start`` and annealed exponentially (a constant
    factor per step, as the paper's exp(-0.0006) per epoch) to reach ``final`` at the end."""
    if progress < config.pretrain_fraction:
        return config.pretrain
    span = 1.0 - config.pretrain_fraction
    if span <= 0:
        return config.final
    t = min(1.0, (progress - config.pretrain_fraction) / span)
    return config.start * (config.final / config.start) ** t


def tempered_gates(model: nn.Module) -> list[nn.Module]:
    """The gates of ``model`` that have a temperature (Gumbel gates; a DDP wrapper works too); none for soft gates."""
    return [m for m in model.modules() if isinstance(m, Gate) and hasattr(m, "tau")]


def set_temperature(model: nn.Module | Sequence[nn.Module], tau: float) -> int:
    """Set tau of every gate of ``model`` that has a temperature, or of the gates given (``tempered_gates``, found
    once: walking Layer16's ~2,000 modules at every step cost milliseconds of host time while a captured step's GPU
    waited); returns how many were set, 0 for a soft-gate model (then this is a no-op)."""
    if not tau > 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    gates = tempered_gates(model) if isinstance(model, nn.Module) else model
    for gate in gates:
        gate.tau.fill_(tau)
    return len(gates)


def anneal_temperature(model: nn.Module | Sequence[nn.Module], progress: float, config: TemperatureConfig) -> float:
    """One call per training step: set tau from the schedule (``model``: as ``set_temperature``); returns it."""
    tau = temperature_schedule(progress, config)
    set_temperature(model, tau)
    return tau


# The built-in families beyond the soft gate register themselves on import.
import divdr.gumbel  # noqa: E402, F401
