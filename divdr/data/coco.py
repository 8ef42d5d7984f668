"""COCO detection / instance segmentation through pycocotools, in the form torchvision's detectors take.

A sample is ``(image, target)``: image float32 [3, H, W] in [0, 1]; target ``boxes`` float32 [N, 4]
(x1, y1, x2, y2), ``labels`` int64 [N] (contiguous 1..num_categories, 0 is background), ``masks``
uint8 [N, H, W], ``image_id`` (the COCO id), ``area`` float32 [N], ``iscrowd`` int64 [N], plus
``sample_id`` (index in the image list sorted by COCO id) and ``file`` (path under ``image_dir``).

Following torchvision's references: crowd annotations are left out of training targets (``train=True``)
but kept for evaluation; boxes are clipped to the image and degenerate ones (zero width or height)
are dropped, counted in ``dropped_degenerate`` and reported in one warning. A negative width or
height, a non-numeric box entry or a repeated id is an error naming the file and the record.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from divdr.coco_eval import bbox_problem
from divdr.data.cityscapes import MAX_PIXEL_VALUE, DatasetError, read_rgb

REQUIRED_FIELDS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox", "segmentation", "iscrowd"),
    "categories": ("id", "name"),
}


DetectionTarget = dict[str, Any]
DetectionTransform = Callable[[torch.Tensor, DetectionTarget], tuple[torch.Tensor, DetectionTarget]]


def load_coco_json(path: Path) -> dict[str, Any]:
    """Read and validate an instances JSON: every required field of every record, named on failure."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read COCO annotation file {path}: {err}") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with {sorted(REQUIRED_FIELDS)}")
    for section, keys in REQUIRED_FIELDS.items():
        records = data.get(section)
        if not isinstance(records, list):
            raise DatasetError(f"{path}: missing required field {section!r} (a list)")
        for i, record in enumerate(records):
            missing = [k for k in keys if not isinstance(record, dict) or k not in record]
            if missing:
                raise DatasetError(f"{path}: {section}[{i}] is missing required field(s) {missing}")
    _check_references(path, data)
    return data


def _unique_ids(path: Path, records: list[dict[str, Any]], section: str, what: str) -> set[int]:
    """The ids of one section; a non-integer or repeated id is named (pycocotools would silently
    keep the last record of a repeated id, and annotations of the others would look "unknown")."""
    first: dict[int, int] = {}
    for i, record in enumerate(records):
        record_id = record["id"]
        if isinstance(record_id, bool) or not isinstance(record_id, int):
            raise DatasetError(f"{path}: {section}[{i}] id must be an integer, got {record_id!r}")
        if record_id in first:
            raise DatasetError(f"duplicate {what} id {record_id} in {path} "
                               f"({section}[{first[record_id]}] and {section}[{i}])")
        first[record_id] = i
    return set(first)


def _check_bbox(path: Path, i: int, ann: dict[str, Any]) -> None:
    problem = bbox_problem(ann["bbox"])
    if problem:
        raise DatasetError(f"{path}: annotations[{i}] (id {ann['id']}) bbox{problem}")


def _check_references(path: Path, data: dict[str, Any]) -> None:
    image_ids = _unique_ids(path, data["images"], "images", "image")
    category_ids = _unique_ids(path, data["categories"], "categories", "category")
    _unique_ids(path, data["annotations"], "annotations", "annotation")
    for i, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in image_ids:
            raise DatasetError(
                f"{path}: annotations[{i}] (id {ann['id']}) refers to unknown image_id {ann['image_id']}")
        if ann["category_id"] not in category_ids:
            raise DatasetError(
                f"{path}: annotations[{i}] (id {ann['id']}) refers to unknown category_id {ann['category_id']}")
        _check_bbox(path, i, ann)


