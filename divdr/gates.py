"""Gate families: per cell, a weight in [0, 1] for each of its paths.

A gate maps the cell input [B, C, H, W] to weights [B, n_paths] in the cell's own path order
(the allowed slots of [up, keep, down]). ``build_gate`` is the one place that picks the family:

- ``soft``: DR's soft conditional gate, max(0, tanh), each path on its own;
- ``gumbel``: DRNets' RouterNet, whose importance weights over the cell's branches are
  recalibrated with Gumbel-Softmax at temperature tau in training, and at inference keep the
  top-k branches above a threshold (the others exactly 0, so the cell skips them). With
  ``skip_branch`` the router has one more output, "skip the cell", returned as the last column.

The temperature is a buffer of each Gumbel gate (checkpoints keep it, inference depends on it);
the training loop sets it with ``set_temperature`` or ``anneal_temperature``, never via forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from divdr.config import GateConfig, TemperatureConfig
from divdr.ops import conv_bn, kaiming_init

SMALL_GATE_FACTOR = 4  # "small gate": the gate sees the input bilinearly down-sampled by 4

# RouterNet (DRNets Sec. 3.2): 2 separable blocks, each a point-wise conv then a depth-wise 5x5
# conv of stride 2 ("large stride and kernel size incurs minimal overhead"), global average pool,
# an affine map to the branch weights. The width is C/2, as the soft gate's reduction (the paper
# does not give one).
ROUTER_BLOCKS = 2
ROUTER_KERNEL = 5
ROUTER_STRIDE = 2
ROUTER_WIDTH_DIVISOR = 2


def soft_gate_activation(logits: torch.Tensor) -> torch.Tensor:
    """DR eq. 4: delta(x) = max(0, tanh(x)); exact zeros let inference skip paths."""
    return torch.relu(torch.tanh(logits))


# GateConfig.input_norm: the variance floor of the per-image normalisation (a constant map stays 0).
INPUT_NORM_EPS = 1e-5


def gate_input(x: torch.Tensor, small_gate: bool, input_norm: bool = False) -> torch.Tensor:
    """What the gate looks at: the cell input, bilinearly down-sampled by 4 for the small gate, and
    with ``input_norm`` normalised per image and channel (GateConfig.input_norm)."""
    if small_gate:
        size = (max(1, x.shape[-2] // SMALL_GATE_FACTOR), max(1, x.shape[-1] // SMALL_GATE_FACTOR))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if input_norm:
        x = F.instance_norm(x, eps=INPUT_NORM_EPS)
    return x


class SoftGate(nn.Module):
    """DR's soft conditional gate: 1x1 conv (C -> C/2) + BN + ReLU, global average pool,
    1x1 conv (C/2 -> n_paths, bias initialised to ``bias_init``), then max(0, tanh)."""

    def __init__(self, channels: int, n_paths: int, small_gate: bool, bias_init: float,
                 input_norm: bool = False) -> None:
        super().__init__()
        self.small_gate = small_gate
        self.input_norm = input_norm
        self.reduce = conv_bn(channels, channels // 2, 1)
        self.project = nn.Conv2d(channels // 2, n_paths, 1, bias=True)
        kaiming_init(self, bias=bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.reduce(gate_input(x, self.small_gate, self.input_norm)).mean(dim=(2, 3), keepdim=True)
        return soft_gate_activation(self.project(pooled).flatten(1))


class OpenGate(nn.Module):
    """No gate ("Network-Fix"): every path open with weight 1, nothing learned, no cost."""

    def __init__(self, n_paths: int) -> None:
        super().__init__()
        self.n_paths = n_paths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_ones(x.shape[0], self.n_paths)


class RouterNet(nn.Module):
    """DRNets' hypernetwork for one cell: [B, C, H, W] -> unnormalised importance weights [B, n_out].

    Blocks of (1x1 conv + BN + ReLU, depth-wise 5x5 conv stride 2 + BN + ReLU), global average
    pool, linear layer (bias 0: softmax is shift-invariant, every branch starts equally likely).
    """

    def __init__(self, channels: int, n_out: int) -> None:
        super().__init__()
        width = max(1, channels // ROUTER_WIDTH_DIVISOR)
        blocks: list[nn.Module] = []
        c_in = channels
        for _ in range(ROUTER_BLOCKS):
            blocks += [conv_bn(c_in, width, 1),
                       conv_bn(width, width, ROUTER_KERNEL, stride=ROUTER_STRIDE, groups=width)]
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.affine = nn.Linear(width, n_out)
        kaiming_init(self)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(self.blocks(x).mean(dim=(2, 3)))


def gumbel_softmax(logits: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """DRNets eq. 4: softmax((w + g) / tau) with g ~ Gumbel(0, 1) = -log(-log(u)), u ~ U(0, 1).

    u is clamped inside (0, 1) so that g stays finite in the working precision.
    """
    info = torch.finfo(logits.dtype)
    u = torch.rand_like(logits).clamp_(min=info.tiny, max=1.0 - info.eps)
    return torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)


def select_branches(weights: torch.Tensor, threshold: float, max_branches: int = 0) -> torch.Tensor:
    """DRNets' inference rule, per row of ``weights`` [..., n] (non-negative, summing to 1):

    keep the top-k branches, k the smallest whose weights add up to ``threshold`` (at most
    ``max_branches`` if > 0), rescale them by 1 / their sum, and set the others to exactly 0.
    The largest branch is always kept, so every row keeps at least one.
    """
    ranked, order = weights.sort(dim=-1, descending=True)
    mass_before = ranked.cumsum(dim=-1) - ranked  # weight of the branches ranked above each one
    keep_ranked = mass_before < threshold
    keep_ranked[..., 0] = True  # exact even if rounding put mass_before[0] above 0
    if max_branches > 0:
        keep_ranked[..., max_branches:] = False
    keep = torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    return kept / kept.sum(dim=-1, keepdim=True)


class GumbelGate(nn.Module):
    """DRNets' gate on a DR cell: RouterNet importance weights over the cell's branches.

    Training: Gumbel-Softmax recalibration at temperature ``tau`` (dense weights, every branch
    trained, gradients reach the router through the reparameterisation). Inference: no noise,
    softmax(w / tau), then ``select_branches`` (exact zeros for the branches not selected).
    """

    def __init__(self, channels: int, n_branches: int, config: GateConfig) -> None:
        super().__init__()
        self.small_gate = config.small_gate
        self.input_norm = config.input_norm
        self.threshold = config.threshold
        self.max_branches = config.max_branches
        self.router = RouterNet(channels, n_branches)
        # a persistent buffer: checkpoints carry the temperature the selection was trained at
        self.register_buffer("tau", torch.tensor(float(config.temperature.pretrain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(gate_input(x, self.small_gate, self.input_norm))
        if self.training:
            return gumbel_softmax(logits, self.tau)
        return select_branches(torch.softmax(logits / self.tau, dim=-1), self.threshold, self.max_branches)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every gate in ``model`` (soft or Gumbel; a DDP wrapper works too), e.g. for
    an optimizer parameter group of their own."""
    return [p for m in model.modules() if isinstance(m, (SoftGate, GumbelGate)) for p in m.parameters()]


def has_skip_branch(config: GateConfig) -> bool:
    """Whether the gate returns a last column for DRNets' fast-forward branch ("skip the cell")."""
    return config.enabled and config.kind == "gumbel" and config.skip_branch


def build_gate(config: GateConfig, channels: int, n_paths: int) -> nn.Module:
    if not config.enabled:
        return OpenGate(n_paths)
    if config.kind == "soft":
        return SoftGate(channels, n_paths, config.small_gate, config.bias_init, config.input_norm)
    if config.kind == "gumbel":
        return GumbelGate(channels, n_paths + int(has_skip_branch(config)), config)
    raise NotImplementedError(f"gate kind {config.kind!r}")


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


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set tau of every Gumbel gate in ``model`` (a DDP wrapper works too); returns how many
    gates were set, 0 for a soft-gate model (then this is a no-op)."""
    if not tau > 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    gates = [m for m in model.modules() if isinstance(m, GumbelGate)]
    for gate in gates:
        gate.tau.fill_(tau)
    return len(gates)


def anneal_temperature(model: nn.Module, progress: float, config: TemperatureConfig) -> float:
    """One call per training step: set tau from the schedule; returns it (for logging)."""
    tau = temperature_schedule(progress, config)
    set_temperature(model, tau)
    return tau
