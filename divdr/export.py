"""A route of a DR network exported as a static, gate-free network: DivDR's K architectures for production.

A route is one weight per path of every cell, [cells, 3] in the [up, keep, down] layout of
``BackboneOutput.gates`` (one image's gates, or a cluster's mean: ``cluster_routes``). The exported network
(``export_route``) keeps only what the dynamic network computes on that route at inference: no gate runs,
a path whose weight is at most ``ACTIVE_THRESHOLD`` is not built, a cell whose weights sum to at most it is
dropped (its input passes through), and every BatchNorm is folded into the convolution before it
(``torch.nn.utils.fusion.fuse_conv_bn_eval``). It has no data-dependent control flow, so it can be compiled
whole and captured in a CUDA graph, and its FLOPs are the route's (``route_flops``).

``forced_route`` puts the dynamic network itself on a route (every image, gates ignored): the exported
network gives its outputs (tests/divdr/test_export.py).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from divdr.backbone import aggregate, feature_name, scale_zeros
from divdr.cells import ACTIVE_THRESHOLD, Cell, CellOutput
from divdr.config import ConfigError
from divdr.flops import cost_table, real_cost
from divdr.heads import DynamicRoutingSegmenter, padded_size
from divdr.ops import bilinear
from divdr.routing import DOWN, INIT_LAYER, KEEP, UP


def _check_route(model: DynamicRoutingSegmenter, route: torch.Tensor) -> torch.Tensor:
    cells = len(model.backbone.cells)
    route = torch.as_tensor(route, dtype=torch.float32).detach().cpu()
    if route.shape != (cells, 3):
        raise ValueError(f"a route is one weight per path of every cell, shape ({cells}, 3) in the "
                         f"[up, keep, down] layout; got {tuple(route.shape)}")
    if not torch.isfinite(route).all() or (route < 0).any():
        raise ValueError("a route's weights must be finite and >= 0")
    if model.config.gate.enabled and model.config.gate.kind == "gumbel" and model.config.gate.skip_branch:
        raise ConfigError("a route of a Gumbel gate with the fast-forward branch needs the skip weights too; "
                          "export is for soft gates, Gumbel gates without skip, and gate-free networks")
    return route


@contextlib.contextmanager
def forced_route(model: DynamicRoutingSegmenter, route: torch.Tensor) -> Iterator[DynamicRoutingSegmenter]:
    """Within the block, every cell of ``model`` takes the route's weights for every image instead of its
    gate's (the gates do not run); ``BackboneOutput.gates`` then holds the route."""
    route = _check_route(model, route)
    cells = list(model.backbone.cells)
    try:
        for cell, weights in zip(cells, route, strict=True):
            cell.forced_weights = weights
        yield model
    finally:
        for cell in cells:
            cell.forced_weights = None


