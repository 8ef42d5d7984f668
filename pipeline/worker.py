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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from divdr.flops import budget_ratio, expected_cost
from divdr.gates import anneal_temperature, set_temperature
from divdr.losses import total_loss
from pipeline.config import ExperimentConfig, from_dict
from pipeline.faults import FaultPlan
from pipeline.loop import build_optimizer, build_scheduler
from pipeline.schedule import kmeans_trigger_steps, switch_step
from pipeline.tasks import TrainingTask, make_task

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
STORE_TIMEOUT_S = 60.0  # how long rank 0 waits for a due centre version before training on
SEND_TIMEOUT_S = 30.0  # how long a worker waits for a slot among its in-flight sends
MAX_SKIPPED_STEPS = 5  # consecutive non-finite steps tolerated before the run stops
REFRESH_CHUNK = 64  # activations per message in refresh mode


@dataclass
class CentreState:
    """The centres every rank currently uses in the clustering loss (version 0 = none yet)."""

    version: int = 0
    centres: torch.Tensor | None = None
    sigma2: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def usable(self) -> bool:
        return self.centres is not None and self.sigma2 is not None and self.sigma2 > 0


class ActivationSender:
    """Fire-and-forget ``ingest`` calls with at most ``limit`` unanswered; a dead store is survived."""

    def __init__(self, store: Any, rank: int, limit: int, float16: bool) -> None:
        self.store, self.rank, self.limit = store, rank, limit
        self.dtype = np.float16 if float16 else np.float32
        self.in_flight: collections.deque = collections.deque()
        self.failures = 0

    def send(self, step: int, sample_ids: list[int], activations: torch.Tensor, complete: bool = True) -> None:
        acts = activations.detach().float().cpu().numpy()
        finite = np.isfinite(acts).all(axis=1)  # non-finite A(x) never reach the centres
        ids = np.asarray(sample_ids, dtype=np.int64)[finite]
        self.in_flight.append(self.store.ingest.remote(self.rank, step, ids, acts[finite].astype(self.dtype),
                                                       complete))
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


def _limit(dataset: Any, count: int) -> Any:
    return Subset(dataset, range(min(count, len(dataset)))) if count else dataset


