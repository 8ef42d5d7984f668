"""FLOPs of a DR network for any input size, per image, from its gate weights.

Counting convention of the official ``cal_op_flops.py``: one multiply-add = 1 FLOP, BN counted
as 2 ops per element (affine), ReLU and average pooling as 1 per element; bilinear
interpolation and element-wise sums are not counted. The cost table is computed for the size
asked (padded to a multiple of 32, as the network pads), never fixed at construction.

Per image:
- expected cost (differentiable, DR Sec. 3.3): cell cost x P(cell runs) + sum over paths of
  weight x path cost, plus the fixed stem, gate and decoder costs. P(cell runs) is max(cell
  weights) for DR's soft gate (official) and the sum of the path weights for DRNets' Gumbel gate
  (its weights are a distribution over the branches: 1, or 1 - the skip weight);
- real cost (what inference executes): cells whose weights sum above the threshold, paths whose
  weight is above it, plus stem, gates and decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from divdr.cells import cell_active, path_active
from divdr.config import NUM_SCALES, ModelConfig
from divdr.costs import CONVS_ONLY, OFFICIAL, Convention, conv, conv_bn_relu, strided  # noqa: F401 - re-exported
from divdr.gates import gate_family
from divdr.heads import padded_size
from divdr.routing import DOWN, UP, CellSpec, route_paths, routing_space

STEM_STRIDE = 4


def stem_cost(h: int, w: int, c: int, cv: Convention) -> int:
    h2, w2, h4, w4 = h // 2, w // 2, h // 4, w // 4
    return (conv_bn_relu(h, w, 3, c, 3, cv, stride=2) + conv(h2, w2, c, c, 3, groups=c)
            + conv_bn_relu(h2, w2, c, c, 1, cv) + conv(h2, w2, c, c, 3, stride=2, groups=c)
            + conv_bn_relu(h4, w4, c, c, 1, cv))


def sepconv3x3x2_cost(h: int, w: int, c: int, cv: Convention) -> int:
    return (conv(h, w, c, c, 3, groups=c) + conv_bn_relu(h, w, c, c, 1, cv)
            + conv(h, w, c, c, 3, groups=c) + conv(h, w, c, c, 1) + cv.bn * h * w * c)


def path_costs(h: int, w: int, spec: CellSpec, cv: Convention) -> list[int]:
    c = spec.channels
    relu = cv.relu * h * w * c
    costs = [0, relu, 0]
    if spec.allow_up:
        costs[UP] = relu + conv_bn_relu(h, w, c, c // 2, 1, cv)
    if spec.allow_down:
        costs[DOWN] = relu + conv_bn_relu(h, w, c, 2 * c, 1, cv, stride=2)
    return costs


def gate_cost(h: int, w: int, spec: CellSpec, config: ModelConfig, cv: Convention) -> int:
    """The cost of one cell's gate, whatever its family (0 without gates)."""
    if not config.gate.enabled:
        return 0
    return gate_family(config.gate.kind).cost(h, w, spec.channels, sum(spec.paths), config.gate, cv)


