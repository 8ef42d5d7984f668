"""DRNets' gate family (``gate.kind: gumbel``): RouterNet importance weights over a cell's branches.

In training the weights are recalibrated with Gumbel-Softmax at temperature tau (annealed by the loop,
``divdr.gates.anneal_temperature``); at inference the top-k branches above a threshold are kept (the
others exactly 0, so the cell skips them). With ``skip_branch`` the router has one more output, "skip
the cell", returned as the last column. The family registers itself with ``divdr.gates``.
"""

from __future__ import annotations

import torch
from torch import nn

from divdr.config import GateConfig
from divdr.costs import Convention, conv_bn_relu
from divdr.gates import SMALL_GATE_FACTOR, Gate, GateFamily, gate_input, register_gate_family
from divdr.ops import conv_bn, kaiming_init

# RouterNet (DRNets Sec. 3.2): 2 separable blocks, each a point-wise conv then a depth-wise 5x5
# conv of stride 2 ("large stride and kernel size incurs minimal overhead"), global average pool,
# an affine map to the branch weights. The width is C/2, as the soft gate's reduction (the paper
# does not give one).
ROUTER_BLOCKS = 2
ROUTER_KERNEL = 5
ROUTER_STRIDE = 2
ROUTER_WIDTH_DIVISOR = 2


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


class GumbelGate(Gate):
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


def router_cost(h: int, w: int, c: int, n_out: int, small_gate: bool, cv: Convention) -> int:
    """DRNets' RouterNet: per block a 1x1 conv + BN + ReLU and a depth-wise 5x5 stride-2 conv + BN +
    ReLU, then global average pooling and the affine map to ``n_out`` branch weights.

    The depth-wise conv is padded (k // 2), so its output is ceil(size / 2): counted exactly, as
    the router runs on maps as small as 1x1.
    """
    if small_gate:
        h, w = max(1, h // SMALL_GATE_FACTOR), max(1, w // SMALL_GATE_FACTOR)
    width = max(1, c // ROUTER_WIDTH_DIVISOR)
    total, c_in = 0, c
    for _ in range(ROUTER_BLOCKS):
        total += conv_bn_relu(h, w, c_in, width, 1, cv)
        h, w = -(-h // ROUTER_STRIDE), -(-w // ROUTER_STRIDE)
        total += ROUTER_KERNEL**2 * width * h * w + (cv.bn + cv.relu) * width * h * w
        c_in = width
    return total + cv.pool * h * w * width + width * n_out


def _skip_branch(config: GateConfig) -> bool:
    return config.skip_branch


# The Gumbel weights are a distribution over the branches: a cell runs with the paths' total weight
# (1, or 1 - the skip weight; without a skip branch the cell always runs).
register_gate_family("gumbel", GateFamily(
    build=lambda config, channels, n_paths: GumbelGate(channels, n_paths + int(_skip_branch(config)), config),
    cost=lambda h, w, channels, n_paths, config, cv: router_cost(h, w, channels, n_paths + int(_skip_branch(config)),
                                                                 config.small_gate, cv),
    cell_usage="sum", skip_branch=_skip_branch))
