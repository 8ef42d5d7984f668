"""One training step of the pipeline's worker, outside Ray Train, for the step-time benchmarks.

``Trainer.step`` does what ``pipeline.worker.train_loop_per_worker`` does per step (forward, task +
budget + clustering loss, the non-finite check, backward, clip, SGD, poly schedule, the
activation send and the centre switch at the schedule's steps), with the same library functions,
so the benchmarks time the same work. Batches are made once and cycled, so data loading (equal for
every variant) is left out and the ratios are of compute plus the store's overhead only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from divdr.data.labels import IGNORE_INDEX
from divdr.flops import budget_ratio, cost_table
from divdr.heads import DynamicRoutingSegmenter
from divdr.losses import total_loss
from pipeline.config import ExperimentConfig, resolve

PROGRESS = 0.5  # the budget loss is on (it starts at 40% of training), as in most of a real run


def experiment(preset: str, model_size: str, batch: int, crop: int, extra: list[str] = ()) -> ExperimentConfig:
    return resolve(preset, overrides=[f"model_size={model_size}", f"train.batch_size={batch}",
                                      f"train.crop=[{crop}, {crop}]", *extra])


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
    centres: Any
    triggers: list[int]


class Trainer:
    def __init__(self, cfg: ExperimentConfig, link: StoreLink | None = None, seed: int = 0,
                 wrap: Any = None) -> None:
        """``wrap``: e.g. ``ray.train.torch.prepare_model`` (DDP) applied to the network."""
        torch.manual_seed(seed)
        self.cfg = cfg
        self.net = DynamicRoutingSegmenter(cfg.model)
        self.model = wrap(self.net) if wrap is not None else self.net
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay)
        total = cfg.train.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: max(0.0, 1.0 - s / total) ** cfg.train.poly_power)
        self.table = cost_table(cfg.model, *cfg.train.crop)
        self.link = link
        self.step_index = 0

    def step(self, batch: dict[str, Any]) -> float:
        from pipeline import worker  # Ray is imported only when a store is used

        cfg, link, step = self.cfg, self.link, self.step_index
        if link is not None:
            worker._maybe_switch(link.centres, link.store, link.triggers, cfg, step, 0, 1, None)
        self.model.train()
        out = self.model(batch["image"])
        task = F.cross_entropy(out.logits, batch["label"], ignore_index=IGNORE_INDEX)
        ratio = budget_ratio(out.backbone.gates, self.table)
        acts = out.backbone.activations
        usable = link is not None and link.centres.usable()
        terms = total_loss(task, cost_ratio=ratio, progress=PROGRESS, budget=cfg.budget, clustering=cfg.clustering,
                           activations=acts, centres=link.centres.centres if usable else None,
                           sigma2=link.centres.sigma2 if usable else None, resource=cfg.resource)
        self.optimizer.zero_grad(set_to_none=True)
        if not bool(torch.isfinite(torch.cat([terms.total.detach().view(1), acts.detach().flatten()])).all()):
            raise FloatingPointError("non-finite loss in the benchmark")
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if link is not None:
            link.sender.send(step, batch["sample_id"], acts)
        self.step_index += 1
        return float(terms.clustering.detach())


def start_store(cfg: ExperimentConfig, num_samples: int, snapshot_dir: str | None, prefill_seed: int = 0):
    """A real centroid-store actor for this run, pre-filled with ``num_samples`` activations (so
    every K-means clusters a full training set from the first update), and the worker's link to it."""
    import ray

    from pipeline.centroid_store import CentroidStore
    from pipeline.schedule import kmeans_trigger_steps
    from pipeline.worker import ActivationSender, CentreState

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
    triggers = kmeans_trigger_steps(cfg.train.steps, cfg.clustering.update_every, cfg.store.update_every_final)
    sender = ActivationSender(store, 0, cfg.store.max_in_flight, cfg.store.float16)
    return StoreLink(store, sender, centres, triggers)
