"""The per-image skipping of ``divdr.cells.Cell`` as it was before the benchmarks (gather every
cell's images and every path's, scatter back with ``index_add``, even when nothing is skipped):
the reference that ``bench/inference_latency.py --before`` times side by side with the current
one, and that ``tests/bench`` checks the current one against (same outputs)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from divdr.cells import Cell, CellOutput, cell_active, path_active
from divdr.routing import DOWN, KEEP, UP


def forward_skipping_before(self: Cell, x: torch.Tensor, weights: torch.Tensor,
                            skip: torch.Tensor | None = None) -> CellOutput:
    active_cell = cell_active(weights)
    out: dict[int, torch.Tensor | None] = {slot: None for slot in self.transforms()}
    out[KEEP] = torch.where(active_cell.view(-1, 1, 1, 1), torch.zeros_like(x), x)
    if skip is not None:
        kept = torch.where(active_cell, skip, torch.zeros_like(skip))
        out[KEEP] = out[KEEP] + kept.view(-1, 1, 1, 1) * x
    cell_idx = active_cell.nonzero().flatten()
    if cell_idx.numel() > 0:
        h = self.op(x[cell_idx]) + x[cell_idx]
        for slot, transform in self.transforms().items():
            on = path_active(weights[cell_idx, slot])
            if not bool(on.any()):
                continue
            # a path weighted as the cell weights it now (the up path before its resize, since 2026-11-28): this
            # reference is about which images are gathered and scattered, not the order of a product
            y = Cell._weighted(slot, transform, h[on], weights[cell_idx[on], slot])
            if out[slot] is None:
                out[slot] = y.new_zeros((x.shape[0], *y.shape[1:]))
            out[slot] = out[slot].index_add(0, cell_idx[on], y)
    for slot, shape in _closed_shapes(self, x).items():
        if out[slot] is None:
            out[slot] = x.new_zeros(shape)
    return CellOutput(out.get(UP), out[KEEP], out.get(DOWN), weights)


def _closed_shapes(cell: Cell, x: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """Shapes of the up/down outputs (the reference fills paths closed for the whole batch with zeros)."""
    b, c, h, w = x.shape
    shapes = {}
    if cell.up is not None:
        shapes[UP] = (b, c // 2, 2 * h, 2 * w)
    if cell.down is not None:
        shapes[DOWN] = (b, 2 * c, (h + 1) // 2, (w + 1) // 2)
    return shapes


@contextlib.contextmanager
def skipping_before() -> Iterator[None]:
    """Within this block every ``Cell`` skips as before the benchmarks."""
    current = Cell._forward_skipping
    Cell._forward_skipping = forward_skipping_before
    try:
        yield
    finally:
        Cell._forward_skipping = current