def build_coco(data: dict[str, Any]) -> COCO:
    """A pycocotools COCO index over already-loaded data (pycocotools prints progress: silenced)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def xywh_to_xyxy_clipped(bbox: list[float], width: int, height: int) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]


def is_degenerate(box: list[float]) -> bool:
    return not (box[2] > box[0] and box[3] > box[1])


class CocoDetection(Dataset):
    """COCO-format detection and instance segmentation (see module docstring for the sample format).

    ``category_to_label`` / ``label_to_category`` map COCO category ids (sorted, possibly sparse)
    to the contiguous labels 1..N and back, to write results in COCO ids for COCOeval.
    """

    def __init__(self, image_dir: str | Path, annotation_json: str | Path, train: bool = True,
                 transform: DetectionTransform | None = None) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_json = Path(annotation_json)
        self.train = train
        self.transform = transform
        self.coco = build_coco(load_coco_json(self.annotation_json))
        self.image_ids = sorted(self.coco.imgs)
        category_ids = sorted(self.coco.cats)
        self.category_to_label = {cat: i + 1 for i, cat in enumerate(category_ids)}
        self.label_to_category = {label: cat for cat, label in self.category_to_label.items()}
        self.category_names = {self.category_to_label[c]: self.coco.cats[c]["name"] for c in category_ids}
        self._check_files_exist()
        self.dropped_degenerate = self._count_degenerate()
        if self.dropped_degenerate:  # once per dataset, not once per sample
            warnings.warn(f"{self.annotation_json}: {self.dropped_degenerate} annotation(s) have a zero-width or "
                          "zero-height box once clipped to the image; they are left out of the targets",
                          stacklevel=2)

    @property
    def num_categories(self) -> int:
        return len(self.category_to_label)

    def _check_files_exist(self) -> None:
        for image_id in self.image_ids:
            path = self.image_dir / self.coco.imgs[image_id]["file_name"]
            if not path.is_file():
                raise DatasetError(f"{self.annotation_json}: image id {image_id} refers to missing file {path}")

    def _annotations(self, image_id: int) -> list[dict[str, Any]]:
        anns = self.coco.imgToAnns.get(image_id, [])
        if self.train:  # torchvision references: crowd regions are not training targets
            anns = [a for a in anns if not a["iscrowd"]]
        return anns

    def _count_degenerate(self) -> int:
        count = 0
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            for ann in self._annotations(image_id):
                count += is_degenerate(xywh_to_xyxy_clipped(ann["bbox"], info["width"], info["height"]))
        return count

    def __len__(self) -> int:
        return len(self.image_ids)

    def _load_image(self, info: dict[str, Any]) -> torch.Tensor:
        path = self.image_dir / info["file_name"]
        rgb = read_rgb(path)
        if (rgb.height, rgb.width) != (info["height"], info["width"]):
            raise DatasetError(
                f"image {path} is {rgb.width}x{rgb.height} (WxH) but {self.annotation_json} says "
                f"{info['width']}x{info['height']} for image id {info['id']}"
            )
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / MAX_PIXEL_VALUE

    def target(self, index: int) -> DetectionTarget:
        """The target of one image, without decoding the image itself."""
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        boxes, labels, masks, areas, crowd = [], [], [], [], []
        for ann in self._annotations(image_id):
            box = xywh_to_xyxy_clipped(ann["bbox"], width, height)
            if is_degenerate(box):
                continue
            boxes.append(box)
            labels.append(self.category_to_label[ann["category_id"]])
            masks.append(self._decode_mask(ann, height, width))
            areas.append(float(ann.get("area", mask_utils.area(self.coco.annToRLE(ann)))))
            crowd.append(int(ann["iscrowd"]))
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
            "image_id": image_id,
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.tensor(crowd, dtype=torch.int64),
            "sample_id": index,
            "file": info["file_name"],
        }

    def _decode_mask(self, ann: dict[str, Any], height: int, width: int) -> np.ndarray:
        """Polygons, uncompressed RLE (crowds) or compressed RLE, all through pycocotools."""
        try:
            with warnings.catch_warnings():  # pycocotools' decode warns under numpy 2 on every call
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = self.coco.annToMask(ann)
        except Exception as err:  # pycocotools raises bare TypeErrors/ValueErrors on malformed input
            raise DatasetError(
                f"{self.annotation_json}: cannot decode the segmentation of annotation id {ann['id']}: {err}"
            ) from err
        if mask.shape != (height, width):
            raise DatasetError(f"{self.annotation_json}: annotation id {ann['id']} mask is {mask.shape}, "
                               f"image is {(height, width)}")
        return mask.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, DetectionTarget]:
        image = self._load_image(self.coco.imgs[self.image_ids[index]])
        target = self.target(index)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def collate_fn(batch: list[tuple[torch.Tensor, DetectionTarget]]) -> tuple[list[torch.Tensor], list[DetectionTarget]]:
    """Detection batches stay lists: images differ in size and targets in instance count."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


class RandomHorizontalFlip:
    """Flip an image with its boxes and masks with probability ``probability``: the only augmentation
    of the DivDR / DR COCO training ("random flip is adopted without random scaling")."""

    def __init__(self, probability: float = 0.5) -> None:
        if not 0 <= probability <= 1:
            raise ValueError(f"flip probability must be in [0, 1], got {probability}")
        self.probability = probability

    def __call__(self, image: torch.Tensor, target: DetectionTarget) -> tuple[torch.Tensor, DetectionTarget]:
        if float(torch.rand(())) >= self.probability:
            return image, target
        width = image.shape[-1]
        flipped = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]  # x1' = W - x2, x2' = W - x1
        flipped["boxes"] = boxes
        flipped["masks"] = target["masks"].flip(-1)
        return image.flip(-1), flipped
