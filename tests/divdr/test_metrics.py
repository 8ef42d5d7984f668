import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divdr.cli import main
from divdr.data.labels import LABEL_ID_BY_NAME, NUM_CLASSES, TRAIN_ID_NAMES
from divdr.metrics import (
    ConfusionMatrix,
    SegEvalError,
    confusion_matrix,
    evaluate_folders,
    iou_from_confusion,
    scores_from_confusion,
)

# 4 classes; 255 = ignored in the ground truth, "no prediction" in the prediction
TARGET = np.array([0, 0, 0, 1, 1, 2, 255, 255], dtype=np.uint8)
PRED = np.array([0, 0, 1, 1, 2, 255, 2, 3], dtype=np.uint8)
# class 0: TP 2 (px 0,1), FN 1 (px 2 -> 1), FP 0            -> 2 / 3
# class 1: TP 1 (px 3), FP 1 (px 2), FN 1 (px 4 -> 2)        -> 1 / 3
# class 2: TP 0, FP 1 (px 4), FN 1 (px 5 has no prediction)  -> 0 / 2 = 0
# class 3: predicted only on an ignored pixel (px 7): 0 / 0  -> NaN, left out of the mean
# mIoU = (2/3 + 1/3 + 0) / 3 = 1/3
EXPECTED_IOU = [2 / 3, 1 / 3, 0.0, math.nan]
NAMES = ("a", "b", "c", "d")


def test_miou_by_hand():
    conf = confusion_matrix(PRED, TARGET, num_classes=4)
    assert conf.shape == (4, 5)
    assert conf.sum() == 6  # the two ignored gt pixels are not counted
    assert conf[2, 4] == 1  # gt class 2, no prediction
    np.testing.assert_allclose(iou_from_confusion(conf), EXPECTED_IOU)
    scores = scores_from_confusion(conf, NAMES)
    assert scores.miou == pytest.approx(1 / 3)
    assert math.isnan(scores.per_class["d"])
    assert scores.pixel_accuracy == pytest.approx(3 / 6)


def test_all_classes_absent_gives_nan_mean():
    conf = confusion_matrix(np.full(4, 255, np.uint8), np.full(4, 255, np.uint8), num_classes=4)
    scores = scores_from_confusion(conf, NAMES)
    assert np.isnan(scores.iou).all() and math.isnan(scores.miou)


def test_ignored_gt_pixels_do_not_count_whatever_is_predicted():
    target = np.array([0, 255, 255], np.uint8)
    for pred in ([0, 1, 2], [0, 0, 0], [0, 255, 3]):
        conf = confusion_matrix(np.array(pred, np.uint8), target, num_classes=4)
        np.testing.assert_array_equal(iou_from_confusion(conf), [1.0, np.nan, np.nan, np.nan])


def test_bad_values_and_shapes_raise():
    with pytest.raises(SegEvalError, match=r"prediction.*\[7\]"):
        confusion_matrix(np.array([7], np.uint8), np.array([0], np.uint8), num_classes=4)
    with pytest.raises(SegEvalError, match=r"ground truth.*\[4\]"):
        confusion_matrix(np.array([0], np.uint8), np.array([4], np.uint8), num_classes=4)
    with pytest.raises(SegEvalError, match="shape"):
        confusion_matrix(np.zeros(2, np.uint8), np.zeros(3, np.uint8), num_classes=4)


def test_accumulator_matches_numpy_over_batches_and_logits():
    acc = ConfusionMatrix(num_classes=4, class_names=NAMES)
    acc.update(torch.from_numpy(PRED[:5]).view(1, 1, 5), torch.from_numpy(TARGET[:5]).view(1, 1, 5))
    acc.update(PRED[5:].reshape(1, 1, 3), TARGET[5:].reshape(1, 1, 3))
    scores = acc.compute()
    np.testing.assert_allclose(scores.iou, EXPECTED_IOU)
    assert scores.miou == pytest.approx(1 / 3)

    logits = torch.zeros(1, 4, 1, 3)
    logits[0, [2, 1, 1], 0, [0, 1, 2]] = 1.0  # argmax -> [2, 1, 1]
    acc.reset()
    acc.update(logits, torch.tensor([[[2, 1, 0]]]))
    np.testing.assert_allclose(acc.compute().iou, [0.0, 0.5, 1.0, np.nan])
    with pytest.raises(SegEvalError, match=r"target values \[9\]"):
        acc.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 9]]))


def test_empty_accumulator_is_nan():
    assert math.isnan(ConfusionMatrix().compute().miou)


# ---------------------------------------------------------------- eval-seg on files

ROAD, CAR = LABEL_ID_BY_NAME["road"], LABEL_ID_BY_NAME["car"]
ROAD_T, CAR_T = TRAIN_ID_NAMES.index("road"), TRAIN_ID_NAMES.index("car")
IMAGES = {"aachen": "aachen_000000_000019", "bochum": "bochum_000000_000313"}


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)
    return path


def _gt_labels() -> np.ndarray:
    labels = np.full((4, 6), ROAD, np.uint8)
    labels[:2, :3] = CAR
    labels[3, :] = LABEL_ID_BY_NAME["unlabeled"]  # -> 255, ignored
    return labels


