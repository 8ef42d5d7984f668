"""Inference over a segmentation dataset: gate activations, real FLOPs, and the confusion matrix.

Used for evaluation on the val split, for the refresh mode (every training image's A(x) with the
current weights) and for the final clustering; pure PyTorch, so it is tested without Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from divdr.flops import cost_table, real_cost
from divdr.heads import DynamicRoutingSegmenter
from divdr.metrics import ConfusionMatrix, SegmentationScores

REFERENCE_SIZE = (1024, 2048)  # Cityscapes: the size the DR paper reports GFLOPs at

# Receives each batch's files (relative to the dataset root) and predicted train ids [B, H, W] (CPU),
# e.g. to write them as PNGs: the same predictions the confusion matrix counts.
PredictionSink = Callable[[list[str], torch.Tensor], None]


@dataclass
class InferenceResult:
    sample_ids: np.ndarray  # [N] int64
    files: list[str]
    subsets: np.ndarray  # [N] int64, -1 where unknown
    activations: np.ndarray  # [N, a_dim] float32: A(x)
    gates: np.ndarray  # [N, cells, 3] float32
    real_gflops: np.ndarray  # [N] at each image's own size
    real_gflops_reference: np.ndarray  # [N] the same routes costed at REFERENCE_SIZE
    confusion: ConfusionMatrix | None
    # one matrix per known subset (controlled studies): each subset's mIoU, not only the pooled one
    confusion_by_subset: dict[int, ConfusionMatrix] = field(default_factory=dict)

    @property
    def scores(self) -> SegmentationScores | None:
        return self.confusion.compute() if self.confusion is not None else None

    def scores_by_subset(self) -> dict[int, SegmentationScores]:
        return {s: m.compute() for s, m in sorted(self.confusion_by_subset.items())}


def _collate(batch: list[dict]) -> dict:
    sizes = {tuple(s["image"].shape) for s in batch}
    if len(sizes) > 1:
        raise ValueError(f"evaluation batch mixes image sizes {sorted(sizes)}; use eval batch size 1")
    return {
        "image": torch.stack([s["image"] for s in batch]),
        "label": torch.stack([s["label"] for s in batch]),
        "sample_id": [int(s["sample_id"]) for s in batch],
        "file": [s["file"] for s in batch],
        "subset": [int(s.get("subset", -1)) for s in batch],
    }


@torch.no_grad()
def run_inference(model: DynamicRoutingSegmenter, dataset: Dataset, batch_size: int = 4,
                  indices: Sequence[int] | None = None, score: bool = True,
                  reference_size: tuple[int, int] = REFERENCE_SIZE,
                  predictions: PredictionSink | None = None) -> InferenceResult:
    """Eval-mode forward over ``dataset`` (or the ``indices`` of it), paths really skipped, on the
    model's device (results come back on the CPU). ``predictions`` is given every batch's predicted
    train ids."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    config = model.config
    data = Subset(dataset, list(indices)) if indices is not None else dataset
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    reference_table = cost_table(config, *reference_size)
    tables: dict[tuple[int, int], object] = {}
    confusion = ConfusionMatrix(config.num_classes) if score else None
    by_subset: dict[int, ConfusionMatrix] = {}
    ids, files, subsets, acts, gates, flops, flops_ref = [], [], [], [], [], [], []
    try:
        for batch in loader:
            images = batch["image"].to(device)
            out = model(images)
            size = tuple(images.shape[-2:])
            table = tables.setdefault(size, cost_table(config, *size))
            predicted = out.logits.argmax(1).cpu()
            if confusion is not None:
                confusion.update(predicted, batch["label"])
                _update_by_subset(by_subset, config.num_classes, predicted, batch["label"], batch["subset"])
            if predictions is not None:
                predictions(batch["file"], predicted)
            ids += batch["sample_id"]
            files += batch["file"]
            subsets += batch["subset"]
            gate_values = out.backbone.gates.float().cpu()
            acts.append(out.backbone.activations.float().cpu().numpy())
            gates.append(gate_values.numpy())
            flops.append(real_cost(gate_values, table).numpy() / 1e9)
            flops_ref.append(real_cost(gate_values, reference_table).numpy() / 1e9)
    finally:
        model.train(was_training)
    return InferenceResult(
        sample_ids=np.asarray(ids, dtype=np.int64), files=files, subsets=np.asarray(subsets, dtype=np.int64),
        activations=np.concatenate(acts), gates=np.concatenate(gates),
        real_gflops=np.concatenate(flops), real_gflops_reference=np.concatenate(flops_ref), confusion=confusion,
        confusion_by_subset=by_subset,
    )


def _update_by_subset(matrices: dict[int, ConfusionMatrix], num_classes: int, predicted: torch.Tensor,
                      labels: torch.Tensor, subsets: list[int]) -> None:
    subset_of = torch.as_tensor(subsets)
    for s in {s for s in subsets if s >= 0}:
        rows = subset_of == s
        matrices.setdefault(s, ConfusionMatrix(num_classes)).update(predicted[rows], labels[rows])


def _summed(matrices: Sequence[ConfusionMatrix]) -> ConfusionMatrix:
    """A new accumulator holding the sum: the inputs keep their own matrices (their scores stay valid)."""
    first = matrices[0]
    total = ConfusionMatrix(first.num_classes, first.ignore_index, first.class_names)
    total.matrix = sum((m.matrix for m in matrices[1:]), first.matrix.clone())
    return total


def merge_results(parts: Sequence[InferenceResult]) -> InferenceResult:
    """Join the shards of several workers, ordered by sample id; confusion matrices summed."""
    parts = [p for p in parts if len(p.sample_ids)]
    if not parts:
        raise ValueError("no inference results to merge")
    ids = np.concatenate([p.sample_ids for p in parts])
    order = np.argsort(ids, kind="stable")
    files = [f for p in parts for f in p.files]
    confusion = _summed([p.confusion for p in parts]) if all(p.confusion is not None for p in parts) else None
    by_subset = {s: _summed([p.confusion_by_subset[s] for p in parts if s in p.confusion_by_subset])
                 for s in sorted({s for p in parts for s in p.confusion_by_subset})}
    return InferenceResult(
        sample_ids=ids[order], files=[files[i] for i in order],
        subsets=np.concatenate([p.subsets for p in parts])[order],
        activations=np.concatenate([p.activations for p in parts])[order],
        gates=np.concatenate([p.gates for p in parts])[order],
        real_gflops=np.concatenate([p.real_gflops for p in parts])[order],
        real_gflops_reference=np.concatenate([p.real_gflops_reference for p in parts])[order],
        confusion=confusion, confusion_by_subset=by_subset,
    )