def _world() -> tuple[int, int]:
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _all_finite(value: torch.Tensor, world: int) -> bool:
    flag = torch.tensor([float(torch.isfinite(value).all())])
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _shard(n: int, rank: int, world: int) -> list[int]:
    return list(range(rank, n, world))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg: ExperimentConfig = from_dict(loop_config["experiment"])
    rank, world = _world()
    torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.train.seed)
    root = Path(loop_config["data_root"])
    store = loop_config["store"]
    tracker = loop_config.get("tracker") if rank == 0 else None
    faults = FaultPlan(loop_config.get("faults"), Path(loop_config["run_dir"]))

    task = make_task(cfg, root)
    train_set = _limit(task.train_dataset(), cfg.data.max_train_images)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed,
                                 drop_last=True)
    batch_size = min(cfg.train.batch_size, max(1, len(train_set) // world))
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=task.collate)

    net = task.build_model()
    model = ray.train.torch.prepare_model(net)
    optimizer = build_optimizer(net, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    triggers = kmeans_trigger_steps(cfg.train.steps, cfg.clustering.update_every, cfg.store.update_every_final)
    centres = CentreState()
    start_step = _restore(net, optimizer, scheduler, centres)
    # store.enabled=false: no store, nothing streamed, no centres (DR only; checked in the config)
    sender = ActivationSender(store, rank, cfg.store.max_in_flight, cfg.store.float16) if store is not None else None

    step, epoch, skipped, skipped_total = start_step, 0, 0, 0
    seen_images, t_last, metrics = 0, time.perf_counter(), {}
    t_start, first_step = t_last, start_step
    while step < cfg.train.steps:
        sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            if step >= cfg.train.steps:
                break
            if sender is not None and cfg.store.mode == "refresh" and step in triggers:
                _refresh(net, task, cfg, store, sender, rank, world, step)
            if sender is not None:
                _maybe_switch(centres, store, triggers, cfg, step, rank, world, tracker)
            _inject_process_faults(faults, store, step, rank)
            model.train()
            tau = anneal_temperature(net, step / cfg.train.steps, cfg.model.gate.temperature)  # no-op: soft
            out = task.forward(model, batch)
            table = out.table
            ratio = budget_ratio(out.backbone.gates, table)
            acts = out.backbone.activations
            task_loss, acts = _inject_value_faults(faults, out.loss, acts, step, rank)
            terms = total_loss(task_loss, cost_ratio=ratio, progress=step / cfg.train.steps, budget=cfg.budget,
                               clustering=cfg.clustering, activations=acts,
                               centres=centres.centres if centres.usable() else None, sigma2=centres.sigma2,
                               resource=cfg.resource, correct=out.correct)
            optimizer.zero_grad(set_to_none=True)
            if not _all_finite(torch.cat([terms.total.detach().view(1), acts.detach().flatten()]), world):
                skipped += 1
                skipped_total += 1
                if skipped > MAX_SKIPPED_STEPS:
                    raise FloatingPointError(
                        f"rank {rank}: loss or gate activations non-finite for {skipped} consecutive steps "
                        f"(step {step}, task {task_loss.item():.4g}, total {terms.total.item():.4g}); "
                        "lower train.lr or check the data")
                step += 1
                continue
            skipped = 0
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            if sender is not None and cfg.store.mode == "streaming":
                sender.send(step, batch["sample_id"], acts)
            seen_images += len(batch["sample_id"]) * world
            step += 1
            if step % cfg.train.log_every == 0 and tracker is not None:
                now = time.perf_counter()
                metrics = {
                    "loss/total": terms.total.item(), "loss/task": terms.task.item(),
                    "loss/budget": terms.budget.item(), "loss/clustering": terms.clustering.item(),
                    "loss/resource": terms.resource.item(), "gate/tau": tau,
                    "cost/ratio": ratio.mean().item(),
                    "cost/expected_gflops": float(expected_cost(out.backbone.gates.detach(), table).mean()) / 1e9,
                    "lr": scheduler.get_last_lr()[0], "images_per_s": seen_images / max(now - t_last, 1e-9),
                    "centre_version": centres.version,
                    **{name: value.item() for name, value in out.parts.items()},
                }
                tracker.metrics.remote(metrics, step)
                # printed by the tracker on the driver's node: Ray Train V2 would echo a worker's print twice
                tracker.progress.remote(progress_line(step, first_step, cfg.train.steps, metrics, now - t_start))
                seen_images, t_last = 0, now
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                _periodic_evaluation(net, task, step, rank, world, tracker)
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                _checkpoint(net, optimizer, scheduler, centres, step, rank, metrics)
    if sender is not None:
        sender.flush()
    set_temperature(net, cfg.model.gate.temperature.final)  # evaluate at the final tau (gumbel gates)
    final = _final_evaluation(net, task, cfg, store, centres, rank, world, tracker,
                              {"step": step, "start_step": start_step, "skipped_steps": skipped_total})
    ray.train.report({**final, "step": step, "done": True})


def progress_line(step: int, first_step: int, total: int, m: dict[str, float], elapsed: float) -> str:
    eta = elapsed / max(step - first_step, 1) * (total - step)
    return (f"step {step}/{total} | loss {m['loss/total']:.3f} (task {m['loss/task']:.3f}, budget "
            f"{m['loss/budget']:.3f}, clustering {m['loss/clustering']:.3f}) | cost {m['cost/ratio']:.2f} | "
            f"centres v{m['centre_version']} | {m['images_per_s']:.1f} img/s | ETA {eta / 60:.1f} min")


def _inject_process_faults(faults: FaultPlan, store: Any, step: int, rank: int) -> None:
    if faults.due("kill_worker", step, rank):
        log.warning("fault injection: worker rank %d exits at step %d", rank, step)
        os._exit(1)
    if rank == 0 and faults.due("kill_store", step, rank):
        log.warning("fault injection: killing the centroid store at step %d", step)
        # the actor writes snapshots in a thread after publishing; wait for one of the current state so
        # the restart has something to restore (what the fault tests), whatever the machine's load
        ray.get(store.snapshot.remote())
        ray.kill(store, no_restart=False)


def _inject_value_faults(faults: FaultPlan, task: torch.Tensor, acts: torch.Tensor, step: int, rank: int,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    if faults.due("nan_loss", step, rank):
        task = task * float("nan")
    if rank == 0 and faults.due("nan_activations", step, rank):
        acts = acts.clone()
        acts[0, 0] = float("nan")
    return task, acts


# ---- centres ----------------------------------------------------------------------------------

def _maybe_switch(centres: CentreState, store: Any, triggers: list[int], cfg: ExperimentConfig, step: int,
                  rank: int, world: int, tracker: Any) -> None:
    """At the switch step of the next version, rank 0 fetches it and every rank adopts it together.
    If the store is not ready in time, everyone retries at the next step (still in lockstep)."""
    nxt = centres.version + 1
    if nxt > len(triggers) or step < switch_step(triggers[nxt - 1], cfg.store.switch_lag):
        return
    payload = None
    if rank == 0:
        try:
            payload = ray.get(store.get_centres.remote(nxt, rank, step, STORE_TIMEOUT_S),
                              timeout=STORE_TIMEOUT_S + 10)
        except Exception as err:
            log.warning("centroid store unavailable at step %d (%s); keeping version %d", step, err, centres.version)
    payload = _broadcast(payload, world)
    if payload is None:
        return
    centres.version = payload["version"]
    centres.centres = torch.tensor(np.array(payload["centres"], dtype=np.float32))
    centres.sigma2 = float(payload["sigma2"])
    centres.history.append({**payload["stats"], "switch_step": step})
    if tracker is not None:
        stats = payload["stats"]
        tracker.metrics.remote({f"kmeans/{k}": v for k, v in stats.items()
                                if isinstance(v, (int, float)) and k not in ("version", "trigger_step")}
                               | {"kmeans/version": centres.version}, step)


def _refresh(net: torch.nn.Module, task: TrainingTask, cfg: ExperimentConfig, store: Any,
             sender: ActivationSender, rank: int, world: int, step: int) -> None:
    """Refresh mode (the paper's exact semantics): A(x) of every training image with the current
    weights, sent before the K-means of this trigger step."""
    indices = _shard(task.split_size("train"), rank, world)
    result = task.routing(task.inference(net, "train", indices, score=False))
    acts = torch.from_numpy(result.activations)
    for i in range(0, len(indices), REFRESH_CHUNK):
        sender.send(step - 1, result.sample_ids[i:i + REFRESH_CHUNK].tolist(), acts[i:i + REFRESH_CHUNK],
                    complete=False)
    sender.flush()
    ray.get(store.mark.remote(rank, step - 1))


# ---- checkpoints ------------------------------------------------------------------------------

def _restore(net: torch.nn.Module, optimizer: Any, scheduler: Any, centres: CentreState) -> int:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    centres.version = state["centre_version"]
    centres.centres = state["centres"]
    centres.sigma2 = state["sigma2"]
    centres.history = state["centre_history"]
    return int(state["step"])


def _checkpoint(net: torch.nn.Module, optimizer: Any, scheduler: Any, centres: CentreState, step: int, rank: int,
                metrics: dict[str, float]) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    report = {**metrics, "step": step, "centre_version": centres.version}
    if rank != 0:
        ray.train.report(report)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "centre_version": centres.version,
                    "centres": centres.centres, "sigma2": centres.sigma2, "centre_history": centres.history},
                   Path(folder) / CHECKPOINT_FILE)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))