def decoder_cost(h4: int, w4: int, c: int, num_classes: int, cv: Convention, num_scales: int = NUM_SCALES) -> int:
    total = 0
    for s in range(num_scales):
        cs = c * 2**s
        total += conv_bn_relu(strided(h4, 2**s), strided(w4, 2**s), cs, cs if s == 0 else cs // 2, 1, cv)
    return total + conv(h4, w4, c, num_classes, 3)


@dataclass(frozen=True)
class CostTable:
    """FLOPs of every part of the network at one input size (height x width after padding)."""

    height: int
    width: int
    stem: float
    decoder: float
    cell: torch.Tensor  # [n_cells] cost of each cell operation
    paths: torch.Tensor  # [n_cells, 3] cost of each transform, 0 for slots a cell lacks
    gate: torch.Tensor  # [n_cells] cost of each gate (0 without gates)
    # How the expected cost weighs a cell operation: by the largest path weight (DR's soft gate,
    # official) or by the paths' total weight (Gumbel gates: 1 - the skip weight, or 1 without
    # a skip branch: the cell always runs, so its cost is never discounted).
    cell_usage: Literal["max", "sum"] = "max"
    # C_max as a Python number, fixed at construction: reading it from the tensors in the training step
    # would synchronise with the device (and break a compiled graph) at every step.
    # (``to`` hands it over: summing a moved table would read from the device).
    _routing_all_open: float | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._routing_all_open is None:
            object.__setattr__(self, "_routing_all_open", float(self.cell.sum() + self.paths.sum()))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> CostTable:
        """The same table with its tensors on ``device`` in ``dtype``: move it once, before training, so
        the step does not copy it from the host at every call (``routing_expected_cost`` then finds it
        where the gates are)."""
        return replace(self, cell=self.cell.to(device, dtype), paths=self.paths.to(device, dtype),
                       gate=self.gate.to(device, dtype), _routing_all_open=self._routing_all_open)

    @property
    def routing_all_open(self) -> float:
        """C_max of DR eq. 9: every cell and path computed."""
        return self._routing_all_open

    @property
    def all_open(self) -> float:
        """The paper's "Network-Fix" figure: everything open, no gate cost."""
        return self.stem + self.decoder + self.routing_all_open

    @property
    def backbone_all_open(self) -> float:
        """Stem and routing space with everything open, no decoder and no gates: the backbone
        figure of DivDR Tables 4-5 (detection heads are not counted there)."""
        return self.stem + self.routing_all_open

    @property
    def fixed(self) -> float:
        """What every image pays whatever its route: stem, decoder, and every gate."""
        return self.stem + self.decoder + float(self.gate.sum())


def cost_table(config: ModelConfig, height: int, width: int, convention: Convention = OFFICIAL,
               with_decoder: bool = True) -> CostTable:
    """The cost table for an input of ``height`` x ``width`` pixels.

    ``with_decoder=False`` for the backbone under other heads (detection: FPN and R-CNN heads are
    not counted, as DivDR Tables 4-5 count backbone FLOPs); the decoder cost is then 0."""
    cv = convention
    if height < 1 or width < 1:
        raise ValueError(f"input size must be positive, got {height}x{width}")
    h, w = padded_size(height), padded_size(width)
    h4, w4 = h // STEM_STRIDE, w // STEM_STRIDE
    cells, paths, gates = [], [], []
    for spec, open_paths in zip(routing_space(config), route_paths(config), strict=True):
        hs, ws = strided(h4, 2**spec.scale), strided(w4, 2**spec.scale)
        cells.append(sepconv3x3x2_cost(hs, ws, spec.channels, cv))
        paths.append(path_costs(hs, ws, spec, cv))
        # a cell a fixed route closes runs no gate (divdr.cells.Cell)
        gates.append(gate_cost(hs, ws, spec, config, cv) if any(open_paths) else 0)
    return CostTable(
        height=h, width=w,
        stem=float(stem_cost(h, w, config.channels, cv)),
        decoder=float(decoder_cost(h4, w4, config.channels, config.num_classes, cv, config.num_scales))
        if with_decoder else 0.0,
        cell=torch.tensor(cells, dtype=torch.float64),
        paths=torch.tensor(paths, dtype=torch.float64),
        gate=torch.tensor(gates, dtype=torch.float64),
        cell_usage=gate_family(config.gate.kind).cell_usage if config.gate.enabled else "max",
    )


def _cost_dtype(gates: torch.Tensor) -> torch.dtype:
    return torch.promote_types(gates.dtype, torch.float32)


def routing_expected_cost(gates: torch.Tensor, table: CostTable) -> torch.Tensor:
    """Differentiable routing cost per image, [B]: sum of cell x P(cell runs) + sum of w x path,
    with P(cell runs) = max(w) (soft gates) or sum(w) (Gumbel gates), see ``CostTable.cell_usage``.

    At least float32 (gates in bf16 / fp16 under autocast are cast up: costs of ~1e9 FLOPs need the
    precision). A table already on the gates' device in that dtype (``CostTable.to``) is used as it is."""
    gates = gates.to(_cost_dtype(gates))
    cell = table.cell.to(gates)
    paths = table.paths.to(gates)
    usage = gates.sum(dim=-1) if table.cell_usage == "sum" else gates.amax(dim=-1)
    return (usage * cell).sum(-1) + (gates * paths).sum(dim=(-2, -1))


def table_for(tables: dict[tuple, CostTable], table: CostTable, gates: torch.Tensor) -> CostTable:
    """``table`` on the device of ``gates`` in the dtype ``routing_expected_cost`` uses, moved once and
    kept in ``tables`` (a training loop's own dict), so no step copies it from the host."""
    dtype = _cost_dtype(gates)
    key = (table.height, table.width, gates.device, dtype)
    if key not in tables:
        tables[key] = table.to(gates.device, dtype)
    return tables[key]


def expected_cost(gates: torch.Tensor, table: CostTable) -> torch.Tensor:
    """Expected FLOPs per image, [B]: routing cost plus the fixed stem, gate and decoder costs."""
    return routing_expected_cost(gates, table) + table.fixed


def budget_ratio(gates: torch.Tensor, table: CostTable) -> torch.Tensor:
    """C(Space) / C_max of DR eq. 9, per image: the routing cost relative to everything open."""
    return routing_expected_cost(gates, table) / table.routing_all_open


def real_cost(gates: torch.Tensor, table: CostTable) -> torch.Tensor:
    """FLOPs inference executes per image, [B] (no gradient): open cells and open paths only."""
    gates = gates.detach()
    cell_on = cell_active(gates).to(torch.float64)
    path_on = path_active(gates).to(torch.float64)
    routing = (cell_on * table.cell).sum(-1) + (path_on * table.paths).sum(dim=(-2, -1))
    return routing + table.fixed
