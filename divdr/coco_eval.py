"""COCO bbox / segm mAP through pycocotools ``COCOeval``, and the ``divdr eval-coco`` command.

What this adds around ``COCOeval`` (each a pycocotools quirk met with real files):

- ground-truth annotation ids are renumbered 1..n on a copy. ``COCOeval.evaluateImg`` stores the id of
  the matched ground truth in ``dtMatches`` and ``accumulate`` treats a match as "matched id != 0",
  so a detection matched to annotation id 0 counts as a false positive (self-evaluation gives AP 0.5
  instead of 1.0 on a two-annotation file);
- the results are indexed without ``COCO.loadRes``: it crashes on an empty list (``anns[0]``), and when
  a result carries both ``bbox`` and ``segmentation`` it takes the box area even for segm evaluation;
- an empty results list scores AP 0 (every ground truth missed), not a crash;
- categories no annotation uses and crowd regions (``iscrowd=1``, RLE) are left to COCOeval, which skips
  the former and ignores detections matched to the latter;
- required fields are checked up front, so a malformed file fails naming the file, entry and field;
- pycocotools' prints are captured unless ``verbose`` (so ``--json`` prints pure JSON).

Scores are fractions in [0, 1]. COCOeval reports -1 where a metric is undefined (no ground truth in
that area range or in any category): those come back as NaN from ``evaluate_coco`` and as null in JSON.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IouType = Literal["bbox", "segm"]
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
# the order of COCOeval.stats after summarize()
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                 "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
UNDEFINED = -1.0  # COCOeval's marker for "no ground truth to score against"
MAX_LISTED = 10
GT_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "area", "iscrowd")
RESULT_FIELDS = ("image_id", "category_id", "score")


class CocoEvalError(ValueError):
    """A COCO file or results list is malformed; the message names the file, entry and field."""


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[io.StringIO]:
    """Capture pycocotools' prints (it writes progress to stdout) unless ``verbose``."""
    buffer = io.StringIO()
    if verbose:
        yield buffer
        return
    with contextlib.redirect_stdout(buffer):
        yield buffer


def load_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CocoEvalError(f"cannot read {what} file {path}: {err}") from err


# ---------------------------------------------------------------- ground truth