# ---- evaluation -------------------------------------------------------------------------------

def _periodic_evaluation(net: torch.nn.Module, task: TrainingTask, step: int, rank: int, world: int,
                         tracker: Any) -> None:
    """Val scores (mIoU, or COCO AP) and real GFLOPs during training (every ``train.eval_every``
    steps), sharded over ranks."""
    part = task.inference(net, "val", _shard(task.split_size("val"), rank, world))
    merged = task.merge(_gather(part, world))
    if tracker is not None:
        tracker.metrics.remote(task.val_metrics(merged), step)


# ---- final evaluation -------------------------------------------------------------------------

def _final_evaluation(net: torch.nn.Module, task: TrainingTask, cfg: ExperimentConfig, store: Any,
                      centres: CentreState, rank: int, world: int, tracker: Any,
                      progress: dict[str, int]) -> dict[str, Any]:
    """Val scores (mIoU, or COCO AP) and real GFLOPs; then the clusters measured the same way for DR
    and DivDR: eval-mode A(x) of the training images clustered (warm-started from the store's last
    centres), val images assigned to their nearest centre (Inter, Intra, sizes, subset recovery)."""
    train_part = task.inference(net, "train", _shard(task.split_size("train"), rank, world), score=False)
    val_part = task.inference(net, "val", _shard(task.split_size("val"), rank, world))
    train_parts, val_parts = _gather(train_part, world), _gather(val_part, world)
    if rank != 0:
        return {}
    summary, artifacts = task.summarize(cfg, task.merge(train_parts), task.merge(val_parts), centres,
                                        ray.get(store.status.remote()) if store is not None else {}, net, progress)
    if tracker is not None:
        ray.get(tracker.final.remote(summary, artifacts))
    return summary