def _fused(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` with each Conv2d + BatchNorm2d pair folded into one Conv2d."""
    module = copy.deepcopy(module).eval()
    for child_name, child in list(module.named_children()):
        setattr(module, child_name, _fused(child))
    if isinstance(module, nn.Sequential):
        layers = list(module)
        merged: list[nn.Module] = []
        for layer in layers:
            if isinstance(layer, nn.BatchNorm2d) and merged and isinstance(merged[-1], nn.Conv2d):
                merged[-1] = fuse_conv_bn_eval(merged[-1], layer)
            else:
                merged.append(layer)
        module = nn.Sequential(*merged)
    return module


class StaticCell(nn.Module):
    """One cell on a fixed route: the cell operation and the open transforms, with their weights as
    constants. ``op`` None: the cell is dropped and passes its input through."""

    def __init__(self, cell: Cell, weights: list[float]) -> None:
        super().__init__()
        self.weights = weights
        self.register_buffer("route_row", torch.tensor(weights), persistent=False)
        dropped = sum(weights) <= ACTIVE_THRESHOLD
        self.op = None if dropped else _fused(cell.op)

        def open_transform(slot: int, transform: nn.Module | None) -> nn.Module | None:
            return _fused(transform.conv[1]) if transform is not None and not dropped \
                and weights[slot] > ACTIVE_THRESHOLD else None

        self.up, self.down = open_transform(UP, cell.up), open_transform(DOWN, cell.down)
        self.keep_open = not dropped and weights[KEEP] > ACTIVE_THRESHOLD

    def forward(self, x: torch.Tensor) -> CellOutput:
        if self.op is None:
            return CellOutput(None, x, None, self.route_row)
        activated = torch.relu(self.op(x) + x)
        keep = self.weights[KEEP] * activated if self.keep_open else None
        up = None
        if self.up is not None:
            up = bilinear(self.weights[UP] * self.up(activated), scale_factor=2)  # weighted before, as the cell
        down = self.weights[DOWN] * self.down(activated) if self.down is not None else None
        return CellOutput(up, keep, down, self.route_row)


class StaticRouteNetwork(nn.Module):
    """A DR segmenter on one route, without gates, closed paths or dropped cells (eval mode only: the
    BatchNorms are folded into the convolutions). ``forward(images)`` gives the logits."""

    def __init__(self, model: DynamicRoutingSegmenter, route: torch.Tensor) -> None:
        super().__init__()
        route = _check_route(model, route)
        backbone = model.backbone
        self.config = model.config
        self.register_buffer("route", route.clone(), persistent=True)
        self.stem = _fused(backbone.stem)
        self.cells = nn.ModuleList(StaticCell(cell, [float(w) for w in weights])
                                   for cell, weights in zip(backbone.cells, route, strict=True))
        self.layers = [list(indices) for indices in backbone._layers]
        self.decoder = _fused(model.decoder)
        self.eval()

    def train(self, mode: bool = True) -> StaticRouteNetwork:
        if mode:
            raise RuntimeError("a StaticRouteNetwork is for inference: its BatchNorms are folded into the "
                               "convolutions; train the dynamic network and export again")
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        padded = F.pad(images, (0, padded_size(width) - width, 0, padded_size(height) - height))
        x = self.stem(padded)
        previous = [self.cells[self.layers[INIT_LAYER + 1][0]](x)]
        for layer in range(self.config.layers):
            scales = len(self.layers[layer + 1])
            inputs = [aggregate(previous, scale, x) for scale in range(scales)]
            previous = [self.cells[i](xs) for i, xs in zip(self.layers[layer + 1], inputs, strict=True)]
        features = {feature_name(s): out.keep if out.keep is not None else scale_zeros(x, s)
                    for s, out in enumerate(previous)}
        return self.decoder(features)[..., :height, :width]


def export_route(model: DynamicRoutingSegmenter, route: torch.Tensor) -> StaticRouteNetwork:
    """The static network of ``model`` on ``route`` ([cells, 3], e.g. ``cluster_routes(...)[k]``)."""
    return StaticRouteNetwork(model, route)


def route_flops(model: DynamicRoutingSegmenter, route: torch.Tensor, height: int, width: int) -> float:
    """FLOPs of the exported network at ``height`` x ``width``: the route's real cost without any gate."""
    route = _check_route(model, route)
    table = cost_table(model.config, height, width)
    return float(real_cost(route[None].double(), table)[0]) - float(table.gate.sum())


def cluster_routes(gates: np.ndarray | torch.Tensor, assignments: np.ndarray, k: int) -> dict[int, torch.Tensor]:
    """Per cluster with images, the mean of its images' gates [cells, 3]: the route of the cluster's centre
    (a path open for any of its images stays open). ``gates``: [N, cells, 3] (``BackboneOutput.gates`` of N
    images, e.g. ``InferenceResult.gates``), ``assignments``: [N] cluster of each image, in 0 .. k-1."""
    gates = torch.as_tensor(np.asarray(gates), dtype=torch.float32)
    assignments = np.asarray(assignments)
    if gates.ndim != 3 or gates.shape[-1] != 3 or len(assignments) != len(gates):
        raise ValueError(f"gates must be [N, cells, 3] with one assignment per image; got {tuple(gates.shape)} "
                         f"and {len(assignments)} assignments")
    if len(assignments) and not ((assignments >= 0) & (assignments < k)).all():
        raise ValueError(f"assignments must be clusters 0 .. {k - 1}")
    return {c: gates[torch.from_numpy(assignments == c)].mean(0) for c in range(k) if (assignments == c).any()}
