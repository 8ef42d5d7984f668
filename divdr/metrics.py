"""Semantic segmentation mIoU from a confusion matrix, and the ``divdr eval-seg`` command.

Conventions follow cityscapesScripts (``evalPixelLevelSemanticLabeling.py``):

- ground-truth pixels labelled ``IGNORE_INDEX`` (255) are left out entirely;
- a prediction of 255 ("no prediction") on a valid ground-truth pixel is a false negative of that
  pixel's class, and a false positive of no class;
- per-class IoU = TP / (TP + FP + FN); a class absent from both prediction and ground truth has
  denominator 0, its IoU is NaN and it is left out of the mean.

The confusion matrix has ``num_classes`` rows (ground truth) and ``num_classes + 1`` columns
(prediction, the last column counting "no prediction").

Prediction files (``divdr eval-seg``): ``<image id>.png`` holds train ids (0-18, 255 = none);
``<image id>_gtFine_labelIds.png`` holds Cityscapes labelIds (the benchmark's submission format, what
``pipeline/evaluate.py`` writes), mapped to train ids like the ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from divdr.data.labels import IGNORE_INDEX, NUM_CLASSES, TRAIN_ID_NAMES, label_ids_to_train_ids

GT_SUFFIX = "_gtFine_labelIds.png"
PRED_SUFFIX = ".png"
# how many offending ids / values an error message lists before eliding the rest
MAX_LISTED = 10
ArrayLike = np.ndarray | torch.Tensor


class SegEvalError(ValueError):
    """An input to the segmentation evaluation is malformed; the message names the file or field."""


@dataclass(frozen=True)
class SegmentationScores:
    """IoU per class (NaN where a class appears in neither prediction nor ground truth) and their mean."""

    iou: np.ndarray  # [num_classes] float64
    miou: float  # NaN when every class is NaN
    confusion: np.ndarray  # [num_classes, num_classes + 1] int64
    class_names: tuple[str, ...]

    @property
    def per_class(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.class_names, self.iou, strict=True)}

    @property
    def pixel_accuracy(self) -> float:
        """Correct pixels over valid ground-truth pixels (NaN when there are none)."""
        total = int(self.confusion.sum())
        return float(np.trace(self.confusion[:, : len(self.class_names)])) / total if total else math.nan


def _check_values(values: np.ndarray, num_classes: int, extra: int, what: str) -> None:
    bad = np.unique(values[(values < 0) | ((values >= num_classes) & (values != extra))])
    if bad.size:
        raise SegEvalError(
            f"{what}: values {bad.tolist()[:MAX_LISTED]} outside 0-{num_classes - 1} and {extra}"
        )


def confusion_matrix(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
    source: str = "prediction",
) -> np.ndarray:
    """[num_classes, num_classes + 1] counts of (ground truth, prediction) pixel pairs.

    ``pred`` holds train ids or ``ignore_index`` (no prediction); ``target`` holds train ids or
    ``ignore_index`` (left out). Any other value raises SegEvalError naming ``source``.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise SegEvalError(f"{source}: prediction shape {pred.shape} != ground-truth shape {target.shape}")
    for array, what in ((pred, f"{source} (prediction)"), (target, f"{source} (ground truth)")):
        if array.dtype.kind not in "ui":
            raise SegEvalError(f"{what}: labels must be integers, got dtype {array.dtype}")
        _check_values(array, num_classes, ignore_index, what)
    valid = target != ignore_index
    gt = target[valid].astype(np.int64)
    pr = pred[valid].astype(np.int64)
    pr[pr == ignore_index] = num_classes  # the "no prediction" column
    counts = np.bincount(gt * (num_classes + 1) + pr, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN), NaN where the denominator is 0."""
    confusion = np.asarray(confusion, dtype=np.int64)
    num_classes = confusion.shape[0]
    if confusion.ndim != 2 or confusion.shape[1] not in (num_classes, num_classes + 1):
        raise SegEvalError(f"confusion matrix must be [C, C] or [C, C + 1], got shape {confusion.shape}")
    tp = np.diag(confusion[:, :num_classes]).astype(np.float64)
    fn = confusion.sum(axis=1) - tp  # includes "no prediction"
    fp = confusion[:, :num_classes].sum(axis=0) - tp
    denominator = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, tp / np.maximum(denominator, 1), np.nan)


def scores_from_confusion(
    confusion: np.ndarray, class_names: Sequence[str] = TRAIN_ID_NAMES
) -> SegmentationScores:
    iou = iou_from_confusion(confusion)
    if len(class_names) != iou.size:
        raise SegEvalError(f"{len(class_names)} class names for a {iou.size}-class confusion matrix")
    present = ~np.isnan(iou)
    miou = float(iou[present].mean()) if present.any() else math.nan
    return SegmentationScores(iou=iou, miou=miou, confusion=np.asarray(confusion), class_names=tuple(class_names))


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches, on the device of the inputs.

    ``update(pred, target)`` takes label maps [B, H, W] (or logits [B, C, H, W], reduced with argmax)
    and targets [B, H, W] with ``ignore_index`` for pixels to leave out. ``matrix`` is a torch tensor
    that a distributed caller can all-reduce before ``compute()``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX,
                 class_names: Sequence[str] | None = None) -> None:
        if num_classes < 1 or 0 <= ignore_index < num_classes:
            raise SegEvalError(f"need num_classes >= 1 and ignore_index outside 0-{num_classes - 1}, "
                               f"got num_classes={num_classes}, ignore_index={ignore_index}")
        if class_names is None:
            class_names = TRAIN_ID_NAMES if num_classes == NUM_CLASSES else [str(i) for i in range(num_classes)]
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names)
        self.matrix: torch.Tensor | None = None

    def reset(self) -> None:
        self.matrix = None

    def _as_labels(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise SegEvalError(f"logits have {pred.shape[1]} channels, expected {self.num_classes}")
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise SegEvalError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise SegEvalError("label maps must be integer tensors (pass logits with a class dimension)")
        return pred

    def _check(self, values: torch.Tensor, what: str) -> None:
        bad = (values < 0) | ((values >= self.num_classes) & (values != self.ignore_index))
        if bool(bad.any()):
            shown = torch.unique(values[bad]).tolist()[:MAX_LISTED]
            raise SegEvalError(f"{what} values {shown} outside 0-{self.num_classes - 1} and {self.ignore_index}")

    @torch.no_grad()
    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target, device=pred.device)
        pred = self._as_labels(pred, target)
        self._check(pred, "prediction")
        self._check(target, "target")
        width = self.num_classes + 1
        valid = target != self.ignore_index
        gt = target[valid].long()
        pr = pred[valid].long()
        pr = torch.where(pr == self.ignore_index, torch.full_like(pr, self.num_classes), pr)
        counts = torch.bincount(gt * width + pr, minlength=self.num_classes * width).view(self.num_classes, width)
        self.matrix = counts if self.matrix is None else self.matrix + counts.to(self.matrix.device)

    def compute(self) -> SegmentationScores:
        width = self.num_classes + 1
        matrix = (np.zeros((self.num_classes, width), np.int64) if self.matrix is None
                  else self.matrix.cpu().numpy().astype(np.int64))
        return scores_from_confusion(matrix, self.class_names)


# ---------------------------------------------------------------- eval-seg: files on disk


def image_id_from_gt(path: Path) -> str:
    return path.name[: -len(GT_SUFFIX)]


def find_gt_files(gt_dir: Path) -> list[Path]:
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"--gt folder {gt_dir} does not exist")
    files = sorted(gt_dir.rglob(f"*{GT_SUFFIX}"))
    if not files:
        raise SegEvalError(f"--gt folder {gt_dir} holds no *{GT_SUFFIX} files")
    return files


def holds_label_ids(path: Path) -> bool:
    """A prediction named like a gtFine label file holds labelIds; any other ``.png`` train ids."""
    return path.name.endswith(GT_SUFFIX)


def prediction_image_id(path: Path) -> str:
    return path.name[: -len(GT_SUFFIX if holds_label_ids(path) else PRED_SUFFIX)]


def index_predictions(pred_dir: Path) -> dict[str, Path]:
    """Image id -> prediction PNG, searched anywhere under ``pred_dir``; duplicate ids are an error."""
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"--pred folder {pred_dir} does not exist")
    index: dict[str, Path] = {}
    for path in sorted(pred_dir.rglob(f"*{PRED_SUFFIX}")):
        image_id = prediction_image_id(path)
        if image_id in index:
            raise SegEvalError(f"two predictions for image {image_id}: {index[image_id]} and {path}")
        index[image_id] = path
    return index


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel PNG as an integer array; unreadable, truncated or multi-channel files raise."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now so a truncated file fails here, not later
            if image.mode not in ("L", "P", "I", "I;16"):
                raise SegEvalError(f"{path}: expected a single-channel label PNG, got mode {image.mode}")
            return np.array(image)
    except (OSError, SyntaxError, UnidentifiedImageError) as err:
        raise SegEvalError(f"{path}: cannot read PNG ({err})") from err


def evaluate_folders(pred_dir: Path, gt_dir: Path) -> tuple[SegmentationScores, int]:
    """Score prediction PNGs (train ids, or labelIds when named ``*_gtFine_labelIds.png``) against a
    gtFine folder; returns the scores and the image count."""
    gt_files = find_gt_files(gt_dir)
    predictions = index_predictions(pred_dir)
    missing = [image_id_from_gt(p) for p in gt_files if image_id_from_gt(p) not in predictions]
    if missing:
        more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise SegEvalError(f"no prediction {PRED_SUFFIX} under {pred_dir} for image(s) "
                           f"{', '.join(missing[:MAX_LISTED])}{more}")
    total = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)
    for gt_path in gt_files:
        pred_path = predictions[image_id_from_gt(gt_path)]
        target = label_ids_to_train_ids(read_label_png(gt_path), source=str(gt_path))
        pred = read_label_png(pred_path)
        if holds_label_ids(pred_path):
            pred = label_ids_to_train_ids(pred, source=str(pred_path))
        if pred.shape != target.shape:
            raise SegEvalError(f"{pred_path}: size {pred.shape[1]}x{pred.shape[0]} (WxH) differs from "
                               f"ground truth {gt_path} {target.shape[1]}x{target.shape[0]}")
        total += confusion_matrix(pred, target, source=str(pred_path))
    return scores_from_confusion(total), len(gt_files)


def scores_to_json(scores: SegmentationScores, num_images: int) -> dict:
    def clean(value: float) -> float | None:
        return None if math.isnan(value) else value  # JSON has no NaN: absent classes become null

    return {
        "miou": clean(scores.miou),
        "per_class": {name: clean(v) for name, v in scores.per_class.items()},
        "pixel_accuracy": clean(scores.pixel_accuracy),
        "num_images": num_images,
    }
