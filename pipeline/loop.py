"""The training loop in plain PyTorch: a ``Trainer`` whose ``run_step`` is one step, and hooks for the rest.

One step (``Trainer.run_step``): the task's forward, DR's budget loss, DivDR's clustering loss against the
current centres, DRNets' resource loss (DivDR eq. 3), a check that the loss and A(x) are finite on every
process (a non-finite step is skipped, too many in a row stop the run), backward, gradient clipping, SGD,
the poly schedule. With a fused optimizer (on a GPU) the check never waits on the device: the fused SGD
kernel skips the update itself (its ``found_inf``) and the skips are counted on the device and read every
``train.log_every`` steps (``SkipCounter``). Everything else is a ``Hook`` called around the step, in the order given:

- the centres (K-means over A(x), switching to new centres) - ``pipeline.worker`` (Ray's centroid store)
  or ``pipeline.local`` (the same store logic in-process);
- streaming activations, faults for tests, metrics and progress, periodic evaluation, checkpoints.

Who runs the loop says how processes talk (``World``): ``pipeline.worker`` is the Ray Train glue (DDP,
the store actor, checkpoints through ``ray.train.report``); ``pipeline.local`` runs the same loop in one
process with no Ray (``pipeline/train.py --local``); the benchmarks drive ``run_step`` directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from divdr.cells import graphs_compiled_afresh, load_compile_cache, save_compile_cache
from divdr.flops import budget_ratio, expected_cost
from divdr.gates import anneal_temperature, gate_parameters, tempered_gates
from divdr.losses import LossTerms, total_loss
from pipeline.config import ExperimentConfig, TrainConfig
from pipeline.schedule import kmeans_trigger_steps

if TYPE_CHECKING:  # the tasks import the COCO readers (pycocotools); the loop itself needs torch only
    from pipeline.tasks import TaskStep, TrainingTask

log = logging.getLogger(__name__)

MAX_SKIPPED_STEPS = 5  # consecutive non-finite steps tolerated before the run stops


def finite_flag(value: torch.Tensor) -> torch.Tensor:
    """1.0 where every element of ``value`` is finite, else 0.0: a one-element tensor on its device."""
    return torch.isfinite(value).all().float().view(1)


def build_optimizer(net: torch.nn.Module, train: TrainConfig, fused: bool | None = None) -> torch.optim.SGD:
    """SGD as the DR paper; the gates in a group of their own at ``lr x train.gate_lr_scale``.

    On a GPU (``fused=None``) the fused implementation (one kernel for every parameter, not one per
    parameter: Layer16 has ~1,100 parameter tensors); elsewhere torch's default (foreach where it can).
    With ``train.cuda_graph`` each group's learning rate is a tensor on the parameters' device, which the
    poly schedule overwrites in place: a captured step reads the current rate, not the one of its capture."""
    gates = {id(p) for p in gate_parameters(net)}
    rest = [p for p in net.parameters() if id(p) not in gates]
    groups: list[dict] = [{"params": rest}]
    if gates:
        groups.append({"params": [p for p in net.parameters() if id(p) in gates],
                       "lr": train.lr * train.gate_lr_scale})
    if fused is None:
        fused = all(p.device.type == "cuda" for p in net.parameters()) or None
    optimizer = torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                                fused=fused)
    if train.cuda_graph:
        tensor_learning_rates(optimizer, next(net.parameters()).device)
    return optimizer


def tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Every group's ``lr`` (and the scheduler's ``initial_lr``, if set) as a 0-d tensor on ``device``."""
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] = torch.tensor(float(group[key]), dtype=torch.float32, device=device)


