import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from divdr.cli import main
from divdr.coco_eval import METRIC_NAMES, CocoEvalError, evaluate_coco

AREA_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IMAGES = {0: (60, 80), 1: (60, 80), 2: (120, 160)}  # id -> (height, width); ids start at 0


def _square(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """The iscrowd RLE of COCO files: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[0] else counts}


def _box_mask(image_id: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(IMAGES[image_id], np.uint8)
    mask[rows, cols] = 1
    return mask


def _ann(ann_id: int, image_id: int, category_id: int, segmentation, iscrowd: int = 0) -> dict:
    height, width = IMAGES[image_id]
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        rle = mask_utils.frPyObjects(segmentation, height, width)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": iscrowd}


def _gt() -> dict:
    """3 images, ids from 0, categories 1, 3, 7 and an unused 9, polygons, RLE masks and a crowd region."""
    return {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, (h, w) in IMAGES.items()],
        "categories": [{"id": c, "name": f"c{c}"} for c in (1, 3, 7, 9)],
        "annotations": [
            _ann(0, 0, 1, _square(10, 10, 30, 30)),  # small (400 px)
            _ann(1, 0, 3, _square(35, 15, 75, 55)),  # medium (1600 px)
            _ann(2, 1, 7, _uncompressed_rle(_box_mask(1, slice(5, 45), slice(5, 65)))),  # medium, RLE
            _ann(3, 1, 1, _uncompressed_rle(_box_mask(1, slice(40, 60), slice(60, 80))), iscrowd=1),
            _ann(4, 2, 3, _square(20, 10, 120, 110)),  # large (10000 px)
        ],
    }


def _compressed(segmentation, image_id: int) -> dict:
    height, width = IMAGES[image_id]
    objs = mask_utils.frPyObjects(segmentation, height, width)
    rle = mask_utils.merge(objs) if isinstance(objs, list) else objs
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}  # the results-file form


def _self_results(gt: dict, score: float = 0.9) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score,
             "segmentation": _compressed(a["segmentation"], a["image_id"])}
            for a in gt["annotations"] if not a["iscrowd"]]


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_against_itself_is_perfect(iou_type):
    gt = _gt()
    before = copy.deepcopy(gt)
    scores = evaluate_coco(gt, _self_results(gt), iou_type)
    # annotation id 0 is matched too: plain COCOeval would count that match as a false positive
    for name in AREA_METRICS:
        assert scores[name] == pytest.approx(1.0), name
    assert set(scores) == set(METRIC_NAMES)
    assert gt == before  # inputs are not modified (COCOeval writes 'ignore' into annotations)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_detection_on_crowd_region_is_ignored(iou_type):
    gt = _gt()
    crowd_hit = {"image_id": 1, "category_id": 1, "bbox": [62, 42, 15, 15], "score": 1.0,
                 "segmentation": _compressed(_square(62, 42, 77, 57), 1)}
    # ranked first for category 1: counted as a false positive it would halve that category's AP
    scores = evaluate_coco(gt, [crowd_hit, *_self_results(gt)], iou_type)
    assert scores["AP"] == pytest.approx(1.0)


def test_shifted_boxes_by_hand():
    gt = _gt()
    results = _self_results(gt)
    for r in results:
        r["bbox"] = [r["bbox"][0] + 0.2 * r["bbox"][2], *r["bbox"][1:]]
    # every box moved by 20% of its width: IoU = 0.8 / 1.2 = 2/3, a match at IoU thresholds
    # 0.50, 0.55, 0.60, 0.65 and a miss at the other 6 -> AP = 4/10, AP50 = 1, AP75 = 0
    scores = evaluate_coco(gt, results, "bbox")
    assert scores["AP"] == pytest.approx(0.4)
    assert scores["AP50"] == pytest.approx(1.0)
    assert scores["AP75"] == 0.0


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_empty_results_score_zero(iou_type):
    scores = evaluate_coco(_gt(), [], iou_type)
    for name in AREA_METRICS:
        assert scores[name] == 0.0, name


def test_undefined_metric_is_nan_and_null(tmp_path, capsys):
    gt = _gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 2]  # no large object left
    scores = evaluate_coco(gt, _self_results(gt), "bbox")
    assert math.isnan(scores["APl"]) and scores["APm"] == pytest.approx(1.0)
    args = ["eval-coco", "--gt", str(_write(tmp_path / "gt.json", gt)),
            "--pred", str(_write(tmp_path / "res.json", _self_results(gt))), "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["APl"] is None


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_cli_json_is_pure_json(tmp_path, capsys, iou_type):
    gt = _write(tmp_path / "instances.json", _gt())
    pred = _write(tmp_path / "results.json", _self_results(_gt()))
    assert main(["eval-coco", "--gt", str(gt), "--pred", str(pred), "--iou-type", iou_type, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # pycocotools' prints would break this
    assert out["AP"] == pytest.approx(1.0) and out["num_images"] == 3 and out["num_results"] == 4
    empty = _write(tmp_path / "empty.json", [])
    assert main(["eval-coco", "--gt", str(gt), "--pred", str(empty), "--iou-type", iou_type, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["AP"] == 0.0
    assert main(["eval-coco", "--gt", str(gt), "--pred", str(pred), "--iou-type", iou_type]) == 0
    assert "AP50" in capsys.readouterr().out


def _cli_error(tmp_path, capsys, gt, results, *fragments: str, iou_type: str = "bbox") -> None:
    gt_path = gt if isinstance(gt, Path) else _write(tmp_path / "gt.json", gt)
    res_path = results if isinstance(results, Path) else _write(tmp_path / "res.json", results)
    assert main(["eval-coco", "--gt", str(gt_path), "--pred", str(res_path), "--iou-type", iou_type, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in captured.err, captured.err


def test_bad_ground_truth(tmp_path, capsys):
    res = _self_results(_gt())
    gt = _gt()
    del gt["annotations"][2]["area"]
    _cli_error(tmp_path, capsys, gt, res, "gt.json", "annotations[2]", "'area'")
    gt = _gt()
    del gt["categories"]
    _cli_error(tmp_path, capsys, gt, res, "gt.json", "'categories'")
    gt = _gt()
    del gt["images"][1]["height"]
    _cli_error(tmp_path, capsys, gt, res, "images[1]", "'height'", iou_type="segm")
    gt = _gt()
    gt["annotations"][0]["category_id"] = 5
    _cli_error(tmp_path, capsys, gt, res, "annotations[0]", "category_id 5")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(_gt())[:100])
    _cli_error(tmp_path, capsys, broken, res, str(broken), "cannot read")
    _cli_error(tmp_path, capsys, tmp_path / "absent.json", res, str(tmp_path / "absent.json"))


def test_bad_results(tmp_path, capsys):
    gt = _gt()
    res = _self_results(gt)
    res[1]["image_id"] = 99
    _cli_error(tmp_path, capsys, gt, res, "res.json", "image ids not in the ground truth: [99]")
    res = _self_results(gt)
    res[0]["category_id"] = 9
    res[1]["category_id"] = 4
    _cli_error(tmp_path, capsys, gt, res, "category ids not in the ground truth: [4]")
    res = _self_results(gt)
    del res[3]["score"]
    _cli_error(tmp_path, capsys, gt, res, "res.json", "results[3]", "'score'")
    res = _self_results(gt)
    del res[0]["segmentation"]
    _cli_error(tmp_path, capsys, gt, res, "results[0]", "'segmentation'", iou_type="segm")
    res = _self_results(gt)
    res[0]["segmentation"] = _compressed(_square(1, 1, 5, 5), 2)  # a 120x160 mask on a 60x80 image
    _cli_error(tmp_path, capsys, gt, res, "results[0]", "[120, 160]", iou_type="segm")
    _cli_error(tmp_path, capsys, gt, {"annotations": []}, "must be a JSON list")
    with pytest.raises(CocoEvalError, match="iou type"):
        evaluate_coco(gt, [], "keypoints")


def test_polygon_and_uncompressed_rle_results_accepted():
    gt = _gt()
    results = [{**r, "segmentation": a["segmentation"]}
               for r, a in zip(_self_results(gt), [a for a in gt["annotations"] if not a["iscrowd"]], strict=True)]
    assert evaluate_coco(gt, results, "segm")["AP"] == pytest.approx(1.0)


def test_bad_boxes_and_duplicate_ids_in_the_ground_truth_are_named(tmp_path, capsys):
    res = _self_results(_gt())
    gt = _gt()
    gt["annotations"][1]["bbox"][1] = "a"
    _cli_error(tmp_path, capsys, gt, res, "gt.json", "annotations[1]", "bbox[1] (y) must be a number, got 'a'")
    gt = _gt()
    gt["annotations"][0]["bbox"][2] = -3.0
    _cli_error(tmp_path, capsys, gt, res, "gt.json", "annotations[0]", "bbox width must be >= 0, got -3.0")
    gt = _gt()
    gt["images"][1]["id"] = 0
    _cli_error(tmp_path, capsys, gt, res, "duplicate image id 0 in", "gt.json", "(images[0] and images[1])")
    gt = _gt()
    gt["categories"][2]["id"] = 3
    _cli_error(tmp_path, capsys, gt, res, "duplicate category id 3 in", "gt.json")
    res[0]["bbox"][3] = float("nan")
    _cli_error(tmp_path, capsys, _gt(), res, "res.json", "results[0]", "bbox[3] (height) must be a finite number")