def _write_dataset(root: Path) -> tuple[Path, Path]:
    gt, pred = root / "gtFine", root / "pred"
    for city, image_id in IMAGES.items():
        _png(gt / "val" / city / f"{image_id}_gtFine_labelIds.png", _gt_labels())
        train = np.where(_gt_labels() == CAR, CAR_T, np.where(_gt_labels() == ROAD, ROAD_T, 255))
        # predictions anywhere under --pred: one flat, one nested
        sub = pred if city == "aachen" else pred / "nested" / city
        _png(sub / f"{image_id}.png", train)
    return gt, pred


def _eval_json(capsys, pred: Path, gt: Path) -> dict:
    assert main(["eval-seg", "--pred", str(pred), "--gt", str(gt), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_seg_perfect_and_imperfect(tmp_path, capsys):
    gt, pred = _write_dataset(tmp_path)
    out = _eval_json(capsys, pred, gt)
    assert out["miou"] == 1.0 and out["num_images"] == 2
    assert out["per_class"]["road"] == 1.0 and out["per_class"]["car"] == 1.0
    assert out["per_class"]["person"] is None and len(out["per_class"]) == NUM_CLASSES

    # aachen: predict road on its 6 car pixels. Over both images: car TP 6, FN 6 -> 0.5;
    # road TP 24 (12 per image), FP 6 -> 24/30 = 0.8; mIoU = 0.65
    wrong = np.full((4, 6), ROAD_T)
    wrong[3, :] = 255
    _png(pred / "aachen_000000_000019.png", wrong)
    out = _eval_json(capsys, pred, gt)
    assert out["per_class"]["car"] == pytest.approx(0.5)
    assert out["per_class"]["road"] == pytest.approx(0.8)
    assert out["miou"] == pytest.approx(0.65)

    assert main(["eval-seg", "--pred", str(pred), "--gt", str(gt)]) == 0
    assert "mIoU" in capsys.readouterr().out


def _expect_error(capsys, pred: Path, gt: Path, *fragments: str) -> None:
    assert main(["eval-seg", "--pred", str(pred), "--gt", str(gt), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in captured.err


def test_eval_seg_missing_prediction(tmp_path, capsys):
    gt, pred = _write_dataset(tmp_path)
    (pred / "nested" / "bochum" / "bochum_000000_000313.png").unlink()
    _expect_error(capsys, pred, gt, "bochum_000000_000313")


def test_eval_seg_size_mismatch(tmp_path, capsys):
    gt, pred = _write_dataset(tmp_path)
    bad = _png(pred / "aachen_000000_000019.png", np.zeros((4, 5)))
    _expect_error(capsys, pred, gt, str(bad), "5x4")


def test_eval_seg_truncated_png(tmp_path, capsys):
    gt, pred = _write_dataset(tmp_path)
    path = pred / "aachen_000000_000019.png"
    path.write_bytes(path.read_bytes()[:40])
    _expect_error(capsys, pred, gt, str(path), "cannot read")


def test_eval_seg_values_out_of_range(tmp_path, capsys):
    gt, pred = _write_dataset(tmp_path)
    path = _png(pred / "aachen_000000_000019.png", np.full((4, 6), 19))
    _expect_error(capsys, pred, gt, str(path), "[19]")


def test_eval_seg_bad_gt_label_id(tmp_path, capsys):
    gt, pred = _write_dataset(tmp_path)
    path = _png(gt / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", np.full((4, 6), 40))
    _expect_error(capsys, pred, gt, str(path), "[40]")


def test_eval_seg_empty_or_missing_gt(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    _expect_error(capsys, tmp_path / "pred", tmp_path / "gt", str(tmp_path / "gt"), "no *_gtFine_labelIds.png")
    _expect_error(capsys, tmp_path / "pred", tmp_path / "nope", str(tmp_path / "nope"))


def test_evaluate_folders_rejects_rgb_and_duplicates(tmp_path):
    gt, pred = _write_dataset(tmp_path)
    rgb = pred / "aachen_000000_000019.png"
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(rgb)
    with pytest.raises(SegEvalError, match="mode RGB"):
        evaluate_folders(pred, gt)
    _png(rgb, np.zeros((4, 6)))
    _png(pred / "nested" / "aachen_000000_000019.png", np.zeros((4, 6)))
    with pytest.raises(SegEvalError, match="two predictions for image aachen_000000_000019"):
        evaluate_folders(pred, gt)


def test_eval_seg_reads_label_ids_predictions_named_like_gtfine_files(tmp_path, capsys):
    gt, pred = _write_dataset(tmp_path)
    train_ids = _eval_json(capsys, pred, gt)
    labels = tmp_path / "label_ids"
    for city, image_id in IMAGES.items():
        # the benchmark's format: labelIds, the ignored row predicted "unlabeled" (no prediction)
        _png(labels / "val" / city / f"{image_id}_gtFine_labelIds.png", _gt_labels())
    assert _eval_json(capsys, labels, gt) == train_ids
    both = _png(labels / "aachen_000000_000019.png", np.zeros((4, 6)))  # the same image in both formats
    _expect_error(capsys, labels, gt, "two predictions for image aachen_000000_000019")
    both.unlink()
    bad = _png(labels / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", np.full((4, 6), 40))
    _expect_error(capsys, labels, gt, str(bad), "[40]")  # a labelIds file is checked as one
