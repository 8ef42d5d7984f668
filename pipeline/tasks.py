"""What differs between the tasks the training loop runs: data, model, task loss, inference, scores.

``train_loop_per_worker`` is one loop for every task (budget and clustering losses, the centroid
store, checkpoints, faults); it asks a ``TrainingTask`` for the rest:

- ``SegmentationTask``: Cityscapes layout, DR network + naive decoder, cross-entropy, mIoU;
- ``DetectionTask`` (``task: detection | instance``): COCO layout, DR backbone + torchvision FPN and
  Faster / Mask R-CNN heads, torchvision's losses, COCOeval AP (bbox, and segm for instance).

No Ray here: the worker does the sharding, gathering and reporting.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from divdr.backbone import BackboneOutput, set_scale_streams
from divdr.cells import compile_cells
from divdr.config import ConfigError
from divdr.data.cityscapes import CityscapesSegmentation, DatasetError
from divdr.data.coco import CocoDetection, RandomHorizontalFlip, is_degenerate, xywh_to_xyxy_clipped
from divdr.data.labels import IGNORE_INDEX
from divdr.data.manifest import SUBSET_MANIFEST, read_subset_manifest
from divdr.data.transforms import RandomScaleCropFlip, SegTransformConfig
from divdr.detection import build_detector
from divdr.detection_eval import (
    REFERENCE_SIZE as DETECTION_REFERENCE_SIZE,
)
from divdr.detection_eval import (
    DetectionInferenceResult,
    merge_detection_results,
    run_detection_inference,
    score_detections,
)
from divdr.evaluation import InferenceResult, merge_results, run_inference
from divdr.flops import CostTable, cost_table, table_for
from divdr.fused import set_fused_kernels
from divdr.heads import DynamicRoutingSegmenter
from divdr.losses import correctness
from pipeline import model_file
from pipeline.config import ExperimentConfig, TrainConfig, is_uri


def as_configured(net: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    """A freshly built network with ``train.init_from``'s weights (before compiling wraps the cells), then
    ``train.channels_last``, ``train.compile`` and ``train.scale_streams`` (in place, returned). Also switches
    ``train.fused_kernels`` for the process (divdr.fused: a switch of the process, not of a network)."""
    if train.init_from:
        model_file.load_weights(net, Path(train.init_from))
    if train.channels_last:
        net.to(memory_format=torch.channels_last)
    if train.compile:
        compile_cells(net)
    set_scale_streams(net, train.scale_streams)
    set_fused_kernels(train.fused_kernels)
    return net


if TYPE_CHECKING:  # the loop imports the tasks
    from pipeline.loop import CentreState

TARGET_KEYS = ("boxes", "labels")  # what torchvision's detectors read from a target (+ masks for instance)


@dataclass
class TaskStep:
    """One training forward: the task loss, the backbone's routing, the cost table of the batch's
    size, per-image correctness (DRNets eq. 8; None unless the resource loss is on) and the loss
    parts worth logging (detached)."""

    loss: torch.Tensor
    backbone: BackboneOutput
    table: CostTable
    correct: torch.Tensor | None
    parts: dict[str, torch.Tensor]


class TrainingTask(Protocol):
    def train_dataset(self) -> Dataset: ...
    def collate(self, batch: list[Any]) -> dict[str, Any]: ...
    def build_model(self) -> nn.Module: ...
    def forward(self, model: nn.Module, batch: dict[str, Any]) -> TaskStep: ...
    def split_size(self, split: str) -> int: ...
    def inference(self, net: nn.Module, split: str, indices: Sequence[int], score: bool = True) -> Any: ...
    def merge(self, parts: Sequence[Any]) -> Any: ...
    def routing(self, result: Any) -> InferenceResult: ...
    def val_metrics(self, merged: Any) -> dict[str, float]: ...
    def summarize(self, cfg: ExperimentConfig, train: Any, val: Any, centres: CentreState, store_status: dict[str, Any],
                  net: nn.Module, progress: dict[str, int]) -> tuple[dict[str, Any], dict[str, bytes]]: ...


def limit(dataset: Any, count: int) -> Any:
    """The first ``count`` items of ``dataset`` (all of them for 0: ``data.max_*_images``)."""
    return Subset(dataset, range(min(count, len(dataset)))) if count else dataset


class SegmentationTask:
    """Semantic segmentation in the Cityscapes layout (the DR / DivDR main task)."""

    def __init__(self, cfg: ExperimentConfig, root: Path) -> None:
        self.cfg, self.root = cfg, Path(root)
        self.table = cost_table(cfg.model, *cfg.train.crop)  # every training batch is a crop of this size
        self._on_device: dict[tuple, CostTable] = {}

    def train_dataset(self) -> Dataset:
        train = self.cfg.train
        transform = RandomScaleCropFlip(SegTransformConfig(crop_size=tuple(train.crop),
                                                           scale_range=(train.scale_min, train.scale_max)))
        return CityscapesSegmentation(self.root, "train", transform=transform)

    def collate(self, batch: list[dict]) -> dict[str, Any]:
        return {"image": torch.stack([s["image"] for s in batch]), "label": torch.stack([s["label"] for s in batch]),
                "sample_id": [int(s["sample_id"]) for s in batch]}

    def build_model(self) -> nn.Module:
        return as_configured(DynamicRoutingSegmenter(self.cfg.model), self.cfg.train)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> TaskStep:
        out = model(batch["image"])
        label = batch["label"].long()  # loaded as uint8 (8x less to copy), widened where the loss needs it
        loss = F.cross_entropy(out.logits, label, ignore_index=IGNORE_INDEX)
        correct = correctness(out.logits, label, self.cfg.resource) if self.cfg.resource.weight else None
        return TaskStep(loss, out.backbone, table_for(self._on_device, self.table, out.backbone.gates), correct, {})

    def _split(self, split: str) -> CityscapesSegmentation:
        return CityscapesSegmentation(self.root, split)

    def split_size(self, split: str) -> int:
        count = self.cfg.data.max_train_images if split == "train" else self.cfg.data.max_val_images
        return len(limit(self._split(split), count))

    def inference(self, net: nn.Module, split: str, indices: Sequence[int], score: bool = True) -> InferenceResult:
        return run_inference(net, self._split(split), self.cfg.data.eval_batch_size, indices=indices, score=score)

    def merge(self, parts: Sequence[InferenceResult]) -> InferenceResult:
        return merge_results(parts)

    def routing(self, result: InferenceResult) -> InferenceResult:
        return result

    def val_metrics(self, merged: InferenceResult) -> dict[str, float]:
        return {"val/miou": merged.scores.miou, "val/gflops_real": float(merged.real_gflops.mean())}

    def summarize(self, cfg: ExperimentConfig, train: InferenceResult, val: InferenceResult, centres: CentreState,
                  store_status: dict[str, Any], net: nn.Module, progress: dict[str, int],
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
        from pipeline.analysis import summarize_run  # plotting and Parquet: rank 0 only

        return summarize_run(cfg, self.root, train, val, centres, store_status, net, progress)


class DetectionTask:
    """Detection (Faster R-CNN) or instance segmentation (Mask R-CNN) in the COCO layout:
    images in ``{root}/{split}``, annotations in ``{root}/annotations/instances_{split}.json``
    (the generated study's layout, and COCO's own with ``data.train_split: train2017``)."""

    def __init__(self, cfg: ExperimentConfig, root: Path) -> None:
        self.cfg, self.root = cfg, Path(root)
        self.masks = cfg.task == "instance"
        manifest = self.root / SUBSET_MANIFEST
        self.manifest = read_subset_manifest(manifest) if manifest.exists() else {}
        self._splits: dict[tuple[str, bool], CocoDetection] = {}
        self._tables: dict[tuple[int, int], CostTable] = {}
        self._on_device: dict[tuple, CostTable] = {}
        train, val = self._split("train", train=True), self._split("val", train=False)
        if train.category_to_label != val.category_to_label:
            raise DatasetError(f"{train.annotation_json} and {val.annotation_json} list different categories "
                               f"({sorted(train.category_to_label)} vs {sorted(val.category_to_label)}); "
                               "a detector's classes must be the same in both")
        usable = [a for a in train.coco.anns.values() if not a["iscrowd"] and not is_degenerate(
            xywh_to_xyxy_clipped(a["bbox"], train.coco.imgs[a["image_id"]]["width"],
                                 train.coco.imgs[a["image_id"]]["height"]))]
        if not usable:
            raise DatasetError(f"{train.annotation_json}: no usable training annotation (every one is a crowd "
                               "region or a degenerate box, or there are none)")
        self.num_categories = train.num_categories

    def _split(self, split: str, train: bool) -> CocoDetection:
        """``train=True``: crowds left out of the targets (torchvision's references); ``False``: kept."""
        key = (split, train)
        if key not in self._splits:
            name = self.cfg.data.train_split if split == "train" else self.cfg.data.val_split
            self._splits[key] = CocoDetection(self.root / name, self.root / "annotations" / f"instances_{name}.json",
                                              train=train)
        return self._splits[key]

    def train_dataset(self) -> Dataset:
        name = self.cfg.data.train_split
        return CocoDetection(self.root / name, self.root / "annotations" / f"instances_{name}.json", train=True,
                             transform=RandomHorizontalFlip())

    def collate(self, batch: list[tuple[torch.Tensor, dict]]) -> dict[str, Any]:
        keys = TARGET_KEYS + (("masks",) if self.masks else ())  # Faster R-CNN: no masks to resize
        return {"images": [image for image, _ in batch],
                "targets": [{k: target[k] for k in keys} for _, target in batch],
                "sample_id": [int(target["sample_id"]) for _, target in batch]}

    def build_model(self) -> nn.Module:
        return as_configured(build_detector(self.cfg.model, self.cfg.detection, self.num_categories, self.cfg.task),
                             self.cfg.train)

    def _table(self, size: tuple[int, int]) -> CostTable:
        if size not in self._tables:  # torchvision pads each batch: a few sizes at most
            self._tables[size] = cost_table(self.cfg.model, *size, with_decoder=False)
        return self._tables[size]

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> TaskStep:
        out = model(batch["images"], batch["targets"])
        loss = torch.stack(list(out.losses.values())).sum()
        parts = {f"loss/{name}": value.detach() for name, value in out.losses.items()}
        table = table_for(self._on_device, self._table(out.image_size), out.backbone.gates)
        return TaskStep(loss, out.backbone, table, None, parts)

    def split_size(self, split: str) -> int:
        count = self.cfg.data.max_train_images if split == "train" else self.cfg.data.max_val_images
        return len(limit(self._split(split, split == "train"), count))

    def inference(self, net: nn.Module, split: str, indices: Sequence[int],
                  score: bool = True) -> DetectionInferenceResult:
        return run_detection_inference(net, self._split(split, split == "train"), self.cfg.data.eval_batch_size,
                                       indices=indices, manifest=self.manifest, predict=score)

    def merge(self, parts: Sequence[DetectionInferenceResult]) -> DetectionInferenceResult:
        return merge_detection_results(parts)

    def routing(self, result: DetectionInferenceResult) -> InferenceResult:
        return result.routing

    def scores(self, merged: DetectionInferenceResult) -> dict[str, float]:
        iou_types = ("bbox", "segm") if self.masks else ("bbox",)
        return score_detections(self._split("val", False).coco.dataset, merged.results, merged.image_ids, iou_types)

    def val_metrics(self, merged: DetectionInferenceResult) -> dict[str, float]:
        return {**{f"val/{k}": v for k, v in self.scores(merged).items()},
                "val/gflops_real": float(merged.routing.real_gflops.mean())}

    def summarize(self, cfg: ExperimentConfig, train: DetectionInferenceResult, val: DetectionInferenceResult,
                  centres: CentreState, store_status: dict[str, Any], net: nn.Module, progress: dict[str, int],
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
        import json

        from pipeline.analysis import summarize_run

        artifacts = {"detections_val.json": json.dumps(val.results).encode()}
        return summarize_run(cfg, self.root, train.routing, val.routing, centres, store_status, net, progress,
                             task_metrics=self.scores(val), task_artifacts=artifacts,
                             reference_size=DETECTION_REFERENCE_SIZE)


def data_on_this_node(root_text: str | Path, kind: str) -> Path:
    """``data.root`` as this process reads it. A URI (s3://, gs://, file://) is fetched once per node into
    the cache. The embedded study resolved on the driver (its cache folder) is made again here if this node
    lacks it: generation is deterministic, so every node holds the same bytes. Any other root must be at
    the same path on every node (or on shared storage)."""
    if is_uri(root_text):
        return fetch_dataset(str(root_text))
    root = Path(root_text)
    if root.is_dir():
        return root
    from divdr.data.study import StudyConfig
    from divdr.data.synthetic import cache_key, ensure_default_dataset

    if root.name == f"synthetic-{kind}-{cache_key(StudyConfig(), kind)}":
        return ensure_default_dataset(kind=kind)
    raise DatasetError(f"dataset root {root} does not exist on this node ({socket.gethostname()}): --data must be "
                       "at the same path on every node that trains, or on storage they share")


def fetch_dataset(uri: str) -> Path:
    """A dataset URI copied into this node's cache (``$DIVDR_CACHE``, else ~/.cache/divdr) once: later runs
    on the node read the copy. The copy goes to a temporary folder renamed into place, so an interrupted
    fetch is never taken for a complete one."""
    import hashlib
    import shutil
    import tempfile

    import pyarrow as pa
    import pyarrow.fs as pafs

    from divdr.data.synthetic import cache_root

    local = cache_root() / f"remote-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    if local.is_dir():
        return local
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        found = filesystem.get_file_info(path).type
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DatasetError(f"cannot reach dataset {uri}: {err}") from err
    if found != pafs.FileType.Directory:
        raise DatasetError(f"dataset {uri} is not a folder (found: {found.name.lower()})")
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{local.name}-", dir=local.parent))
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
        tmp.rename(local)
    except OSError as err:
        if not local.is_dir():  # not another process of this node fetching it meanwhile
            raise DatasetError(f"cannot fetch dataset {uri} into {local}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def make_task(cfg: ExperimentConfig) -> TrainingTask:
    """The task of ``cfg`` on its dataset (``data.root``, set by the entry point: ``pipeline.train.with_dataset``)."""
    if not cfg.data.root:
        raise ConfigError("data.root is not set: resolve the dataset first (pipeline.train.with_dataset)")
    root = data_on_this_node(cfg.data.root, "seg" if cfg.task == "segmentation" else "det")
    if cfg.task == "segmentation":
        return SegmentationTask(cfg, root)
    if cfg.task in ("detection", "instance"):
        return DetectionTask(cfg, root)
    raise ConfigError(f"task must be 'segmentation', 'detection' or 'instance', got {cfg.task!r}")
