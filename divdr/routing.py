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
