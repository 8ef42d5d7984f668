"""``train_loop_per_worker``: DDP training of a DR network with DivDR's clustering loss.

One loop for every task (segmentation, detection, instance segmentation): what differs (data, model,
task loss, inference, scores) comes from ``pipeline.tasks``.

Each Ray Train worker trains on its shard, streams its batches' A(x) to the centroid store,
switches to new centres at the steps the schedule fixes (rank 0 fetches, then broadcasts), checkpoints
through ``ray.train.report``, and at the end evaluates on the val split.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from divdr.gates import set_temperature
from pipeline.config import ExperimentConfig
from pipeline.faults import FaultPlan
from pipeline.loop import (
    Checkpoints,
    Compilation,
    Hook,
    LogMetrics,
    MetricsSink,
    PendingActivations,
    PeriodicEvaluation,
    ProcessGroup,
    StepResult,
    Trainer,
    final_evaluation,
    kmeans_metrics,
    shard,
)
from pipeline.schedule import kmeans_trigger_steps, switch_step
from pipeline.tasks import limit, make_task
from pipeline.train_data import train_loader

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
STORE_TIMEOUT_S = 60.0  # how long rank 0 waits for a due centre version before training on
SEND_TIMEOUT_S = 30.0  # how long a worker waits for a slot among its in-flight sends
REFRESH_CHUNK = 64  # activations per message in refresh mode


class ActivationSender:
    """Fire-and-forget ``ingest`` calls with at most ``limit`` unanswered; a dead store is survived."""

    def __init__(self, store: Any, rank: int, limit: int, float16: bool) -> None:
        self.store, self.rank, self.limit = store, rank, limit
        self.dtype = np.float16 if float16 else np.float32
        self.in_flight: collections.deque = collections.deque()
        self.failures = 0

    def send(self, step: int, sample_ids: Sequence[int], acts: np.ndarray, complete: bool = True) -> None:
        """Rows of A(x) already on the host (``PendingActivations``, a refresh pass)."""
        finite = np.isfinite(acts).all(axis=1)  # non-finite A(x) never reach the centres
        ids = np.asarray(sample_ids, dtype=np.int64)[finite]
        self.in_flight.append(self.store.ingest.remote(self.rank, step, ids, acts[finite].astype(self.dtype),
                                                       complete))
        self._bound()

    def mark(self, step: int) -> None:
        """That this rank sent everything up to ``step`` (a step before a K-means trigger left out, with no
        rows pending): in order with the ``ingest`` calls, and as bounded."""
        self.in_flight.append(self.store.mark.remote(self.rank, step))
        self._bound()

    def _bound(self) -> None:
        while len(self.in_flight) > self.limit:
            done, _ = ray.wait([self.in_flight[0]], timeout=SEND_TIMEOUT_S)
            if done:
                self._settle(self.in_flight.popleft())
            else:  # the store is down or restarting: drop the oldest rather than block training
                self.in_flight.popleft()
                self.failures += 1

    def _settle(self, ref: Any) -> None:
        try:
            ray.get(ref)
        except ray.exceptions.ActorDiedError as err:
            raise StoreLost.at(self.rank, err) from None
        except Exception as err:
            self.failures += 1
            if self.failures == 1:
                log.warning("rank %d: activation send failed (%s); training goes on", self.rank, err)

    def flush(self) -> None:
        while self.in_flight:
            ref = self.in_flight.popleft()
            done, _ = ray.wait([ref], timeout=SEND_TIMEOUT_S)
            if done:
                self._settle(ref)


class StoreLost(RuntimeError):
    """The centroid store died for good (Ray could not restart it): the run ends now, not at its end."""

    @classmethod
    def at(cls, rank: int, err: Exception) -> StoreLost:
        return cls(f"rank {rank}: the centroid store died and could not be restarted ({_first_line(err)}); "
                   "the run stops here. Its last checkpoint and store snapshot are kept: re-running the same "
                   "command resumes from them")


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def ray_world() -> ProcessGroup:
    """The Ray Train workers of one run: ranks talking through the torch.distributed group Ray Train set up."""
    context = ray.train.get_context()
    return ProcessGroup(context.get_world_rank(), context.get_world_size())


class RemoteSink:
    """The tracker actor (on the driver's node) as a ``MetricsSink``: metrics and progress are fire and
    forget, the final artifacts are waited for. Progress lines are printed there: Ray Train V2 would
    echo a worker's print twice."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.tracker.metrics.remote(values, step)

    def progress(self, line: str) -> None:
        self.tracker.progress.remote(line)

    def final(self, summary: dict[str, Any], artifacts: dict[str, bytes]) -> None:
        ray.get(self.tracker.final.remote(summary, artifacts))


# Ray Train's per-report and per-checkpoint INFO lines (a dump of every report's metrics); progress lines
# and the run's banner say the same, once
QUIET_LOGGERS = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg: ExperimentConfig = loop_config["experiment"]  # resolved once by the driver, frozen
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    world = ray_world()
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.train.seed)
    store = loop_config["store"]
    tracker = loop_config.get("tracker")
    sink = RemoteSink(tracker) if tracker is not None and world.rank == 0 else None
    faults = FaultPlan(loop_config.get("faults"), Path(loop_config["run_dir"]))

    task = make_task(cfg)
    train_set = limit(task.train_dataset(), cfg.data.max_train_images)
    # use_gpu: the GPU Ray Train gave this worker (prepare_model puts the network there)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    batches = train_loader(cfg, train_set, task.collate, device, world.rank, world.size)

    net = task.build_model()
    # store.enabled=false: no store, nothing streamed, no centres (DR only; checked in the config)
    sender = (ActivationSender(store, world.rank, cfg.store.max_in_flight, cfg.store.float16)
              if store is not None else None)
    logger = LogMetrics(sink)
    hooks = [*([Compilation(sink)] if cfg.train.compile else []),
             *([StoreCentres(store, sender, sink)] if sender is not None else []), InjectFaults(faults, store),
             *([StreamActivations(sender, cfg)] if sender is not None and cfg.store.mode == "streaming" else []),
             logger, PeriodicEvaluation(sink), Checkpoints(_report_checkpoint, logger)]
    # train.cuda_graph with several workers reduces the gradients itself, outside its graphs (pipeline.cuda_graph):
    # the network is moved to its device, not wrapped in DDP
    split = cfg.train.cuda_graph and world.size > 1
    model = ray.train.torch.prepare_model(net, parallel_strategy=None if split else "ddp")
    trainer = Trainer(cfg, task, net, model, world, hooks)
    _restore(trainer)
    trainer.fit(batches, batches.sampler)
    del batches  # the loader's processes end here, before the evaluation
    if sender is not None:
        sender.flush()
    set_temperature(net, cfg.model.gate.temperature.final)  # evaluate at the final tau (gumbel gates)
    final = final_evaluation(trainer, ray.get(store.status.remote()) if store is not None and world.rank == 0 else {},
                             sink)
    ray.train.report({**final, "step": trainer.step, "done": True})


