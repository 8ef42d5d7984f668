"""The pipeline's training step outside Ray Train, for the step-time benchmarks.

``Trainer.step`` runs ``pipeline.loop.Trainer.run_step`` - the step every runner trains with (forward,
task + budget + clustering loss, the non-finite check, backward, clip, SGD, poly schedule) - with the
worker's own hooks for the centroid store (the centre switch at the schedule's steps, the activation
send) when a store is linked, so the benchmarks time the same work. Batches are made once and cycled,
so data loading (equal for every variant) is left out and the ratios are of compute plus the store's
overhead only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ExperimentConfig, resolve
from pipeline.loop import CentreState, Hook
from pipeline.loop import Trainer as LoopTrainer
from pipeline.tasks import SegmentationTask

# The budget loss on from the first step, as in most of a real run (it starts at 40% of training there).
BUDGET_FROM_THE_START = ("budget.start_fraction=0", "budget.warmup_fraction=0")


def experiment(preset: str, model_size: str, batch: int, crop: int, extra: list[str] = ()) -> ExperimentConfig:
    return resolve(preset, overrides=[f"model_size={model_size}", f"train.batch_size={batch}",
                                      f"train.crop=[{crop}, {crop}]", *BUDGET_FROM_THE_START, *extra])


def batches(cfg: ExperimentConfig, count: int, num_samples: int, seed: int = 0) -> list[dict[str, Any]]:
    """Random images and labels of the training crop size (the timing does not depend on content
    in training mode: every path is computed)."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.train.crop
    b = cfg.train.batch_size
    out = []
    for i in range(count):
        out.append({"image": torch.randn(b, 3, h, w, generator=g),
                    "label": torch.randint(0, cfg.model.num_classes, (b, h, w), generator=g),
                    "sample_id": [int((i * b + j) % num_samples) for j in range(b)]})
    return out


@dataclass
class StoreLink:
    """What a step needs of the store: the sender, the centres, the schedule."""

    store: Any
    sender: Any
    centres: CentreState
    triggers: list[int]


class Trainer:
    """``pipeline.loop.Trainer`` on in-memory batches."""

    def __init__(self, cfg: ExperimentConfig, link: StoreLink | None = None, seed: int = 0,
                 wrap: Any = None) -> None:
        """``wrap``: e.g. ``ray.train.torch.prepare_model`` (DDP) applied to the network."""
        torch.manual_seed(seed)
        task = SegmentationTask(cfg, Path("."))  # forward and cost table only: no dataset is read
        self.net = task.build_model()
        hooks: list[Hook] = []
        if link is not None:
            from pipeline.worker import StoreCentres, StreamActivations  # Ray only when a store is used

            hooks = [StoreCentres(link.store, link.sender, None), StreamActivations(link.sender, cfg)]
        self.loop = LoopTrainer(cfg, task, self.net, wrap(self.net) if wrap is not None else None, hooks=hooks,
                                centres=link.centres if link is not None else None)
        if link is not None:
            hooks[0].triggers = link.triggers

    def step(self, batch: dict[str, Any]) -> float:
        """One step; returns its clustering loss."""
        for hook in self.loop.hooks:
            hook.before_step(self.loop, batch)
        result = self.loop.run_step(batch)
        if result is None:
            raise FloatingPointError("non-finite loss in the benchmark")
        for hook in self.loop.hooks:
            hook.after_step(self.loop, result)
        return float(result.terms.clustering.detach())


def start_store(cfg: ExperimentConfig, num_samples: int, snapshot_dir: str | None, prefill_seed: int = 0):
    """A real centroid-store actor for this run, pre-filled with ``num_samples`` activations (so
    every K-means clusters a full training set from the first update), and the worker's link to it."""
    import ray

    from pipeline.centroid_store import CentroidStore
    from pipeline.schedule import kmeans_trigger_steps
    from pipeline.worker import ActivationSender

    store = CentroidStore.options(num_cpus=0).remote(num_samples, cfg.model.a_dim, 1, cfg.train.steps,
                                                     cfg.clustering, cfg.store, snapshot_dir, cfg.train.seed)
    rng = np.random.default_rng(prefill_seed)
    fill = rng.random((num_samples, cfg.model.a_dim), dtype=np.float32) * 0.9
    chunk = 4096
    ray.get([store.ingest.remote(0, -1, np.arange(i, min(i + chunk, num_samples)), fill[i:i + chunk], False)
             for i in range(0, num_samples, chunk)])
    centres = CentreState()
    if cfg.clustering.weight:  # DivDR trains with centres from the start (as after the first update)
        from divdr import clustering

        first = clustering.kmeans(fill, cfg.clustering.k, niter=cfg.store.kmeans_iterations, seed=0)
        centres.centres = torch.from_numpy(np.array(first.centres))
        centres.sigma2 = float(first.sigma2)
    triggers = kmeans_trigger_steps(cfg.train.steps, cfg.clustering.update_every, cfg.clustering.update_every_final)
    sender = ActivationSender(store, 0, cfg.store.max_in_flight, cfg.store.float16)
    return StoreLink(store, sender, centres, triggers)