def _require_fields(entry: Any, fields: Sequence[str], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise CocoEvalError(f"{where} must be a JSON object, got {type(entry).__name__}")
    for name in fields:
        if name not in entry:
            raise CocoEvalError(f"{where} has no '{name}' field")


BBOX_FIELDS = ("x", "y", "width", "height")


def bbox_problem(bbox: Any) -> str | None:
    """What is wrong with a COCO ``[x, y, width, height]``, said after the word "bbox", or None. Four
    finite numbers, width and height >= 0: COCOeval fails on a string with a bare "could not convert",
    and a negative box is a broken annotation (not an empty one) that would be scored without a word."""
    if not (isinstance(bbox, Sequence) and not isinstance(bbox, str) and len(bbox) == 4):
        return f" must be [x, y, width, height], got {bbox!r}"
    for j, (name, number) in enumerate(zip(BBOX_FIELDS, bbox, strict=True)):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            return f"[{j}] ({name}) must be a number, got {number!r}"
        if not math.isfinite(number):
            return f"[{j}] ({name}) must be a finite number, got {number!r}"
    for name, number in zip(BBOX_FIELDS[2:], bbox[2:], strict=True):
        if number < 0:
            return f" {name} must be >= 0, got {number} (bbox {list(bbox)})"
    return None


def _check_bbox(value: Any, where: str) -> None:
    problem = bbox_problem(value)
    if problem:
        raise CocoEvalError(f"{where}: bbox{problem}")


def _id_set(entries: Sequence[Mapping], field: str, where: str) -> set:
    try:
        return {entry[field] for entry in entries}
    except TypeError:  # a list or object where an id belongs
        bad = next(e[field] for e in entries if not isinstance(e[field], (int, str)))
        raise CocoEvalError(f"{where}: '{field}' values must be numbers or strings, got {bad!r}") from None


def _raise_duplicate(entries: Sequence[Mapping], section: str, what: str, source: str) -> None:
    first: dict[Any, int] = {}
    for i, entry in enumerate(entries):
        if entry["id"] in first:
            raise CocoEvalError(f"duplicate {what} id {entry['id']!r} in {source} "
                                f"({section}[{first[entry['id']]}] and {section}[{i}])")
        first[entry["id"]] = i


def validate_gt(dataset: Any, source: str, iou_type: IouType) -> None:
    """Check the fields COCOeval reads; raise CocoEvalError naming ``source``, the entry and the field."""
    if not isinstance(dataset, Mapping):
        raise CocoEvalError(f"{source}: expected a COCO instances JSON object, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise CocoEvalError(f"{source}: missing or non-list '{key}' field")
    image_fields = ("id", "height", "width") if iou_type == "segm" else ("id",)
    for i, image in enumerate(dataset["images"]):
        _require_fields(image, image_fields, f"{source}: images[{i}]")
    for i, category in enumerate(dataset["categories"]):
        _require_fields(category, ("id",), f"{source}: categories[{i}]")
    image_ids = _id_set(dataset["images"], "id", f"{source}: images")
    category_ids = _id_set(dataset["categories"], "id", f"{source}: categories")
    for section, ids, what in (("images", image_ids, "image"), ("categories", category_ids, "category")):
        if len(ids) < len(dataset[section]):  # pycocotools would keep the last of a repeated id, silently
            _raise_duplicate(dataset[section], section, what, source)
    shape_field = "bbox" if iou_type == "bbox" else "segmentation"
    for i, ann in enumerate(dataset["annotations"]):
        where = f"{source}: annotations[{i}]"
        _require_fields(ann, (*GT_ANNOTATION_FIELDS, shape_field), where)
        if iou_type == "bbox":
            _check_bbox(ann["bbox"], where)
        if ann["image_id"] not in image_ids:
            raise CocoEvalError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise CocoEvalError(f"{where}: category_id {ann['category_id']!r} is not in 'categories'")


def _index(dataset: dict, verbose: bool) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _quiet(verbose):
        coco.createIndex()
    return coco


def load_gt(gt: str | Path | COCO | Mapping, iou_type: IouType, verbose: bool = False) -> COCO:
    """A validated, indexed copy of the ground truth with annotation ids renumbered 1..n (see module doc)."""
    if isinstance(gt, COCO):
        dataset, source = gt.dataset, "ground-truth COCO object"
    elif isinstance(gt, Mapping):
        dataset, source = gt, "ground-truth dict"
    else:
        dataset, source = load_json(gt, "ground-truth"), str(gt)
    validate_gt(dataset, source, iou_type)
    renumbered = dict(dataset)
    # shallow copies: COCOeval writes 'ignore' into ground-truth annotations, the caller's stay untouched
    renumbered["annotations"] = [{**ann, "id": i} for i, ann in enumerate(dataset["annotations"], start=1)]
    return _index(renumbered, verbose)


# ---------------------------------------------------------------- results


def _result_rle(segmentation: Any, image: Mapping, where: str) -> dict:
    """Polygons or (un)compressed RLE -> compressed RLE of the image's size."""
    height, width = image["height"], image["width"]
    try:
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(dict(segmentation), height, width)
        elif isinstance(segmentation, Mapping) and "counts" in segmentation and "size" in segmentation:
            rle = dict(segmentation)
        else:
            raise CocoEvalError(f"{where}: 'segmentation' must be polygons or an RLE {{size, counts}}")
    except (TypeError, ValueError, IndexError) as err:
        if isinstance(err, CocoEvalError):
            raise
        raise CocoEvalError(f"{where}: bad 'segmentation' ({err})") from err
    if list(rle["size"]) != [height, width]:
        raise CocoEvalError(f"{where}: RLE size {list(rle['size'])} != image {image['id']} size [{height}, {width}]")
    return rle


def _result_annotation(result: Any, index: int, gt: COCO, iou_type: IouType, source: str) -> dict:
    where = f"{source}: results[{index}]"
    shape_field = "bbox" if iou_type == "bbox" else "segmentation"
    _require_fields(result, (*RESULT_FIELDS, shape_field), where)
    ann = {key: result[key] for key in (*RESULT_FIELDS, shape_field)}
    ann.update(id=index + 1, iscrowd=0)  # ids from 1 (COCOeval reads id 0 as "unmatched")
    if iou_type == "bbox":
        _check_bbox(ann["bbox"], where)
        ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    else:
        rle = _result_rle(ann["segmentation"], gt.imgs[ann["image_id"]], where)
        ann["segmentation"] = rle
        ann["area"] = float(mask_utils.area(rle))
        ann["bbox"] = mask_utils.toBbox(rle).tolist()
    return ann


def _check_ids(results: Sequence[Mapping], gt: COCO, source: str) -> None:
    for field, known, name in (("image_id", gt.imgs, "image"), ("category_id", gt.cats, "category")):
        unknown = sorted(_id_set(results, field, f"{source}: results") - set(known), key=repr)
        if unknown:
            raise CocoEvalError(f"{source}: results refer to {name} ids not in the ground truth: "
                                f"{unknown[:MAX_LISTED]}{' ...' if len(unknown) > MAX_LISTED else ''}")


def results_coco(results: str | Path | Sequence[Mapping], gt: COCO, iou_type: IouType,
                 verbose: bool = False) -> COCO:
    """Index detections in the COCO results format (a list, or a JSON file of one) against ``gt``."""
    if isinstance(results, (str, Path)):
        source, results = str(results), load_json(results, "results")
    else:
        source = "results list"
    if not isinstance(results, list):
        raise CocoEvalError(f"{source}: COCO results must be a JSON list, got {type(results).__name__}")
    for i, result in enumerate(results):
        _require_fields(result, RESULT_FIELDS, f"{source}: results[{i}]")
    _check_ids(results, gt, source)
    anns = [_result_annotation(r, i, gt, iou_type, source) for i, r in enumerate(results)]
    dataset = {"images": gt.dataset["images"], "categories": copy.deepcopy(gt.dataset["categories"]),
               "annotations": anns}
    return _index(dataset, verbose)


# ---------------------------------------------------------------- evaluation


def _clean(value: float) -> float:
    return math.nan if value <= UNDEFINED else float(value)


def score(coco_gt: COCO, coco_dt: COCO, iou_type: IouType, verbose: bool = False) -> dict[str, float]:
    """Run COCOeval on indexed ground truth and detections; -1 (undefined) becomes NaN."""
    with _quiet(verbose):
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: _clean(v) for name, v in zip(METRIC_NAMES, np.asarray(evaluator.stats), strict=True)}


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise CocoEvalError(f"iou type must be one of {IOU_TYPES}, got {iou_type!r}")


def evaluate_coco(
    gt: str | Path | COCO | Mapping,
    results: str | Path | Sequence[Mapping],
    iou_type: IouType = "bbox",
    verbose: bool = False,
) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (and AR1..ARl) of ``results`` against ``gt``, fractions in [0, 1].

    ``gt``: a path to an instances JSON, a loaded ``COCO`` or its dict; ``results``: a path to a COCO
    results JSON or the list itself. NaN marks a metric COCOeval cannot define (its -1): e.g. APs when
    no ground truth is small. Neither input is modified.
    """
    _check_iou_type(iou_type)
    coco_gt = load_gt(gt, iou_type, verbose)
    return score(coco_gt, results_coco(results, coco_gt, iou_type, verbose), iou_type, verbose)
