"""``pipeline/train.py --local``: the same training loop in one process, with no Ray.

For debugging, small machines and single-GPU boxes: ``pipeline.loop.Trainer`` with the hooks of a
single process. The centroid store's own logic (``CentroidStoreImpl``) runs in-process: K-means is
taken synchronously at the trigger steps and the centres switch at the same steps as on Ray (trigger +
``store.switch_lag``), so a local run follows the schedule of a one-worker Ray run. Outputs are those
of a Ray run: ``<out>/<run name>/`` with config.yaml, the store snapshot, a checkpoint (re-running the
command resumes it), artifacts/ and result.json, and the same MLflow store under ``<out>``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from divdr.gates import set_temperature
from pipeline import tracking
from pipeline.centroid_store import CentroidStoreImpl
from pipeline.config import ExperimentConfig
from pipeline.loop import (
    Checkpoints,
    Compilation,
    Hook,
    LogMetrics,
    MetricsSink,
    PendingActivations,
    PeriodicEvaluation,
    StepResult,
    Trainer,
    final_evaluation,
    kmeans_metrics,
)
from pipeline.schedule import switch_step
from pipeline.tasks import limit, make_task
from pipeline.train_data import local_device, train_loader

CHECKPOINT = Path("checkpoint") / "state.pt"
PREVIOUS_CHECKPOINT = Path("checkpoint") / "previous.pt"


class LocalCentres(Hook):
    """The centroid store in-process: A(x) ingested after each step (streaming) or recomputed for every
    training image at each trigger step (refresh); K-means as soon as a version is due; every version
    adopted at its switch step, as the Ray workers do."""

    def __init__(self, store: CentroidStoreImpl, sink: MetricsSink | None, cfg: ExperimentConfig) -> None:
        self.store, self.sink = store, sink
        self.pending = PendingActivations(cfg)

    def before_step(self, trainer: Trainer, batch: dict[str, Any]) -> None:
        step = trainer.step
        if trainer.cfg.store.mode == "refresh" and step in self.store.triggers:
            task = trainer.task
            result = task.routing(task.inference(trainer.net, "train", range(task.split_size("train")), score=False))
            self.store.ingest(0, step - 1, result.sample_ids, result.activations, complete=False)
            self.store.mark(0, step - 1)
        while self.store.due():
            self.store.publish(self.store.cluster(*self.store.take_batch()))
        self._maybe_switch(trainer)

    def _maybe_switch(self, trainer: Trainer) -> None:
        centres, step, triggers = trainer.centres, trainer.step, self.store.triggers
        nxt = centres.version + 1
        if (nxt > len(triggers) or step < switch_step(triggers[nxt - 1], trainer.cfg.store.switch_lag)
                or self.store.version < nxt):
            return
        centres.adopt(self.store.centres_payload(), step)
        if self.sink is not None:
            self.sink.metrics(kmeans_metrics(centres.history[-1], centres.version), step)

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        if trainer.cfg.store.mode != "streaming":
            return
        sent = self.pending.add(result)
        if sent is not None:
            self.store.ingest(0, *sent)  # non-finite rows are the store's to reject (and count)

    def after_skip(self, trainer: Trainer, index: int) -> None:
        # at a step before a trigger, the store learns the run is past it, or K-means waits for the next send
        if trainer.cfg.store.mode == "streaming":
            self.pending.after_skip(index, lambda *sent: self.store.ingest(0, *sent),
                                    lambda step: self.store.mark(0, step))


def save_checkpoint(run_dir: Path) -> Any:
    def save(trainer: Trainer, metrics: dict[str, float]) -> None:
        path = run_dir / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(trainer.state(), tmp)
        if path.exists():
            os.replace(path, run_dir / PREVIOUS_CHECKPOINT)  # kept in case the newest is ever unreadable
        os.replace(tmp, path)  # a crash while writing never leaves a half-written checkpoint

    return save


def load_checkpoint(trainer: Trainer, run_dir: Path) -> None:
    """Resume from the run folder's checkpoint, or from the one before it if that cannot be read."""
    failures = []
    for path in (run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT):
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # wherever it was saved
        except Exception as err:  # truncated or otherwise unreadable: try the previous one
            failures.append(f"{path}: {type(err).__name__}: {err}")
            print(f"checkpoint {path} is unreadable ({err}); trying the previous one", flush=True)
            continue
        trainer.load_state(state)
        print(f"resuming {trainer.cfg.run_name} from step {trainer.step} ({path})", flush=True)
        return
    if failures:
        raise RuntimeError("no readable checkpoint to resume from:\n  " + "\n  ".join(failures)
                           + "\nmove them away, or re-run with --fresh to start over")


def run_local(cfg: ExperimentConfig, run_dir: Path, uri: str, run_id: str) -> dict[str, Any]:
    """Train ``cfg`` in this process into ``run_dir`` (made and tracked by ``pipeline.train.run``);
    resumes from the run folder's checkpoint if there is one. Returns the final metrics."""
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.train.seed)
    device = local_device(cfg)
    task = make_task(cfg)
    train_set = limit(task.train_dataset(), cfg.data.max_train_images)
    batches = train_loader(cfg, train_set, task.collate, device)  # the batches of a one-worker Ray run
    sink = tracking.Tracker(uri, run_id, str(run_dir))
    store = None
    if cfg.store.enabled:
        store = CentroidStoreImpl(len(train_set), cfg.model.a_dim, 1, cfg.train.steps, cfg.clustering, cfg.store,
                                  str(run_dir / "store"), cfg.train.seed, gpu=device.type == "cuda")
    logger = LogMetrics(sink)
    hooks: list[Hook] = [*([Compilation(sink)] if cfg.train.compile else []),
                         *([LocalCentres(store, sink, cfg)] if store is not None else []), logger,
                         PeriodicEvaluation(sink), Checkpoints(save_checkpoint(run_dir), logger)]
    trainer = Trainer(cfg, task, task.build_model().to(device), hooks=hooks)
    load_checkpoint(trainer, run_dir)
    started = time.perf_counter()
    trainer.fit(batches, batches.sampler)
    del batches  # the loader's processes end here, before the evaluation
    set_temperature(trainer.net, cfg.model.gate.temperature.final)  # evaluate at the final tau (gumbel gates)
    metrics = final_evaluation(trainer, store.status() if store is not None else {}, sink)
    metrics["store"] = store.status() if store is not None else None
    if store is not None and store.snapshot_dir:
        store.snapshot()
    metrics["train_seconds"] = time.perf_counter() - started
    return json.loads(json.dumps(metrics, default=float))