# ---- faults (tests) -----------------------------------------------------------------------------

class InjectFaults(Hook):
    """The fault plan of a test (``pipeline.faults``): kill a worker or the store, non-finite values."""

    def __init__(self, faults: FaultPlan, store: Any) -> None:
        self.faults, self.store = faults, store

    def before_step(self, trainer: Trainer, batch: dict[str, Any]) -> None:
        step, rank = trainer.step, trainer.world.rank
        if self.faults.due("kill_worker", step, rank):
            log.warning("fault injection: worker rank %d exits at step %d", rank, step)
            os._exit(1)
        if rank == 0 and self.faults.due("kill_store", step, rank):
            log.warning("fault injection: killing the centroid store at step %d", step)
            # the actor writes snapshots in a thread after publishing; wait for one of the current state so
            # the restart has something to restore (what the fault tests), whatever the machine's load
            ray.get(self.store.snapshot.remote())
            ray.kill(self.store, no_restart=False)
        if rank == 0 and self.faults.due("kill_store_forever", step, rank):
            log.warning("fault injection: killing the centroid store for good at step %d", step)
            ray.get(self.store.snapshot.remote())
            ray.kill(self.store, no_restart=True)

    def perturb(self, trainer: Trainer, task_loss: torch.Tensor, activations: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        step, rank = trainer.step, trainer.world.rank
        if self.faults.due("nan_loss", step, rank):
            task_loss = task_loss * float("nan")
        if rank == 0 and self.faults.due("nan_activations", step, rank):
            activations = activations.clone()
            activations[0, 0] = float("nan")
        return task_loss, activations


# ---- centres ----------------------------------------------------------------------------------

class StoreCentres(Hook):
    """The centres from the centroid store actor. Refresh mode (the paper's exact semantics): at each
    K-means trigger step every rank first sends the A(x) of its share of the training set, computed with
    the current weights. Then, at the switch step of the next version, rank 0 fetches it and every rank
    adopts it together; if the store is not ready in time, everyone retries at the next step (lockstep)."""

    def __init__(self, store: Any, sender: ActivationSender, sink: MetricsSink | None) -> None:
        self.store, self.sender, self.sink = store, sender, sink
        self.triggers: list[int] | None = None

    def before_step(self, trainer: Trainer, batch: dict[str, Any]) -> None:
        cfg = trainer.cfg
        if self.triggers is None:
            self.triggers = kmeans_trigger_steps(cfg.train.steps, cfg.clustering.update_every,
                                                 cfg.clustering.update_every_final)
        if cfg.store.mode == "refresh" and trainer.step in self.triggers:
            self._refresh(trainer)
        self._maybe_switch(trainer)

    def _refresh(self, trainer: Trainer) -> None:
        task, world, step = trainer.task, trainer.world, trainer.step
        indices = shard(task.split_size("train"), world.rank, world.size)
        result = task.routing(task.inference(trainer.net, "train", indices, score=False))
        for i in range(0, len(indices), REFRESH_CHUNK):
            self.sender.send(step - 1, result.sample_ids[i:i + REFRESH_CHUNK].tolist(),
                             result.activations[i:i + REFRESH_CHUNK], complete=False)
        self.sender.flush()
        try:
            ray.get(self.store.mark.remote(world.rank, step - 1))
        except ray.exceptions.ActorDiedError as err:
            raise StoreLost.at(world.rank, err) from None

    def _maybe_switch(self, trainer: Trainer) -> None:
        centres, step, world = trainer.centres, trainer.step, trainer.world
        nxt = centres.version + 1
        if nxt > len(self.triggers) or step < switch_step(self.triggers[nxt - 1], trainer.cfg.store.switch_lag):
            return
        payload = None
        if world.rank == 0:
            try:
                payload = ray.get(self.store.get_centres.remote(nxt, world.rank, step, STORE_TIMEOUT_S),
                                  timeout=STORE_TIMEOUT_S + 10)
            except ray.exceptions.ActorDiedError as err:
                raise StoreLost.at(world.rank, err) from None
            except Exception as err:
                log.warning("centroid store unavailable at step %d (%s); keeping version %d", step, err,
                            centres.version)
        payload = world.broadcast(payload)
        if payload is None:
            return
        centres.adopt(payload, step)
        if self.sink is not None:
            self.sink.metrics(kmeans_metrics(payload["stats"], centres.version), step)


class StreamActivations(Hook):
    """Streaming mode: every step's A(x) to the store, without waiting (``ActivationSender``), every
    ``store.send_every`` steps and before each K-means (``PendingActivations``)."""

    def __init__(self, sender: ActivationSender, cfg: ExperimentConfig) -> None:
        self.sender = sender
        self.pending = PendingActivations(cfg)

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        sent = self.pending.add(result)
        if sent is not None:
            self.sender.send(*sent)

    def after_skip(self, trainer: Trainer, index: int) -> None:
        self.pending.after_skip(index, self.sender.send, self.sender.mark)


# ---- checkpoints ------------------------------------------------------------------------------

def _restore(trainer: Trainer) -> None:
    """Resume from Ray Train's latest checkpoint; if it cannot be read (a truncated file, a lost
    upload), from the newest older one that can, saying which was skipped."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return
    failures = []
    for checkpoint in _newest_first(latest):
        try:
            with checkpoint.as_directory() as folder:
                state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # any unreadable checkpoint: try the one before
            failures.append(f"{checkpoint.path}/{CHECKPOINT_FILE}: {type(err).__name__}: {err}")
            log.error("rank %d: checkpoint %s/%s is unreadable (%s); trying the one before", trainer.world.rank,
                      checkpoint.path, CHECKPOINT_FILE, err)
            continue
        trainer.load_state(state)
        if failures:
            log.warning("rank %d: resumed from the older checkpoint %s (step %d)", trainer.world.rank,
                        checkpoint.path, trainer.step)
        return
    raise RuntimeError("no readable checkpoint to resume from:\n  " + "\n  ".join(failures)
                       + "\nmove them away, or re-run with --fresh to start over")


def _newest_first(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """``latest``, then the other checkpoints beside it (``checkpoint_<timestamp>``), newest first."""
    import pyarrow.fs as pafs

    parent = latest.path.rstrip("/").rsplit("/", 1)[0]
    try:
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return [latest]
    older = sorted((info.path for info in infos if info.type == pafs.FileType.Directory
                    and info.base_name.startswith("checkpoint_") and info.path != latest.path), reverse=True)
    return [latest, *(ray.train.Checkpoint(path, filesystem=latest.filesystem) for path in older)]


def _report_checkpoint(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    report = {**metrics, "step": trainer.step, "centre_version": trainer.centres.version}
    if trainer.world.rank != 0:
        ray.train.report(report)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(trainer.state(), Path(folder) / CHECKPOINT_FILE)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
