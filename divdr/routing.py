"""The routing space as data: which cells exist, their scale and width, which paths they have.

This is the single description that the backbone builds its modules from and that the FLOPs
module costs, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from divdr.config import ModelConfig

SLOTS = ("up", "keep", "down")  # fixed layout of the 3 gate slots per cell in A(x)
UP, KEEP, DOWN = range(3)
INIT_LAYER = -1  # the official code's initial cell right after the stem


@dataclass(frozen=True)
class CellSpec:
    layer: int  # INIT_LAYER for the initial cell, else 0 .. L-1
    scale: int  # 0 .. 3 for 1/4 .. 1/32 (4 for Layer17's 1/64)
    channels: int  # C * 2^scale
    allow_up: bool
    allow_down: bool

    @property
    def paths(self) -> tuple[bool, bool, bool]:
        """Which of the slots [up, keep, down] this cell has."""
        return (self.allow_up, True, self.allow_down)

    @property
    def name(self) -> str:
        layer = "init" if self.layer == INIT_LAYER else f"layer{self.layer}"
        return f"{layer}_scale{self.scale}"


def routing_space(config: ModelConfig) -> list[CellSpec]:
    """Every gated cell, the initial cell first, then layer by layer from fine to coarse.

    Official rules (dynamic_backbone.py): a cell has no up path at the finest scale, no down path
    at the coarsest, and the last layer only keeps its scale (its outputs feed the decoder). "The
    coarsest" is that of the next layer: in Layer17 the 1/32 cells of the layer before the last
    go down into the last layer's 1/64 cell.
    """
    cells = [CellSpec(INIT_LAYER, 0, config.channels, allow_up=False, allow_down=True)]
    counts = config.cells_per_layer
    last = config.layers - 1
    for layer, n_scales in enumerate(counts):
        next_scales = counts[layer + 1] if layer < last else 0
        for scale in range(n_scales):
            cells.append(
                CellSpec(
                    layer=layer,
                    scale=scale,
                    channels=config.channels * 2**scale,
                    allow_up=scale > 0 and layer != last,
                    allow_down=scale + 1 < next_scales,
                )
            )
    return cells


def a_space_slice(config: ModelConfig) -> slice:
    """Which cells of ``routing_space`` make up A(x)."""
    return slice(0 if config.init_cell_in_a_space else 1, None)


def a_space_labels(config: ModelConfig) -> list[str]:
    """A name for each value of A(x), in its order: ``<cell>.<slot>``, e.g. ``layer3_scale1.keep``."""
    return [f"{spec.name}.{slot}" for spec in routing_space(config)[a_space_slice(config)] for slot in SLOTS]


def route_paths(config: ModelConfig) -> list[tuple[bool, bool, bool]]:
    """Per cell of ``routing_space`` (same order), which of [up, keep, down] the fixed route
    ``config.route`` leaves open; every path a cell has when no route is set.

    A route is a set S of scales: cells at a scale in S keep their scale and move between scales of
    S; the stem's 1/4 features reach min(S) through the diagonal of cells that only go down (the
    initial cell at 1/4, layer 0's 1/8 cell, ...), whose outputs at their own scale are closed. So the
    route S = {2} sees the image only through the 1/16 column and the one-route network restricted
    to it cannot fall back on the stem's fine features; S = {0} never leaves 1/4.
    """
    specs = routing_space(config)
    if not config.route:
        return [spec.paths for spec in specs]
    scales, lowest = set(config.route), min(config.route)
    paths = []
    for spec in specs:
        if spec.scale in scales:
            paths.append((spec.allow_up and spec.scale - 1 in scales, True,
                          spec.allow_down and spec.scale + 1 in scales))
        elif spec.scale < lowest and spec.scale == spec.layer + 1:  # the way down from the stem
            paths.append((False, False, spec.allow_down))
        else:
            paths.append((False, False, False))
    return paths
