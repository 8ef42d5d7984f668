"""A routing cell: the cell operation, its gate, and its scale transforms [up, keep, down]."""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from divdr import fused
from divdr.config import GateConfig
from divdr.gates import build_gate, has_skip_branch
from divdr.ops import DownTransform, SepConv3x3x2, UpTransform
from divdr.routing import DOWN, KEEP, UP, CellSpec

# Batched inference: a cell or path open for at least this fraction of a batch's images may run on
# the whole batch (the closed images weighted 0, so the outputs are the same) instead of gathering
# and scattering the images. The default, 1.0, is strict per-image skipping: only a cell or path
# open for every image runs on the batch as it is. ``set_dense_fraction`` changes it for a whole
# model; on the 16-channel ``tiny`` net at batch 8 it measured no gain (docs/benchmarks.md, section 4).
STRICT_PER_IMAGE = 1.0

# Official threshold (dynamic_cell.py): a path whose weight is at most this is not computed at
# inference, and a cell whose weights sum to less than it is dropped (its input passes through).
ACTIVE_THRESHOLD = 1e-4


def path_active(weights: torch.Tensor) -> torch.Tensor:
    """Which paths are computed at inference (weight above the threshold)."""
    return weights > ACTIVE_THRESHOLD


def cell_active(weights: torch.Tensor) -> torch.Tensor:
    """Which cells are computed at inference: [B, ..., 3] weights -> [B, ...] booleans."""
    return weights.sum(dim=-1) > ACTIVE_THRESHOLD


@dataclass
class CellOutput:
    """What a cell sends on: per slot a tensor (zeros for the images whose path is closed), and its weights.

    ``up`` / ``down`` are None where the cell has no such path, and at inference where the path is closed
    for every image of the batch (nothing to add to the next cell's input)."""

    up: torch.Tensor | None  # at scale - 1 with C/2 channels
    keep: torch.Tensor | None  # None only from a static route's cell whose keep path is closed (divdr.export)
    down: torch.Tensor | None  # at scale + 1 with 2C channels
    weights: torch.Tensor  # [B, 3] in the [up, keep, down] layout, 0 for slots the cell lacks


