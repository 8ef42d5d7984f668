"""The route an image takes through the routing space, drawn as DR's routing diagram (DR Fig. 1).

Columns are the layers (stem, the initial cell, layers 0..L-1, "out": what feeds the decoder or the
detector's FPN), rows the scales (1/4 at the top, 1/32 at the bottom). Every path a cell has goes from
the cell to the next layer's cell one scale finer (up), at the same scale (keep) or one coarser (down);
an open path is drawn with a line as wide as its gate weight, a closed one faint. A cell with every path
closed is dropped (hollow): its input passes through unchanged.

``path_segments`` / ``open_paths`` are the geometry (tested as data); ``draw_route`` and
``routes_figure`` draw it with matplotlib (Agg). Used by ``pipeline/predict.py``,
``pipeline/evaluate.py`` and the run artifacts (``routes.png``: each cluster centre's route).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from divdr.cells import ACTIVE_THRESHOLD
from divdr.config import ModelConfig
from divdr.routing import DOWN, KEEP, SLOTS, UP, a_space_slice, route_paths, routing_space

SCALE_STEP = {UP: -1, KEEP: 0, DOWN: 1}  # where each slot leads: one scale finer, the same, one coarser
SLOT_COLOURS = {UP: "tab:blue", KEEP: "0.15", DOWN: "tab:orange"}
MIN_LINE_WIDTH = 0.8  # an open path with a tiny weight must still be visible
MAX_LINE_WIDTH = 4.0  # the width of a path with weight 1
CLOSED_COLOUR = "0.85"
PANEL_SIZE = (4.2, 2.6)  # inches per diagram (wider for deep networks: COLUMN_WIDTH per column)
COLUMN_WIDTH = 0.34
MIN_FIGURE_WIDTH = 5.6  # room for the legend (two columns; three from WIDE_FIGURE on)
WIDE_FIGURE = 7.5
LEGEND_HEIGHT = 0.75  # inches under the diagrams
MAX_PANEL_COLUMNS = 3
SCALE_NAMES = ("1/4", "1/8", "1/16", "1/32", "1/64")


@dataclass(frozen=True)
class PathSegment:
    """One path of the routing space: from ``start`` to ``end``, as (column, scale) points."""

    cell: int  # index in routing_space(config)
    slot: int  # UP, KEEP or DOWN (divdr.routing)
    start: tuple[int, int]
    end: tuple[int, int]
    weight: float  # the gate weight; NaN where unknown (a cell outside A(x))

    @property
    def is_open(self) -> bool:
        return self.weight > ACTIVE_THRESHOLD  # False for NaN: unknown is not drawn as open


def column_of(layer: int) -> int:
    """The diagram column of a routing layer: the stem is column -1, the initial cell (layer -1) 0."""
    return layer + 1


def path_segments(config: ModelConfig, gates: np.ndarray) -> list[PathSegment]:
    """Every path the routing space has (those a fixed ``model.route`` closes left out), with its weight
    from ``gates`` [cells, 3] (``routing_space`` order, [up, keep, down] per cell). The last layer keeps
    into the output column (the decoder's, or the FPN's, inputs)."""
    gates = np.asarray(gates, dtype=float)
    specs = routing_space(config)
    if gates.shape != (len(specs), len(SLOTS)):
        raise ValueError(f"gates must be [{len(specs)}, {len(SLOTS)}] for this model (its routing cells incl. "
                         f"the initial one), got {list(gates.shape)}")
    segments = []
    for index, (spec, allowed) in enumerate(zip(specs, route_paths(config), strict=True)):
        start = (column_of(spec.layer), spec.scale)
        for slot in (UP, KEEP, DOWN):
            if allowed[slot] and spec.paths[slot]:
                end = (start[0] + 1, spec.scale + SCALE_STEP[slot])
                segments.append(PathSegment(index, slot, start, end, float(gates[index, slot])))
    return segments


def open_paths(config: ModelConfig, gates: np.ndarray) -> list[PathSegment]:
    """The paths inference computes (weight above ``divdr.cells.ACTIVE_THRESHOLD``)."""
    return [s for s in path_segments(config, gates) if s.is_open]


def route_from_activations(config: ModelConfig, activations: np.ndarray) -> np.ndarray:
    """A(x), or a cluster centre in A-space, back to gates [cells, 3] over the whole routing space; cells
    that A(x) leaves out (the initial cell, by default) are NaN: unknown."""
    specs = routing_space(config)
    gates = np.full((len(specs), len(SLOTS)), np.nan)
    part = gates[a_space_slice(config)]
    activations = np.asarray(activations, dtype=float)
    if activations.size != part.size:
        raise ValueError(f"A(x) of this model has {part.size} values, got {activations.size}")
    gates[a_space_slice(config)] = activations.reshape(part.shape)
    return gates


def draw_route(ax: Axes, config: ModelConfig, gates: np.ndarray, title: str = "") -> None:
    """One routing diagram on ``ax``."""
    gates = np.asarray(gates, dtype=float)
    segments = path_segments(config, gates)
    for segment in segments:  # the space first, faint, so open paths are drawn over it
        (x0, y0), (x1, y1) = segment.start, segment.end
        ax.plot([x0, x1], [y0, y1], color=CLOSED_COLOUR, lw=0.6, ls="--" if math.isnan(segment.weight) else "-",
                zorder=1)
    for segment in (s for s in segments if s.is_open):
        (x0, y0), (x1, y1) = segment.start, segment.end
        width = MIN_LINE_WIDTH + (MAX_LINE_WIDTH - MIN_LINE_WIDTH) * min(segment.weight, 1.0)
        ax.plot([x0, x1], [y0, y1], color=SLOT_COLOURS[segment.slot], lw=width, solid_capstyle="round", zorder=2)
    last = column_of(config.layers - 1)
    ax.plot([-1, 0], [0, 0], color=SLOT_COLOURS[KEEP], lw=MAX_LINE_WIDTH / 2, zorder=2)  # stem -> initial cell
    ax.scatter([-1], [0], marker="s", s=60, color="0.3", zorder=3)
    ax.scatter([last + 1] * config.num_scales, range(config.num_scales), marker="s", s=40, color="0.3", zorder=3)
    for index, spec in enumerate(routing_space(config)):
        row = gates[index]
        x, y = column_of(spec.layer), spec.scale
        if np.isnan(row).any():  # outside A(x): a centre says nothing about it
            ax.scatter([x], [y], s=30, marker="D", color=CLOSED_COLOUR, zorder=3)
        elif row.sum() > ACTIVE_THRESHOLD:  # the cell runs (divdr.cells.cell_active)
            ax.scatter([x], [y], s=30, color="0.1", zorder=3)
        else:  # dropped: its input passes through
            ax.scatter([x], [y], s=30, facecolor="white", edgecolor="0.1", zorder=3)
    ax.set_xticks(range(-1, last + 2), ["stem", "init", *map(str, range(config.layers)), "out"], fontsize=7)
    ax.set_yticks(range(config.num_scales), SCALE_NAMES[: config.num_scales], fontsize=7)
    ax.set_xlim(-1.5, last + 1.5)
    ax.set_ylim(config.num_scales - 0.5, -0.5)  # 1/4 at the top
    ax.set_xlabel("layer", fontsize=7)
    ax.set_ylabel("scale", fontsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=8)


def _legend_handles(unknown: bool) -> list[Line2D]:
    handles = [
        *(Line2D([], [], color=SLOT_COLOURS[s], lw=3, label=f"{SLOTS[s]} (width = gate weight)")
          for s in (UP, KEEP, DOWN)),
        Line2D([], [], color=CLOSED_COLOUR, lw=1, label="closed path"),
        Line2D([], [], marker="o", ls="", color="0.1", label="cell runs"),
        Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor="0.1", color="0.1",
               label="cell dropped (input passes through)"),
    ]
    if unknown:
        handles.append(Line2D([], [], marker="D", ls="", color=CLOSED_COLOUR, label="cell outside A(x): unknown"))
    return handles


def routes_figure(config: ModelConfig, routes: Sequence[tuple[np.ndarray, str]], title: str = "") -> bytes:
    """PNG bytes: one routing diagram per (gates, caption) of ``routes``, in a grid, with one legend."""
    if not routes:
        raise ValueError("no route to draw")
    columns = min(len(routes), MAX_PANEL_COLUMNS)
    rows = math.ceil(len(routes) / columns)
    height = PANEL_SIZE[1] * rows + LEGEND_HEIGHT + (0.3 if title else 0.0)
    width = max(PANEL_SIZE[0], COLUMN_WIDTH * (config.layers + 3)) * columns
    width = max(width, MIN_FIGURE_WIDTH)
    fig, axes = plt.subplots(rows, columns, figsize=(width, height), dpi=110, squeeze=False)
    for ax, (gates, caption) in zip(axes.flat, routes, strict=False):
        draw_route(ax, config, gates, caption)
    for ax in axes.flat[len(routes):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    unknown = any(np.isnan(np.asarray(gates, dtype=float)).any() for gates, _ in routes)
    legend_columns = (4 if unknown else 3) if width >= WIDE_FIGURE else 2
    fig.legend(handles=_legend_handles(unknown), loc="lower center", ncol=legend_columns, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, LEGEND_HEIGHT / height, 1, 1))
    sink = io.BytesIO()
    fig.savefig(sink, format="png")
    plt.close(fig)
    return sink.getvalue()
