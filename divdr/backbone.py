"""The DR backbone: stem, then the routing space of gated cells over four scales."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from divdr.cells import Cell, CellOutput
from divdr.config import ModelConfig
from divdr.costs import strided
from divdr.ops import Stem, convert_norm, drop_batch_counters
from divdr.routing import INIT_LAYER, a_space_slice, route_paths, routing_space

# Inputs are padded to a multiple of 32 (1/32 is the coarsest scale with an up path, whose x2
# must land on the finer map exactly). Layer17's 1/64 cell only receives a stride-2 down path
# and sends nothing back up, so it needs no more: it is ceil(H/64) x ceil(W/64).
SIZE_DIVISIBILITY = 32


def feature_name(scale: int) -> str:
    return f"scale{scale}"


@dataclass
class BackboneOutput:
    """The one output type of the backbone, in training and evaluation.

    ``features``: the last layer's outputs per scale ("scale0" at 1/4 ... "scale3" at 1/32, and
    "scale4" at 1/64 in Layer17).
    ``gates``: every cell's weights, [B, cells incl. the initial one, 3] in [up, keep, down]
    order; together with a cost table this is all the FLOPs module needs.
    ``activations``: A(x), the DivDR gate activation vector, [B, a_dim].
    """

    features: dict[str, torch.Tensor]
    gates: torch.Tensor
    activations: torch.Tensor


class DynamicBackbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.specs = routing_space(config)
        self.stem = Stem(config.channels)
        self.cells = nn.ModuleList(Cell(spec, config.gate, paths)
                                   for spec, paths in zip(self.specs, route_paths(config), strict=True))
        self._a_slice = a_space_slice(config)
        # indices of self.cells grouped by layer, in scale order
        self._layers: list[list[int]] = [[] for _ in range(config.layers + 1)]
        for i, spec in enumerate(self.specs):
            self._layers[spec.layer + 1].append(i)
        drop_batch_counters(convert_norm(self, config.norm))
        self.scale_streams = False  # see set_scale_streams
        self._side_streams: dict[torch.device, list[torch.cuda.Stream]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_side_streams": {}}  # CUDA streams do not pickle or copy: made again when needed

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({"scale_streams": False, "_side_streams": {}, **state})  # pickled before the streams

    @property
    def out_channels(self) -> dict[str, int]:
        return {feature_name(s): self.config.channels * 2**s for s in range(self.config.num_scales)}

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        if images.shape[-2] % SIZE_DIVISIBILITY or images.shape[-1] % SIZE_DIVISIBILITY:
            raise ValueError(
                f"input size {tuple(images.shape[-2:])} is not a multiple of {SIZE_DIVISIBILITY}; "
                "pad it first (DynamicRoutingSegmenter does)"
            )
        init_index = self._layers[INIT_LAYER + 1][0]
        stem_out = self.stem(images)
        previous = [self.cells[init_index](stem_out)]
        all_weights = [previous[0].weights]
        for layer in range(self.config.layers):
            inputs = [aggregate(previous, scale, stem_out) for scale in range(len(self._layers[layer + 1]))]
            previous = self._run_layer(self._layers[layer + 1], inputs)
            all_weights.extend(out.weights for out in previous)
        gates = torch.stack(all_weights, dim=1)
        features = {feature_name(s): out.keep for s, out in enumerate(previous)}
        return BackboneOutput(features, gates, gates[:, self._a_slice].flatten(1))

    def _run_layer(self, indices: list[int], inputs: list[torch.Tensor]) -> list[CellOutput]:
        # training only: at evaluation each cell reads its gates on the host (per-image skipping), and on the
        # streams a Layer16 forward at batch 1 took 18% longer on an H200 (batch 8: 5% less; docs/benchmarks.md)
        if not (self.scale_streams and self.training and inputs[0].is_cuda and len(inputs) > 1):
            return [self.cells[i](x) for i, x in zip(indices, inputs, strict=True)]
        return self._run_layer_on_streams(indices, inputs)

    def _run_layer_on_streams(self, indices: list[int], inputs: list[torch.Tensor]) -> list[CellOutput]:
        """The layer's cells side by side: the finest on the current stream, each other scale on a stream of its
        own that first waits for the current one (the inputs are ready), and the current stream waits for all of
        them before the next layer. A cell's kernels stay in their order; autograd runs each backward on its
        forward's stream, so the backward overlaps the scales too. Allocations cross streams only at those
        joins; ``record_stream`` tells the caching allocator so it never hands a block back too early."""
        main = torch.cuda.current_stream(inputs[0].device)
        side = self._streams_for(inputs[0].device, len(inputs) - 1)
        outputs = [self.cells[indices[0]](inputs[0])]
        for i, x, stream in zip(indices[1:], inputs[1:], side, strict=True):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                out = self.cells[i](x)
            x.record_stream(stream)
            for tensor in (out.up, out.keep, out.down, out.weights):
                if tensor is not None:
                    tensor.record_stream(main)
            outputs.append(out)
        for stream in side:
            main.wait_stream(stream)
        return outputs

    def _streams_for(self, device: torch.device, count: int) -> list[torch.cuda.Stream]:
        streams = self._side_streams.setdefault(device, [])
        while len(streams) < count:
            streams.append(torch.cuda.Stream(device))
        return streams[:count]


def set_scale_streams(model: nn.Module, enabled: bool = True) -> int:
    """Run each layer's cells (one per scale) on CUDA streams side by side in training (forward and backward); in
    evaluation, and on a CPU, it changes nothing. The cells of a layer depend only on the previous layer, and at
    the sizes DR trains on many of their kernels are too small to fill a GPU, so the scales overlap rather than
    queue. The same operations run in the same order per cell: the outputs are unchanged, and the gradients too up
    to the order in which autograd adds the gradient of a tensor used on two streams. Returns how many backbones
    were set."""
    backbones = [m for m in model.modules() if isinstance(m, DynamicBackbone)]
    for backbone in backbones:
        backbone.scale_streams = enabled
    return len(backbones)


def scale_zeros(stem_out: torch.Tensor, scale: int) -> torch.Tensor:
    """A map of zeros of the routing space at ``scale`` (the stem's output is scale 0)."""
    b, c, h, w = stem_out.shape
    return stem_out.new_zeros(b, c * 2**scale, strided(h, 2**scale), strided(w, 2**scale))


def aggregate(previous: Sequence[CellOutput], scale: int, stem_out: torch.Tensor) -> torch.Tensor:
    """X_s = down(Y_{s-1}) + keep(Y_s) + up(Y_{s+1}), over the cells the previous layer has and the paths
    they send (zeros when none reaches the scale: a new scale whose down path is closed)."""
    parts = []
    if scale > 0 and previous[scale - 1].down is not None:
        parts.append(previous[scale - 1].down)
    if scale < len(previous) and previous[scale].keep is not None:
        parts.append(previous[scale].keep)
    if scale + 1 < len(previous) and previous[scale + 1].up is not None:
        parts.append(previous[scale + 1].up)
    if not parts:
        return scale_zeros(stem_out, scale)
    total = parts[0]
    for part in parts[1:]:  # a chain of adds: no stack to copy into, nothing to do in the backward
        total = total + part
    return total