class Cell(nn.Module):
    """Cell operation = SepConv3x3x2(x) + x (DR Table 2's best cell), then gated scale transforms.

    Training computes every path and weights it (gradients reach every gate). Evaluation skips,
    per image, paths whose weight is <= ACTIVE_THRESHOLD and whole cells whose paths all are.

    A Gumbel gate with DRNets' fast-forward branch also weighs the cell input passed through
    unchanged (its "skip" weight); when skip is the only branch selected, every path weight is 0
    and the cell is dropped exactly as with DR's soft gate.
    """

    def __init__(self, spec: CellSpec, gate: GateConfig, open_paths: tuple[bool, bool, bool] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.slots = [slot for slot, allowed in enumerate(spec.paths) if allowed]
        self._layout_pad = (self.slots[0], 2 - self.slots[-1])
        # A fixed route (ModelConfig.route) closes some paths for good: their weights are multiplied by 0.
        self.route_mask: torch.Tensor | None
        if open_paths is None or tuple(open_paths) == spec.paths:
            self.register_buffer("route_mask", None)
            self._route_open = spec.paths
        else:
            self.register_buffer("route_mask", torch.tensor(open_paths, dtype=torch.float32), persistent=False)
            self._route_open = tuple(bool(o) and a for o, a in zip(open_paths, spec.paths, strict=True))
        self.op = SepConv3x3x2(spec.channels)
        self._route_closed = open_paths is not None and not any(open_paths)
        # a cell the route closes has no gate to run: its weights are 0 whatever the input
        self.gate = build_gate(replace(gate, enabled=False) if self._route_closed else gate, spec.channels,
                               len(self.slots))
        self.skip_branch = has_skip_branch(gate)
        self.keep = nn.ReLU()
        self.dense_fraction = STRICT_PER_IMAGE
        self.up = UpTransform(spec.channels) if spec.allow_up else None
        self.down = DownTransform(spec.channels) if spec.allow_down else None
        self._compiled_training: Callable[[torch.Tensor], CellOutput] | None = None  # see compile_cells
        self.forced_weights: torch.Tensor | None = None  # [3]: divdr.export.forced_route, the gate ignored

    def __getstate__(self) -> dict:
        # a compiled function does not pickle (torch.save / mlflow of the whole model): compile again after loading
        return {**self.__dict__, "_compiled_training": None}

    def transforms(self) -> dict[int, nn.Module]:
        return {slot: t for slot, t in ((UP, self.up), (KEEP, self.keep), (DOWN, self.down)) if t is not None}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gate's path weights in the fixed [B, 3] layout, and the [B] weight of the
        fast-forward branch (None unless the gate has one)."""
        if self.forced_weights is not None:
            return self.forced_weights.to(x).expand(x.shape[0], 3), None
        own, skip = self._own_weights(x)
        return self._layout(own), skip

    def _own_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights of the cell's own paths [B, n_paths] (route-masked) and the skip weight."""
        gate_out = self.gate(x)
        skip = None
        if self.skip_branch:
            gate_out, skip = gate_out[:, :-1], gate_out[:, -1]
        if self.route_mask is not None:
            gate_out = gate_out * self.route_mask[self.slots[0]:self.slots[-1] + 1].to(gate_out.dtype)
        return gate_out, skip

    def _layout(self, own: torch.Tensor) -> torch.Tensor:
        # The cell's paths are contiguous slots (keep is always one): F.pad places their weights in the
        # [up, keep, down] layout in one operation, with no index built on the host.
        return F.pad(own, self._layout_pad) if any(self._layout_pad) else own

    def forward(self, x: torch.Tensor) -> CellOutput:
        if self.training:
            return (self._compiled_training or self._training_forward)(x)
        weights, skip = self.route(x)
        return self._forward_skipping(x, weights, skip)

    def _training_forward(self, x: torch.Tensor) -> CellOutput:
        return self._forward_all_paths(x, *self.route(x))

    def _forward_all_paths(self, x: torch.Tensor, weights: torch.Tensor,
                           skip: torch.Tensor | None = None) -> CellOutput:
        """Every path computed and weighted. Written for few kernels per cell (issue #20), with no
        host synchronisation: ReLU(h) once for all paths (each transform begins with it), the weights
        split in one ``unbind``, and no branch on a tensor's value, so the step can be compiled."""
        if self._route_closed:
            return self._forward_skipping(x, weights, skip)  # closed by the route: passes x through
        h = self.op(x)
        first, last = self.slots[0], self.slots[-1]
        own = weights[:, first:last + 1] if (first, last) != (0, 2) else weights
        # Under autocast a gate can give float32 weights while the features are bf16/fp16 (the gumbel
        # family's softmax and log run in float32 there): a float32 weight times a bf16 map would promote
        # the path, the cell's sum and every residual after it to float32. The weights are cast to the
        # features' dtype (that of ReLU(h + x)) for the products; the soft gate's are bf16 already, and in fp32 it
        # is a no-op.
        # (torch.promote_types is an operation the dispatcher counts, 62 a step: only where the dtypes differ)
        features = h.dtype if h.dtype == x.dtype else torch.promote_types(h.dtype, x.dtype)
        per_path = dict(zip(self.slots, own.to(features).reshape(-1, len(self.slots), 1, 1, 1).unbind(1),
                            strict=True))
        # A cell whose gates are all closed passes its input through (official drop-cell residual);
        # a fast-forward branch passes it through with its own weight.
        if skip is None:
            passthrough = (own.sum(dim=-1) <= ACTIVE_THRESHOLD).to(x.dtype)
        else:
            passthrough = skip
        # ReLU(h + x) for every path, and the keep path with the pass-through: one kernel on a GPU with divdr.fused's
        # kernels on (else the aten operations)
        activated, keep = fused.residual_keep(h, x, per_path[KEEP], passthrough.view(-1, 1, 1, 1), self.keep)
        up, down = None, None
        if self.up is not None:
            up = self.up.project(activated, per_path[UP]) if self._route_open[UP] else None
        if self.down is not None:
            down = fused.scaled_sum(self.down.project(activated), per_path[DOWN]) if self._route_open[DOWN] else None
        return CellOutput(up, keep, down, weights)

    def _forward_skipping(self, x: torch.Tensor, weights: torch.Tensor,
                          skip: torch.Tensor | None = None) -> CellOutput:
        """Only the open cells and paths of each image are computed. A cell or path open for every
        image of the batch (or for at least ``dense_fraction`` of it, closed images weighted 0) runs
        on the batch as it is; otherwise its images are gathered and the results scattered back.
        At batch 1, or with the default fraction 1.0, no closed path of any image is computed.

        Which images and paths are open is read on the host once per cell (one synchronisation, not one
        per path), and a path closed for the whole batch sends None, not a map of zeros to add."""
        batch = x.shape[0]
        active_cell = cell_active(weights)
        flags = torch.cat([active_cell.unsqueeze(1), path_active(weights)], dim=1).tolist()
        cell_rows = [b for b in range(batch) if flags[b][0]]
        every_cell = len(cell_rows) == batch
        whole = bool(cell_rows) and (every_cell or len(cell_rows) >= self.dense_fraction * batch)
        out: dict[int, torch.Tensor | None] = {slot: None for slot in self.transforms()}
        if cell_rows:
            # dropped images computed along (whole batch) have every path closed: weighted 0 below
            cell_idx = None if whole else torch.tensor(cell_rows, device=x.device)
            computed = range(batch) if whole else cell_rows  # the images xa holds, in order
            xa = x if whole else x[cell_idx]
            wa = weights if whole else weights[cell_idx]
            h = self.op(xa) + xa
            scale = wa.to(h.dtype)  # the products in the features' dtype (see _forward_all_paths)
            for slot, transform in self.transforms().items():
                on = [i for i, b in enumerate(computed) if flags[b][1 + slot]]
                if not on:
                    continue
                if len(on) == len(computed):  # open for every image computed
                    y = self._weighted(slot, transform, h, scale[:, slot])
                    rows = cell_idx
                elif len(on) >= self.dense_fraction * len(computed):  # most of them: closed ones weighted 0
                    y = self._weighted(slot, transform, h, torch.where(path_active(wa[:, slot]), scale[:, slot], 0.0))
                    rows = cell_idx
                else:
                    on_idx = torch.tensor(on, device=x.device)
                    y = self._weighted(slot, transform, h[on_idx], scale[on_idx, slot])
                    rows = on_idx if whole else cell_idx[on_idx]
                out[slot] = y if rows is None else y.new_zeros((batch, *y.shape[1:])).index_copy_(0, rows, y)
        # Images whose cell is dropped pass their input through unchanged; with a fast-forward
        # branch the images whose cell runs add their input times its weight.
        passthrough = None
        if not cell_rows:
            passthrough = x  # the cell is dropped for the whole batch: no copy (nothing edits x in place)
        elif not every_cell:
            passthrough = torch.where(active_cell.view(-1, 1, 1, 1), torch.zeros_like(x), x)
        if skip is not None:
            kept = torch.where(active_cell, skip, torch.zeros_like(skip)).view(-1, 1, 1, 1) * x
            passthrough = kept if passthrough is None else passthrough + kept
        if passthrough is not None:
            out[KEEP] = passthrough if out[KEEP] is None else out[KEEP] + passthrough
        if out[KEEP] is None:
            out[KEEP] = torch.zeros_like(x)
        return CellOutput(out.get(UP), out[KEEP], out.get(DOWN), weights)

    @staticmethod
    def _weighted(slot: int, transform: nn.Module, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Path ``slot`` (its ``transform``) of the cell operation's output ``h`` times the per-image ``weights``
        [B]; the up path's weight goes before its resize, as in training (``_forward_all_paths``), so skipping
        inference computes what the training forward does, in the same order."""
        weights = weights.view(-1, 1, 1, 1)
        if slot == UP:
            return transform(h, weights)
        return fused.scaled_sum(transform(h), weights)


# Distinct cells a compiled training forward is specialised for (width, paths, route): Layer16 has about
# a dozen; torch's default limit (8) would leave the rest in eager mode without a word.
COMPILE_RECOMPILE_LIMIT = 64


def compile_cells(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Regional compilation: every cell's training forward (gate, cell operation, weighted paths) is
    compiled with ``torch.compile``; cells of the same width and paths share one compiled graph, so
    compiling takes about as long as a dozen small graphs, not the whole network. Inference (which skips
    paths per image, a data-dependent control flow) stays in eager mode. Returns how many cells were set.
    """
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, COMPILE_RECOMPILE_LIMIT)
    cells = [m for m in model.modules() if isinstance(m, Cell)]
    for cell in cells:
        cell._compiled_training = torch.compile(cell._training_forward, backend=backend, mode=mode)
    return len(cells)


def graphs_compiled_afresh() -> int:
    """Graphs inductor has compiled in this process rather than found in its cache (local or loaded)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"]


def load_compile_cache(path: Path) -> bool:
    """Load a portable compile cache written by ``save_compile_cache`` (by this run earlier, another run, another
    machine) into this process before anything is compiled: graphs found there are not compiled again. False if
    there is no file yet. A file torch cannot read (another torch version, truncated) only costs the time it
    would have saved: it is named in a warning and compilation starts from scratch."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        # None where torch cannot un-pickle the file (it logs why); an exception where it cannot store an entry
        problem = None if torch.compiler.load_cache_artifacts(path.read_bytes()) is not None else "not a cache"
    except Exception as error:  # a cache must never stop a training run
        problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        warnings.warn(f"compile cache {path} is unreadable ({problem}); compiling from scratch, and the file "
                      "will be rewritten", stacklevel=2)
    return problem is None


def save_compile_cache(path: Path) -> int:
    """Write what ``torch.compile`` compiled or loaded in this process (inductor's portable cache artifacts:
    AOTAutograd's and inductor's graphs and, on a GPU, the Triton kernels) to ``path``; the bytes written (0:
    nothing compiled). The file is replaced whole (written aside, then renamed), so runs sharing one file
    never read half of it. A file that cannot be written (a read-only or full disk) is named in a warning and 0
    returned: the run goes on without it."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None or not artifacts[0]:
        return 0
    path = Path(path)
    partial = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.partial")  # one per writer
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(artifacts[0])
        os.replace(partial, path)
    except OSError as error:
        with contextlib.suppress(OSError):  # the partial file, where it could be made
            partial.unlink(missing_ok=True)
        warnings.warn(f"compile cache {path} could not be written ({error}); training goes on without it",
                      stacklevel=2)
        return 0
    return len(artifacts[0])


def set_dense_fraction(model: nn.Module, fraction: float) -> None:
    """Every cell of ``model`` runs a cell or path on the whole batch at inference when at least
    ``fraction`` of the batch needs it (1.0: strict per-image skipping, the default). The outputs
    are the same either way; only the work done for closed images and the copies differ."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"dense fraction must be in (0, 1], got {fraction}")
    for module in model.modules():
        if isinstance(module, Cell):
            module.dense_fraction = fraction
