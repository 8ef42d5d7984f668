"""Inference over a COCO-format dataset with a DR detector, and its AP through ``divdr.coco_eval``.

The counterpart of ``divdr.evaluation`` for detection: per image the COCO results (boxes, and RLE
masks for instance segmentation, in the dataset's own category ids), A(x), the gates and the real
backbone GFLOPs; then COCOeval (bbox, and segm for instance segmentation) on exactly the images
inferred. Pure PyTorch + pycocotools, tested without Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Subset

from divdr.coco_eval import evaluate_coco
from divdr.data.coco import CocoDetection, DetectionTarget
from divdr.data.manifest import UNKNOWN_SUBSET, SubsetEntry
from divdr.detection import DynamicRoutingDetector
from divdr.evaluation import InferenceResult, merge_results
from divdr.flops import CostTable, cost_table, real_cost

REFERENCE_SIZE = (800, 800)  # DivDR Tables 4-5 report backbone GFLOPs at this size
HEADLINE_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class DetectionInferenceResult:
    """``routing``: sample ids, files (relative to the dataset root), subsets, A(x), gates and real
    backbone GFLOPs per image (its ``confusion`` is None); ``image_ids``: the COCO ids inferred;
    ``results``: COCO results, a list of {image_id, category_id, score, bbox[, segmentation]}."""

    routing: InferenceResult
    image_ids: list[int]
    results: list[dict[str, Any]]


def detections_to_coco(detections: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                       label_to_category: Mapping[int, int], masks: bool,
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """torchvision detections (xyxy boxes, contiguous labels, [N, 1, H, W] mask probabilities) ->
    COCO results: xywh boxes, the dataset's category ids, compressed RLE masks."""
    results: list[dict[str, Any]] = []
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = det["boxes"].detach().cpu().double().tolist()
        labels = det["labels"].detach().cpu().tolist()
        scores = det["scores"].detach().cpu().tolist()
        binary = None
        if masks:
            binary = (det["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        for i, ((x1, y1, x2, y2), label, score) in enumerate(zip(boxes, labels, scores, strict=True)):
            if label not in label_to_category:
                raise ValueError(f"detector label {label} has no COCO category "
                                 f"(labels are 1..{len(label_to_category)})")
            result: dict[str, Any] = {"image_id": int(image_id), "category_id": int(label_to_category[label]),
                                      "score": float(score), "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if binary is not None:
                rle = mask_utils.encode(np.asfortranarray(binary[i]))
                result["segmentation"] = {"size": [int(v) for v in rle["size"]],
                                          "counts": rle["counts"].decode("ascii")}
            results.append(result)
    return results


def gt_subset(dataset: Mapping[str, Any], image_ids: Sequence[int]) -> dict[str, Any]:
    """The instances JSON restricted to ``image_ids``: COCOeval scores every ground-truth image, so
    images not inferred (``data.max_val_images``, a worker's shard) must not count as all missed."""
    keep = set(image_ids)
    return {**dataset, "images": [img for img in dataset["images"] if img["id"] in keep],
            "annotations": [ann for ann in dataset["annotations"] if ann["image_id"] in keep]}


def score_detections(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], image_ids: Sequence[int],
                     iou_types: Sequence[str]) -> dict[str, float]:
    """COCOeval through ``divdr.coco_eval.evaluate_coco`` on the images inferred, keys ``bbox/AP`` ...
    ``segm/APl`` (fractions; NaN where COCOeval cannot define one)."""
    subset = gt_subset(gt, image_ids)
    scores: dict[str, float] = {}
    for iou_type in iou_types:
        metrics = evaluate_coco(subset, list(results), iou_type)  # type: ignore[arg-type]
        scores.update({f"{iou_type}/{name}": metrics[name] for name in HEADLINE_METRICS})
    return scores


def iou_types_for(model: DynamicRoutingDetector) -> tuple[str, ...]:
    return ("bbox", "segm") if model.masks else ("bbox",)


def _collate(batch: list[tuple[torch.Tensor, DetectionTarget]]) -> tuple[list[torch.Tensor], list[DetectionTarget]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def relative_file(dataset: CocoDetection, target: DetectionTarget) -> str:
    """The image path relative to the dataset root (``{split}/{file_name}`` in the COCO layout),
    the key of the subset manifest."""
    return f"{dataset.image_dir.name}/{target['file']}"


@torch.no_grad()
def run_detection_inference(model: DynamicRoutingDetector, dataset: CocoDetection, batch_size: int = 2,
                            indices: Sequence[int] | None = None,
                            manifest: Mapping[str, SubsetEntry] | None = None,
                            reference_size: tuple[int, int] = REFERENCE_SIZE,
                            predict: bool = True) -> DetectionInferenceResult:
    """Eval-mode forward over ``dataset`` (or the ``indices`` of it), paths really skipped.

    ``predict=False`` keeps only the routing (A(x) for the centroid store): no COCO results.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    config = model.config
    data = Subset(dataset, list(indices)) if indices is not None else dataset
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    reference = cost_table(config, *reference_size, with_decoder=False)
    tables: dict[tuple[int, int], CostTable] = {}
    manifest = manifest or {}
    ids, files, subsets, image_ids, acts, gates, flops, flops_ref = [], [], [], [], [], [], [], []
    results: list[dict[str, Any]] = []
    try:
        for images, targets in loader:
            images = [image.to(device) for image in images]  # results come back on the CPU
            batch_ids = [int(t["image_id"]) for t in targets]
            if predict:
                out = model(images)
                backbone, size = out.backbone, out.image_size
                results += detections_to_coco(out.detections, batch_ids, dataset.label_to_category, model.masks,
                                              model.detection.mask_threshold)
            else:  # the routing alone: the FPN and heads would change nothing in A(x)
                backbone, size = model.route(images)
            table = tables.setdefault(size, cost_table(config, *size, with_decoder=False))
            for target in targets:
                ids.append(int(target["sample_id"]))
                files.append(relative_file(dataset, target))
                entry = manifest.get(files[-1])
                subsets.append(entry.subset if entry else UNKNOWN_SUBSET)
            image_ids += batch_ids
            gate_values = backbone.gates.float().cpu()
            acts.append(backbone.activations.float().cpu().numpy())
            gates.append(gate_values.numpy())
            flops.append(real_cost(gate_values, table).numpy() / 1e9)
            flops_ref.append(real_cost(gate_values, reference).numpy() / 1e9)
    finally:
        model.train(was_training)
    if not ids:
        raise ValueError("no images to infer on (empty dataset or index list)")
    routing = InferenceResult(
        sample_ids=np.asarray(ids, dtype=np.int64), files=files, subsets=np.asarray(subsets, dtype=np.int64),
        activations=np.concatenate(acts), gates=np.concatenate(gates), real_gflops=np.concatenate(flops),
        real_gflops_reference=np.concatenate(flops_ref), confusion=None)
    return DetectionInferenceResult(routing, image_ids, results)


def merge_detection_results(parts: Sequence[DetectionInferenceResult]) -> DetectionInferenceResult:
    """Join the shards of several workers (routing ordered by sample id, results concatenated)."""
    parts = [p for p in parts if len(p.image_ids)]
    if not parts:
        raise ValueError("no detection inference results to merge")
    return DetectionInferenceResult(merge_results([p.routing for p in parts]),
                                    sorted(i for p in parts for i in p.image_ids),
                                    [r for p in parts for r in p.results])