def float_learning_rates(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict with plain-float learning rates (checkpoints read the same with or
    without ``train.cuda_graph``)."""
    return {**state, "param_groups": [plain_floats(group) for group in state["param_groups"]]}


def plain_floats(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its 0-d tensors, alone or in lists (tensor learning rates), as floats."""
    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            return float(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {key: plain(value) for key, value in state.items()}


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``train.precision``: the forward under autocast (bf16 / fp16) or not (fp32); fp16 scales the loss
    (torch.amp.GradScaler) so small gradients do not flush to zero. The losses of DR and DivDR are computed
    in float32 whatever the forward's precision (``divdr.flops``, ``divdr.losses``)."""

    def __init__(self, precision: str, device_type: str) -> None:
        self.dtype = AUTOCAST_DTYPES.get(precision)
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        """The forward's autocast; ``cache=False`` under CUDA graph capture, which autocast's weight cache
        would break (torch.cuda.graph's documented requirement)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=cache)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)  # skipped if the scaled gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()


def poly_schedule(total: int, power: float) -> Callable[[int], float]:
    """The DR paper's poly learning-rate factor at a step: (1 - step / total) ** power."""
    return lambda step: max(0.0, 1.0 - step / total) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(train.steps, train.poly_power))


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """The indices of ``n`` items a process evaluates: every ``world_size``-th from ``rank``."""
    return list(range(rank, n, world_size))


class World(Protocol):
    """How the processes training one model talk: rank 0 of ``size`` owns logging and checkpoints."""

    rank: int
    size: int

    def finite_flag(self, value: torch.Tensor) -> torch.Tensor: ...
    def broadcast(self, obj: Any) -> Any: ...
    def gather(self, obj: Any) -> list[Any]: ...
    def sync_buffers(self, net: torch.nn.Module) -> None: ...
    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> None: ...
    def broadcast_(self, tensor: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class SingleProcess:
    """The world of one process (``pipeline/train.py --local``, benchmarks)."""

    rank: int = 0
    size: int = 1

    def finite_flag(self, value: torch.Tensor) -> torch.Tensor:
        return finite_flag(value)

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def sync_buffers(self, net: torch.nn.Module) -> None:
        return None

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> None:
        return None

    def broadcast_(self, tensor: torch.Tensor) -> None:
        return None


@dataclass(frozen=True)
class ProcessGroup:
    """Processes talking through torch.distributed's default group (initialised by whoever started them: Ray
    Train for ``pipeline.worker``, a test directly)."""

    rank: int
    size: int

    def finite_flag(self, value: torch.Tensor) -> torch.Tensor:
        flag = finite_flag(value)  # on value's device: NCCL reduces CUDA tensors only
        self.all_reduce_(flag, "min")  # queued on the device: nothing waits here
        return flag

    def broadcast(self, obj: Any) -> Any:
        if self.size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sync_buffers(self, net: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank: the model rank 0 saves."""
        with torch.no_grad():
            for buffer in net.buffers():
                self.broadcast_(buffer)

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> None:
        if self.size > 1:
            ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}
            torch.distributed.all_reduce(tensor, op=ops[op])

    def broadcast_(self, tensor: torch.Tensor) -> None:
        if self.size > 1:
            torch.distributed.broadcast(tensor, src=0)


@dataclass
class CentreState:
    """The centres every process currently uses in the clustering loss (version 0 = none yet)."""

    version: int = 0
    centres: torch.Tensor | None = None
    sigma2: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # the partition that goes with the centres, cluster per sample id (-1: unseen); only with
    # clustering.membership: kmeans (the store sends none otherwise)
    assignments: torch.Tensor | None = None

    def usable(self) -> bool:
        return self.centres is not None and self.sigma2 is not None and self.sigma2 > 0

    def members(self, sample_ids: Any) -> torch.Tensor | None:
        """The batch's clusters at the last K-means (clustering.membership: kmeans), -1 where unseen."""
        if self.assignments is None:
            return None
        ids = torch.as_tensor(np.asarray(sample_ids, dtype=np.int64))
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self.assignments)):
            raise ValueError(f"sample ids outside the centroid store's [0, {len(self.assignments)}): "
                             f"{ids.min().item()}..{ids.max().item()}")
        return self.assignments[ids]

    def adopt(self, payload: dict[str, Any], step: int) -> None:
        """Switch to a centre version published by the store (``centres_payload``)."""
        self.version = payload["version"]
        self.centres = torch.tensor(np.array(payload["centres"], dtype=np.float32))
        self.sigma2 = float(payload["sigma2"])
        if payload.get("assignments") is not None:
            self.assignments = torch.as_tensor(np.asarray(payload["assignments"], dtype=np.int64))
        self.history.append({**payload["stats"], "switch_step": step})


@dataclass
class StepResult:
    """What one trained step leaves for the hooks. ``index`` is the step's own (0-based) index;
    ``Trainer.step`` has already moved past it."""

    index: int
    batch: dict[str, Any]
    out: TaskStep
    terms: LossTerms
    ratio: torch.Tensor
    activations: torch.Tensor
    tau: float


class SkipCounter:
    """Non-finite (skipped) steps counted on the training device, so that counting never waits on it:
    the current run of skips, the longest run since the last read, and the total since the last read."""

    def __init__(self, device: torch.device) -> None:
        self.counts = torch.zeros(3, device=device)  # in a row, longest in a row, total

    def count(self, finite: torch.Tensor) -> None:
        # in place: a captured step (train.cuda_graph) keeps counting into the same memory at every replay
        skipped = 1.0 - finite.view(())
        in_a_row = (self.counts[0] + 1.0) * skipped
        self.counts.copy_(torch.stack([in_a_row, torch.maximum(self.counts[1], in_a_row), self.counts[2] + skipped]))

    def read(self) -> tuple[int, int, int]:
        """(in a row now, longest in a row, total) since the last read; one host synchronisation."""
        in_a_row, longest, total = (int(v) for v in self.counts.tolist())
        self.counts.copy_(torch.stack([self.counts[0], self.counts[0], torch.zeros_like(self.counts[2])]))
        return in_a_row, longest, total


class RunningStats:
    """BatchNorm's running statistics kept through a refused step. A training forward updates them in place, so
    a batch with a NaN or an infinity (a bad pixel, an overflow) would leave NaN statistics in every later
    evaluation and in the saved model, though the step itself is refused. Saved before each forward and put
    back where the step is not finite, on the device (no host read; a captured step does it inside its graph):
    three multi-tensor copies and one select per step, whatever the number of BatchNorm layers."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.buffers = [b for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var) if b is not None]
        self.saved: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # per dtype and device
        self.current: list[tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = []
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for buffer in self.buffers:
            groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
        for members in groups.values():
            saved, current = (torch.empty(sum(b.numel() for b in members), dtype=members[0].dtype,
                                          device=members[0].device) for _ in range(2))
            self.saved.append((saved, _views(saved, members)))
            # written through .data: the backward to come holds these buffers (BatchNorm's backward takes them,
            # unused in training) and would refuse tensors changed in place since its forward
            self.current.append((current, _views(current, members), [b.data for b in members]))

    def save(self) -> None:
        for (_, views), (_, _, members) in zip(self.saved, self.current, strict=True):
            torch._foreach_copy_(views, members)

    def restore_unless(self, finite: torch.Tensor) -> None:
        """The saved statistics back where ``finite`` is 0 (NaN-proof: a select, not arithmetic)."""
        keep = finite.view(()).bool()
        for (saved, _), (current, views, members) in zip(self.saved, self.current, strict=True):
            torch._foreach_copy_(views, members)
            current.copy_(torch.where(keep, current, saved))
            torch._foreach_copy_(members, views)


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for tensor in like:
        views.append(flat[offset:offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return views


class PendingActivations:
    """Streaming mode's A(x), kept on the training device and brought to the host together: one host
    synchronisation per ``store.send_every`` steps instead of one per step. Ready at every
    ``send_every``-th step, at the step before each K-means trigger (the store clusters what it has by
    then) and at the last step."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.send_every = cfg.store.send_every
        triggers = kmeans_trigger_steps(cfg.train.steps, cfg.clustering.update_every, cfg.clustering.update_every_final)
        self.due_at = {t - 1 for t in triggers} | {cfg.train.steps - 1}  # step indices (0-based) after which to send
        self.ids: list[Any] = []
        self.acts: list[torch.Tensor] = []

    def add(self, result: StepResult) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Keep ``result``'s A(x); when a send is due, (its step index, sample ids, A(x) rows) on the host."""
        self.ids.extend(result.batch["sample_id"])
        self.acts.append(result.activations.detach().clone())  # a captured step rewrites its A(x) at each replay
        if len(self.acts) < self.send_every and result.index not in self.due_at:
            return None
        return self.take(result.index)

    def take(self, index: int) -> tuple[int, np.ndarray, np.ndarray] | None:
        """What is pending, stamped with step ``index`` (None if nothing is). Also for a step left out on the
        host (non-finite), which adds nothing: at a step in ``due_at`` the rank must still tell the store it
        is past it (with these rows, or a mark where there are none), or the store waits for its next send."""
        if not self.acts:
            return None
        sent = (index, np.asarray(self.ids, dtype=np.int64), torch.cat(self.acts).float().cpu().numpy())
        self.ids, self.acts = [], []
        return sent

    def after_skip(self, index: int, send: Callable[..., None], mark: Callable[[int], None]) -> None:
        """Step ``index`` was left out on the host: at a due step, ``send`` what is pending or ``mark`` the step."""
        if index in self.due_at:
            sent = self.take(index)
            if sent is not None:
                send(*sent)
            else:
                mark(index)


class Hook:
    """A part of training around the step; override what is needed. Hooks run in the order given to
    the trainer: ``before_step`` before each step, ``perturb`` between the forward and the losses
    (fault injection), ``after_step`` after each step that was trained (not after a skipped one, except
    where the skip is decided on the device: ``Trainer.skips_on_device``), ``after_skip`` after one left out."""

    def before_step(self, trainer: Trainer, batch: dict[str, Any]) -> None:
        return None

    def perturb(self, trainer: Trainer, task_loss: torch.Tensor, activations: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return task_loss, activations

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        return None

    def after_skip(self, trainer: Trainer, index: int) -> None:
        """After step ``index`` was left out on the host (a non-finite loss or A(x)): no ``after_step``."""
        return None


class Trainer:
    """DR / DivDR training of ``net`` (``model`` is what runs the forward: ``net`` itself, or its
    DDP wrapper) on ``task``'s batches. With ``train.cuda_graph`` the step is captured and replayed
    (``pipeline.cuda_graph``; ``graph_backend`` stands in for CUDA graphs in tests)."""

    def __init__(self, cfg: ExperimentConfig, task: TrainingTask, net: torch.nn.Module,
                 model: torch.nn.Module | None = None, world: World | None = None,
                 hooks: Sequence[Hook] = (), centres: CentreState | None = None, graph_backend: Any = None) -> None:
        self.cfg, self.task, self.net = cfg, task, net
        self.model = model if model is not None else net
        self.world = world or SingleProcess()
        self.hooks = list(hooks)
        self.optimizer = build_optimizer(net, cfg.train)
        self.precision = Precision(cfg.train.precision, next(net.parameters()).device.type)
        self._device_centres: tuple[Any, torch.Tensor | None] = (None, None)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.centres = centres or CentreState()
        self.step = 0  # steps done (a restored trainer starts where its checkpoint stopped)
        self.start_step = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        # a fused SGD skips a non-finite step on the device; GradScaler (fp16) sets the same flag itself
        self.skips_on_device = bool(self.optimizer.defaults.get("fused")) and self.precision.scaler is None
        self._skips: SkipCounter | None = None
        self.running_stats = RunningStats(net)
        self.tempered = tempered_gates(net)  # found once (module walks at every step cost milliseconds)
        self.captured = None
        if cfg.train.cuda_graph:
            from pipeline.cuda_graph import CapturedStep  # imports this module

            self.captured = CapturedStep(self, graph_backend)

    @property
    def progress(self) -> float:
        return self.step / self.cfg.train.steps

    def begin_step(self) -> float:
        """Before every step: training mode (evaluations leave the network in eval mode) and the gates'
        temperature; returns tau. Host work a CUDA graph's replay waits on, so no walk over the modules when
        nothing changed: ``model.train()`` visits Layer16's ~2,000 modules (~10 ms on this project's CPU, the
        pipeline's captured step's gap to the library's on an H200)."""
        if not (self.model.training and self.net.training):
            self.model.train()
        return anneal_temperature(self.tempered, self.progress, self.cfg.model.gate.temperature)

    def _centres_on(self, device: torch.device) -> torch.Tensor:
        """The current centres on the training device, copied once per centre version, not at every step
        (a host-to-device copy would synchronise a GPU step)."""
        key = (id(self.centres.centres), device)
        if self._device_centres[0] != key:
            self._device_centres = (key, self.centres.centres.to(device))
        return self._device_centres[1]

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.train.steps

    def run_step(self, batch: dict[str, Any]) -> StepResult | None:
        """One training step on ``batch``; None if it was skipped (a non-finite loss or A(x) anywhere).
        Where skips are decided on the device (a fused optimizer), every step returns its result, and a
        skipped step is one whose update the optimizer left out."""
        if self.captured is not None:
            return self.captured.run(batch)
        cfg, index = self.cfg, self.step
        tau = self.begin_step()
        centres = self.centres
        usable = centres.usable()
        members = centres.members(batch["sample_id"]) if usable and cfg.clustering.membership == "kmeans" else None
        out, terms, ratio, acts, finite = self.compute(
            batch, self.progress, self._centres_on(next(self.net.parameters()).device) if usable else None,
            centres.sigma2, members=members)
        self.step += 1
        if self.skips_on_device:
            self.apply_unless(finite, terms.total)
            self.end_device_step()
            return StepResult(index, batch, out, terms, ratio, acts, tau)
        if not bool(finite):
            self._skip(index, terms)
            return None
        self.skipped_in_a_row = 0
        self.apply(terms.total)
        self.scheduler.step()
        return StepResult(index, batch, out, terms, ratio, acts, tau)

    def compute(self, batch: dict[str, Any], progress: float | torch.Tensor, centres: torch.Tensor | None,
                sigma2: float | torch.Tensor | None, clustering_on: float | torch.Tensor = 1.0,
                autocast_cache: bool = True, members: torch.Tensor | None = None, collective: bool = True,
                ) -> tuple[TaskStep, LossTerms, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a step computes before its update, from the values given (a captured step gives the
        schedule's progress, the centres, sigma^2 and whether eq. 2 is on as device buffers): the forward,
        the losses and whether they and A(x) are finite on every process. ``members``: the batch's clusters
        at the last K-means (clustering.membership: kmeans). ``collective=False``: no communication at all
        (the network itself, not its DDP wrapper; finite on this process): what a CUDA graph of several
        processes captures (``pipeline.cuda_graph``), which reduces the gradients and the flag itself."""
        cfg = self.cfg
        self.running_stats.save()
        with self.precision.autocast(autocast_cache):
            out = self.task.forward(self.model if collective else self.net, batch)
        ratio = budget_ratio(out.backbone.gates, out.table)
        task_loss, acts = out.loss, out.backbone.activations
        for hook in self.hooks:
            task_loss, acts = hook.perturb(self, task_loss, acts)
        terms = total_loss(task_loss, cost_ratio=ratio, progress=progress, budget=cfg.budget,
                           clustering=cfg.clustering, activations=acts, centres=centres, sigma2=sigma2,
                           clustering_on=clustering_on, resource=cfg.resource, correct=out.correct,
                           members=members)
        checked = torch.cat([terms.total.detach().view(1), acts.detach().flatten()])
        finite = self.world.finite_flag(checked) if collective else finite_flag(checked)
        self.running_stats.restore_unless(finite)
        return out, terms, ratio, acts, finite

    def apply(self, loss: torch.Tensor) -> None:
        """Backward, gradient clipping and the optimizer's update (the schedule steps after it)."""
        self.backward(loss)
        self.update()

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)

    def update(self) -> None:
        """Gradient clipping and the optimizer's update, from the gradients in ``.grad``."""
        self.precision.unscale(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.precision.step(self.optimizer)

    def apply_unless(self, finite: torch.Tensor, loss: torch.Tensor) -> None:
        """The update with no host read: a non-finite step's gradients are computed but the fused SGD
        leaves the weights and momenta as they were (``found_inf``); the skip is counted on the device."""
        self.backward(loss)
        self.update_unless(finite)

    def update_unless(self, finite: torch.Tensor) -> None:
        """``update`` left out by the fused SGD where ``finite`` is 0, and the skip counted on the device."""
        if self._skips is None:
            self._skips = SkipCounter(finite.device)
        self.optimizer.found_inf = 1.0 - finite
        self.update()
        self._skips.count(finite)

    def end_device_step(self) -> None:
        """After a step whose skip the device decided: the schedule, and the skips read every
        ``train.log_every`` steps and at the end (``check_skips``)."""
        self.scheduler.step()
        if self.step % self.cfg.train.log_every == 0 or self.done:
            self.check_skips()

    def check_skips(self) -> None:
        """Bring the device's skip count to the host; too many non-finite steps in a row stop the run."""
        if self._skips is None:
            return
        in_a_row, longest, total = self._skips.read()
        self.skipped_in_a_row, self.skipped_total = in_a_row, self.skipped_total + total
        if longest > MAX_SKIPPED_STEPS:
            raise FloatingPointError(
                f"rank {self.world.rank}: loss or gate activations non-finite for {longest} consecutive steps "
                f"(by step {self.step}); lower train.lr or check the data")

    def _skip(self, index: int, terms: LossTerms) -> None:
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        if self.skipped_in_a_row > MAX_SKIPPED_STEPS:
            raise FloatingPointError(
                f"rank {self.world.rank}: loss or gate activations non-finite for {self.skipped_in_a_row} "
                f"consecutive steps (step {index}, task {terms.task.item():.4g}, total {terms.total.item():.4g}); "
                "lower train.lr or check the data")

    def fit(self, loader: Iterable[dict[str, Any]], sampler: Any = None) -> None:
        """Train until ``train.steps``, epoch after epoch of ``loader`` (``sampler.set_epoch`` each epoch)."""
        epoch = 0
        while not self.done:
            if sampler is not None:
                sampler.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                if self.done:
                    break
                for hook in self.hooks:
                    hook.before_step(self, batch)
                result = self.run_step(batch)
                if result is None:
                    for hook in self.hooks:
                        hook.after_skip(self, self.step - 1)
                    continue
                for hook in self.hooks:
                    hook.after_step(self, result)

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds (tensors and plain values: loads with ``weights_only=True``)."""
        return {"model": self.net.state_dict(), "optimizer": float_learning_rates(self.optimizer.state_dict()),
                "scheduler": plain_floats(self.scheduler.state_dict()), "step": self.step,
                "centre_version": self.centres.version, "centres": self.centres.centres,
                "sigma2": self.centres.sigma2, "centre_history": self.centres.history,
                "centre_assignments": self.centres.assignments}

    def load_state(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.cfg.train.cuda_graph:  # the checkpoint's rates are floats (float_learning_rates)
            tensor_learning_rates(self.optimizer, next(self.net.parameters()).device)
        self.centres.version = state["centre_version"]
        self.centres.centres = state["centres"]
        self.centres.sigma2 = state["sigma2"]
        self.centres.history = state["centre_history"]
        self.centres.assignments = state.get("centre_assignments")  # older checkpoints: none
        self.step = self.start_step = int(state["step"])


# ---- hooks every runner uses ---------------------------------------------------------------------

class MetricsSink(Protocol):
    """Where rank 0's metrics go: ``pipeline.tracking.Tracker`` (in-process, or its Ray actor behind an adapter)."""

    def metrics(self, values: dict[str, float], step: int) -> None: ...
    def progress(self, line: str) -> None: ...
    def final(self, summary: dict[str, Any], artifacts: dict[str, bytes]) -> None: ...


def progress_line(step: int, first_step: int, total: int, m: dict[str, float], elapsed: float) -> str:
    eta = elapsed / max(step - first_step, 1) * (total - step)
    return (f"step {step}/{total} | loss {m['loss/total']:.3f} (task {m['loss/task']:.3f}, budget "
            f"{m['loss/budget']:.3f}, clustering {m['loss/clustering']:.3f}) | cost {m['cost/ratio']:.2f} | "
            f"centres v{m['centre_version']} | {m['images_per_s']:.1f} img/s | ETA {eta / 60:.1f} min")


class LogMetrics(Hook):
    """Every ``train.log_every`` steps: the losses, cost, learning rate and throughput to ``sink``
    (rank 0; None elsewhere) and a progress line. ``last`` keeps the latest values for checkpoints."""

    def __init__(self, sink: MetricsSink | None) -> None:
        self.sink = sink
        self.last: dict[str, float] = {}
        self.seen_images = 0
        self.t_last = self.t_start = time.perf_counter()
        self.first_step: int | None = None

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        if self.first_step is None:
            self.first_step = trainer.start_step
        self.seen_images += len(result.batch["sample_id"]) * trainer.world.size
        step = trainer.step
        if step % trainer.cfg.train.log_every or self.sink is None:
            return
        now = time.perf_counter()
        out = result.out
        self.last = {
            "loss/total": result.terms.total.item(), "loss/task": result.terms.task.item(),
            "loss/budget": result.terms.budget.item(), "loss/clustering": result.terms.clustering.item(),
            "loss/resource": result.terms.resource.item(), "gate/tau": result.tau,
            "cost/ratio": result.ratio.mean().item(),
            "cost/expected_gflops": float(expected_cost(out.backbone.gates.detach(), out.table).mean()) / 1e9,
            "lr": float(trainer.scheduler.get_last_lr()[0]),
            "images_per_s": self.seen_images / max(now - self.t_last, 1e-9),
            "centre_version": trainer.centres.version,
            **{name: value.item() for name, value in out.parts.items()},
        }
        self.sink.metrics(self.last, step)
        self.sink.progress(progress_line(step, self.first_step, trainer.cfg.train.steps, self.last, now - self.t_start))
        self.seen_images, self.t_last = 0, now


def compile_cache_file(cfg: ExperimentConfig, device: torch.device) -> Path:
    """The file in ``train.compile_cache`` (a folder) for this run's compiled cells: one per network, task, input
    size, precision, memory format, torch version and device model (what the compiled graphs depend on), so that
    runs of different networks sharing the folder never replace each other's file."""
    train = cfg.train
    key = {"model": dataclasses.asdict(cfg.model), "task": cfg.task, "crop": train.crop, "batch": train.batch_size,
           "precision": train.precision, "channels_last": train.channels_last, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(train.compile_cache) / f"cells-{digest}.cache"


class Compilation(Hook):
    """``train.compile``: the first step compiles every kind of cell. Before it, this network's file in
    ``train.compile_cache`` (if set) is loaded; after it, rank 0 writes the file if this process compiled a graph
    the file lacked (or there was none), and reports the first step's seconds and how many graphs were compiled
    rather than found in a cache."""

    def __init__(self, sink: MetricsSink | None) -> None:
        self.sink = sink
        self.cache: Path | None = None
        self.loaded = False
        self.started: float | None = None
        self.compiled_before = 0  # the process's count before this run (a process may train several runs)
        self.reported = False

    def before_step(self, trainer: Trainer, batch: dict[str, Any]) -> None:
        if self.started is None:
            if trainer.cfg.train.compile_cache:
                self.cache = compile_cache_file(trainer.cfg, next(trainer.net.parameters()).device)
                self.loaded = load_compile_cache(self.cache)
            self.compiled_before = graphs_compiled_afresh()
            self.started = time.perf_counter()

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        if self.reported or self.started is None:
            return
        self.reported = True
        seconds, afresh = time.perf_counter() - self.started, graphs_compiled_afresh() - self.compiled_before
        if trainer.world.rank != 0:
            return
        if self.cache is not None and (afresh or not self.loaded):
            size = save_compile_cache(self.cache)
            log.info("compile cache: %d bytes written to %s", size, self.cache)
        line = (f"step {trainer.step} compiled the cells in {seconds:.1f} s: {afresh} graphs compiled afresh"
                f"{f', the rest from {self.cache}' if self.loaded else ''}")
        if self.sink is None:
            log.info(line)
            return
        self.sink.progress(line)
        self.sink.metrics({"compile/first_step_s": seconds, "compile/graphs_compiled": afresh,
                           "compile/cache_loaded": float(self.loaded)}, trainer.step)


class PeriodicEvaluation(Hook):
    """Val scores (mIoU, or COCO AP) and real GFLOPs every ``train.eval_every`` steps, sharded over ranks;
    on a controlled study also the learning curves of its subsets (``pipeline.analysis.routing_curve``)."""

    def __init__(self, sink: MetricsSink | None) -> None:
        self.sink = sink

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        every, step = trainer.cfg.train.eval_every, trainer.step
        if not every or step % every or trainer.done:
            return
        world, task = trainer.world, trainer.task
        world.sync_buffers(trainer.net)  # every rank evaluates the model a checkpoint holds (rank 0's)
        part = task.inference(trainer.net, "val", shard(task.split_size("val"), world.rank, world.size))
        merged = task.merge(world.gather(part))
        if self.sink is not None:
            from pipeline.analysis import routing_curve  # plotting libraries: rank 0 only

            centres = trainer.centres.centres.numpy() if trainer.centres.usable() else None
            self.sink.metrics({**task.val_metrics(merged), **routing_curve(task.routing(merged), centres)}, step)


class Checkpoints(Hook):
    """Every ``train.checkpoint_every`` steps and at the end: ``save(trainer, metrics)``."""

    def __init__(self, save: Callable[[Trainer, dict[str, float]], None], log: LogMetrics | None = None) -> None:
        self.save, self.log = save, log

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        step = trainer.step
        if step % trainer.cfg.train.checkpoint_every == 0 or trainer.done:
            self.save(trainer, self.log.last if self.log is not None else {})


def kmeans_metrics(stats: dict[str, Any], version: int) -> dict[str, float]:
    """A centre version's K-means statistics as metrics (``kmeans/...``)."""
    return {f"kmeans/{k}": v for k, v in stats.items()
            if isinstance(v, (int, float)) and k not in ("version", "trigger_step")} | {"kmeans/version": version}


def final_evaluation(trainer: Trainer, store_status: dict[str, Any], sink: MetricsSink | None) -> dict[str, Any]:
    """Val scores (mIoU, or COCO AP) and real GFLOPs; then the clusters measured the same way for DR and
    DivDR: eval-mode A(x) of the training images clustered (warm-started from the last centres), val
    images assigned to their nearest centre (Inter, Intra, sizes, subset recovery). Sharded over ranks;
    the summary on rank 0 (``{}`` elsewhere), sent to ``sink`` with the run's artifacts."""
    world, task, net = trainer.world, trainer.task, trainer.net
    # BatchNorm statistics are per rank (each saw its own batches; DDP only broadcasts rank 0's at the
    # start of each forward): every rank takes rank 0's, so the scores are those of the model saved
    world.sync_buffers(net)
    train_part = task.inference(net, "train", shard(task.split_size("train"), world.rank, world.size), score=False)
    val_part = task.inference(net, "val", shard(task.split_size("val"), world.rank, world.size))
    train_parts, val_parts = world.gather(train_part), world.gather(val_part)
    if world.rank != 0:
        return {}
    progress = {"step": trainer.step, "start_step": trainer.start_step, "skipped_steps": trainer.skipped_total}
    summary, artifacts = task.summarize(trainer.cfg, task.merge(train_parts), task.merge(val_parts),
                                        trainer.centres, store_status, net, progress)
    if sink is not None:
        sink.final(summary, artifacts)
    return summary
