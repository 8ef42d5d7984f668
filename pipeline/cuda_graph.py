"""``train.cuda_graph``: the training step captured once in a CUDA graph and replayed at every step.

A Layer16 step dispatches thousands of small kernels; launched one by one from Python, a GPU waits on the
host between them (docs/benchmarks.md section 8: 209 ms launched, 105 ms replayed as one graph, bf16 +
channels_last on an H100). Training computes every path, so the step's graph is static and can be captured
whole: forward, losses, backward, gradient clipping and the fused SGD update.

A replay repeats the captured kernels on the captured memory; so everything that changes between steps
reaches the step through device buffers written before each replay, never through a Python value (which
would be frozen at capture):

- the batch, copied into static tensors (batches of one shape: the loader drops the last partial batch);
- the schedule's progress (the budget's and eq. 2's ramps, ``divdr.losses.ramp`` on a 0-d tensor);
- the centres, sigma^2 and whether eq. 2 is on (0 before the first K-means and where the centroid store pauses
  it): eq. 2 is computed at every step of a DivDR run and multiplied by that flag;
- the learning rates (0-d tensors that the poly schedule fills: ``pipeline.loop.tensor_learning_rates``);
- the Gumbel gates' temperature (a buffer ``divdr.gates.set_temperature`` fills).

The first ``WARMUP_STEPS`` steps run eagerly on a side stream (capture requires it, and the fused SGD makes its
momentum buffers there); then the step is captured and replayed. Skips of non-finite steps are decided on the
device (the fused SGD's ``found_inf``), as in every fused run. Where it does not apply, the configuration
says so before training: fp16 (its GradScaler reads the overflow flag on the host), tasks whose batches change
shape, fault-injection hooks (they perturb the step from the host).

Several processes (Ray Train workers, ``scaling.workers`` > 1) capture the step in two graphs, with the
communication between them rather than inside: DDP's reducer (bucket hooks fired from autograd) is not
captured here, and NCCL inside a graph asks more of the setup (one capture per communicator, watchdog,
warm-up counts). Graph 1 is the forward, the losses, this process's finite flag and the backward of the loss
divided by the number of processes, into gradients that are views of one flat buffer; then one all-reduce
(sum) of that buffer - the mean gradient, what DDP computes - and one of the flag (min); graph 2 is the
clipping and the fused SGD, left out on every process where any had a non-finite value. The network is not
wrapped in DDP (``pipeline.worker``): the processes start from rank 0's weights (broadcast once here), and
each keeps its own BatchNorm running statistics, as DDP with ``broadcast_buffers=False``; rank 0's are given
to every process before each evaluation and checkpoint (``World.sync_buffers``), as before. Unlike DDP the
all-reduce does not overlap the backward: it is one call on ~4 M parameters (Layer16) after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import torch

from pipeline.loop import Hook, StepResult, Trainer

WARMUP_STEPS = 3  # eager steps on a side stream before capture (torch.cuda.graph's documented requirement)

T = TypeVar("T")


class GraphBackend(Protocol):
    """How steps are warmed up and captured: ``CudaGraphs`` on a GPU (tests emulate it on the CPU)."""

    def warmup(self) -> contextlib.AbstractContextManager: ...
    def capture(self, step: Callable[[], T]) -> tuple[T, Callable[[], None]]: ...


class CudaGraphs:
    """torch.cuda.graph capture, warm-up on a side stream, as torch's whole-network capture example."""

    def __init__(self, device: torch.device) -> None:
        self.side = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)

    def capture(self, step: Callable[[], T]) -> tuple[T, Callable[[], None]]:
        """Record ``step`` (nothing runs) and return its output tensors and the replay. Thread-local capture:
        the DataLoader's pin-memory thread keeps allocating page-locked batches meanwhile, which a global
        capture would count as an illegal call and abort."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = step()
        return out, graph.replay


class CapturedStep:
    """``Trainer.run_step`` for ``train.cuda_graph``: warm-up steps, one capture, replays."""

    def __init__(self, trainer: Trainer, backend: GraphBackend | None = None) -> None:
        cfg, device = trainer.cfg, next(trainer.net.parameters()).device
        if backend is None and device.type != "cuda":
            raise ValueError(f"train.cuda_graph needs the network on a CUDA device, it is on {device} "
                             "(scaling.use_gpu: true)")
        if not trainer.skips_on_device:
            raise ValueError("train.cuda_graph needs the fused SGD, which leaves a non-finite step out on the device")
        perturbing = [type(h).__name__ for h in trainer.hooks if type(h).perturb is not Hook.perturb]
        if perturbing:
            raise ValueError(f"train.cuda_graph cannot run with hooks that perturb the step ({', '.join(perturbing)})")
        self.trainer, self.backend = trainer, backend or CudaGraphs(device)
        self.progress = torch.zeros((), device=device)
        self.sigma2 = torch.ones((), device=device)
        self.eq2_on = torch.zeros((), device=device)
        # eq. 2 is part of the captured step of every run that has it; before the first K-means its centres are
        # zeros and its term is multiplied by 0
        self.centres = (torch.zeros(cfg.clustering.k, cfg.model.a_dim, device=device) if cfg.clustering.weight
                        else None)
        self._centre_source: torch.Tensor | None = None
        self.warmed_up = 0
        self.batch: dict[str, Any] | None = None  # the static batch the graph reads
        self.outputs: tuple | None = None  # what the graph writes, the same tensors at every replay
        self.replay: Callable[[], None] | None = None
        # several processes: the gradients as views of one buffer reduced between two graphs (module docstring)
        self.flat_grads = flat_gradients(trainer.net) if trainer.world.size > 1 else None
        self.finite = torch.ones(1, device=device)  # every process's flag, reduced (several processes)
        self.replay_update: Callable[[], None] | None = None
        if trainer.world.size > 1:
            with torch.no_grad():
                for tensor in (*trainer.net.parameters(), *trainer.net.buffers()):
                    trainer.world.broadcast_(tensor)  # rank 0's start, as DDP's constructor

    def run(self, batch: dict[str, Any]) -> StepResult:
        trainer, index = self.trainer, self.trainer.step
        tau = trainer.begin_step()
        self._write_schedule()
        if self.replay is None and self.warmed_up < WARMUP_STEPS:
            with self.backend.warmup():
                outputs = self._step(batch)
                if self.flat_grads is not None:
                    self._reduce()
                    self._update()
            self.warmed_up += 1
        else:
            if self.replay is None:
                self.batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                self.outputs, self.replay = self.backend.capture(lambda: self._step(self.batch))
            self._copy_batch(batch)
            self.replay()
            if self.flat_grads is not None:
                self._reduce()
                if self.replay_update is None:
                    _, self.replay_update = self.backend.capture(self._update)
                self.replay_update()
            outputs = self.outputs
        trainer.step += 1
        trainer.end_device_step()
        out, terms, ratio, acts = outputs
        return StepResult(index, batch, out, terms, ratio, acts, tau)

    def _step(self, batch: dict[str, Any]) -> tuple:
        """What is captured: the step computed from the buffers, and its update (no host read). Several
        processes: up to the gradients of this process's share of the mean loss (the update is ``_update``)."""
        trainer, split = self.trainer, self.flat_grads is not None
        out, terms, ratio, acts, finite = trainer.compute(batch, self.progress, self.centres, self.sigma2,
                                                          clustering_on=self.eq2_on, autocast_cache=False,
                                                          collective=not split)
        if not split:
            trainer.apply_unless(finite, terms.total)
            return out, terms, ratio, acts
        self.flat_grads.zero_()  # the .grad views: the backward accumulates into them in place
        trainer.precision.backward(terms.total / trainer.world.size)
        self.finite.copy_(finite)
        return out, terms, ratio, acts

    def _reduce(self) -> None:
        """Between the two graphs: the mean gradient and whether every process was finite (two all-reduces,
        queued on the device)."""
        self.trainer.world.all_reduce_(self.flat_grads, "sum")
        self.trainer.world.all_reduce_(self.finite, "min")

    def _update(self) -> None:
        self.trainer.update_unless(self.finite)

    def _write_schedule(self) -> None:
        """The values a step reads from the host side, written into the buffers the graph reads."""
        trainer = self.trainer
        self.progress.fill_(trainer.progress)
        if self.centres is None:
            return
        state = trainer.centres
        if not state.usable():
            self.eq2_on.fill_(0.0)
            return
        if state.centres is not self._centre_source:  # a new version: copied once, not at every step
            if tuple(state.centres.shape) != tuple(self.centres.shape):
                raise ValueError(f"centre version {state.version} has shape {tuple(state.centres.shape)}; the "
                                 f"captured step was built for clustering.k x A(x) = {tuple(self.centres.shape)}")
            self.centres.copy_(state.centres)
            self._centre_source = state.centres
        self.sigma2.fill_(state.sigma2)
        self.eq2_on.fill_(1.0)

    def _copy_batch(self, batch: dict[str, Any]) -> None:
        assert self.batch is not None
        for key, static in self.batch.items():
            if not isinstance(static, torch.Tensor):
                self.batch[key] = batch[key]  # host-side values (sample ids) the hooks read
                continue
            if batch[key].shape != static.shape:
                raise ValueError(f"train.cuda_graph: batch {key!r} has shape {tuple(batch[key].shape)}, the "
                                 f"captured step {tuple(static.shape)} (every batch must have one shape)")
            static.copy_(batch[key], non_blocking=True)


def flat_gradients(net: torch.nn.Module) -> torch.Tensor:
    """One buffer holding every parameter's gradient, each ``.grad`` a view of it with its parameter's layout
    (channels_last weights included), so that one all-reduce covers them all and no copy is needed."""
    params = {name: p for name, p in net.named_parameters() if p.requires_grad}
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1:
        raise ValueError(f"train.cuda_graph with several processes needs parameters of one dtype, got {dtypes}")
    first = next(iter(params.values()))
    flat = torch.zeros(sum(p.numel() for p in params.values()), dtype=first.dtype, device=first.device)
    offset = 0
    for name, p in params.items():
        if not (p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))):
            raise ValueError(f"train.cuda_graph with several processes: parameter {name} {tuple(p.shape)} has "
                             f"strides {p.stride()}, neither contiguous nor channels_last")
        p.grad = flat[offset:offset + p.numel()].as_strided(p.shape, p.stride())
        offset += p.numel()
    return flat
