"""CocoDetection on the generated COCO export and on hand-written instances JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from divdr.data.cityscapes import DatasetError
from divdr.data.coco import CocoDetection, collate_fn
from divdr.data.labels import LABEL_ID_BY_NAME

from .conftest import SMALL

# the hand-written file has one zero-width box on purpose; the warning about it is tested on its own
pytestmark = pytest.mark.filterwarnings("ignore:.*zero-width or zero-height box:UserWarning")

OBJECT_IDS = sorted(LABEL_ID_BY_NAME[c] for c in SMALL.object_classes)


def det_split(root: Path, split: str, train: bool) -> CocoDetection:
    return CocoDetection(root / split, root / "annotations" / f"instances_{split}.json", train=train)


def test_generated_categories_are_contiguous_and_invertible(small_det_study: Path) -> None:
    dataset = det_split(small_det_study, "train", train=True)
    assert OBJECT_IDS == [17, 19, 20, 24, 26]  # Cityscapes label ids: sparse on purpose
    assert dataset.category_to_label == {cat: i + 1 for i, cat in enumerate(OBJECT_IDS)}
    assert {dataset.label_to_category[label] for label in range(1, 6)} == set(OBJECT_IDS)
    assert dataset.category_names[dataset.category_to_label[26]] == "car"
    labels = torch.cat([dataset.target(i)["labels"] for i in range(len(dataset))])
    assert labels.min() >= 1 and labels.max() <= dataset.num_categories


def test_generated_json_uses_polygons_and_both_rle_forms(small_det_study: Path) -> None:
    data = json.loads((small_det_study / "annotations" / "instances_train.json").read_text())
    kinds = {("polygon" if isinstance(a["segmentation"], list) else type(a["segmentation"]["counts"]).__name__,
              a["iscrowd"]) for a in data["annotations"]}
    assert kinds == {("polygon", 0), ("str", 0), ("list", 1)}  # compressed RLE, crowd = uncompressed RLE
    assert min(a["id"] for a in data["annotations"]) > 1  # annotation ids need not start at 1


def test_every_encoding_decodes_to_its_area_and_box(small_det_study: Path) -> None:
    dataset = det_split(small_det_study, "train", train=False)
    for index in range(len(dataset)):
        target = dataset.target(index)
        for box, mask, area in zip(target["boxes"], target["masks"], target["area"], strict=True):
            ys, xs = np.nonzero(mask.numpy())
            assert mask.sum().item() == pytest.approx(area.item())
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_masks_match_the_segmentation_rendering_of_the_same_scene(small_det_study: Path,
                                                                  small_seg_study: Path) -> None:
    """The det and seg exports of one config draw identical scenes: masks must cover exactly the
    pixels the labelIds give to object classes, each with its own category."""
    dataset = det_split(small_det_study, "train", train=False)
    compared = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        stem = target["file"].removesuffix(".png")
        if stem.startswith("empty"):
            continue
        city = stem.split("_")[0]
        label_ids = np.asarray(Image.open(small_seg_study / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png"))
        seg_image = np.asarray(Image.open(small_seg_study / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png"))
        assert np.array_equal((image * 255).round().byte().permute(1, 2, 0).numpy(), seg_image)
        masks = target["masks"].numpy().astype(bool)
        assert not (masks.sum(0) > 1).any()  # objects do not overlap
        assert np.array_equal(masks.any(0), np.isin(label_ids, OBJECT_IDS))
        for mask, label in zip(masks, target["labels"].tolist(), strict=True):
            assert (label_ids[mask] == dataset.label_to_category[label]).all()
        compared += 1
    assert compared == SMALL.n_train


def test_crowds_are_training_exclusions_but_evaluation_targets(small_det_study: Path) -> None:
    data = json.loads((small_det_study / "annotations" / "instances_train.json").read_text())
    n_crowd = sum(a["iscrowd"] for a in data["annotations"])
    assert n_crowd >= 1
    train = det_split(small_det_study, "train", train=True)
    evaluation = det_split(small_det_study, "train", train=False)
    assert sum(train.target(i)["iscrowd"].sum().item() for i in range(len(train))) == 0
    assert sum(evaluation.target(i)["iscrowd"].sum().item() for i in range(len(evaluation))) == n_crowd
    assert sum(len(evaluation.target(i)["boxes"]) for i in range(len(evaluation))) == len(data["annotations"])


def test_empty_images_have_well_shaped_targets(small_det_study: Path) -> None:
    dataset = det_split(small_det_study, "val", train=True)
    empties = [i for i in range(len(dataset)) if dataset.target(i)["file"].startswith("empty")]
    assert len(empties) == SMALL.det_empty_images
    image, target = dataset[empties[0]]
    assert image.shape == (3, SMALL.height, SMALL.width) and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (0, SMALL.height, SMALL.width) and target["masks"].dtype == torch.uint8
    assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)


# ------------------------------------------------------------------------------------------ hand-written


def write_image(path: Path, height: int = 10, width: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8)).save(path)


def hand_written(tmp_path: Path) -> tuple[Path, dict]:
    """Sparse, unsorted category ids; annotation ids from 500; a degenerate box; a crowd; an empty image."""
    crowd_mask = np.zeros((10, 12), dtype=np.uint8, order="F")
    crowd_mask[5:9, 1:4] = 1
    crowd_rle = mask_utils.encode(crowd_mask)
    data = {
        "images": [{"id": 42, "file_name": "a.png", "height": 10, "width": 12},
                   {"id": 7, "file_name": "sub/b.png", "height": 10, "width": 12}],
        "categories": [{"id": 90, "name": "toaster"}, {"id": 3, "name": "car"}, {"id": 7, "name": "bike"}],
        "annotations": [
            {"id": 500, "image_id": 42, "category_id": 90, "bbox": [2, 1, 4, 3], "iscrowd": 0, "area": 12,
             "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]},
            {"id": 501, "image_id": 42, "category_id": 3, "bbox": [8, 2, 0, 5], "iscrowd": 0, "area": 0,
             "segmentation": [[8, 2, 8, 2, 8, 7]]},  # zero width: degenerate
            {"id": 502, "image_id": 42, "category_id": 7, "bbox": [1, 5, 3, 4], "iscrowd": 1, "area": 12,
             "segmentation": {"size": [10, 12], "counts": crowd_rle["counts"].decode()}},
        ],
    }
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "images" / "sub" / "b.png")
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, data


def test_hand_written_training_targets(tmp_path: Path) -> None:
    path, _ = hand_written(tmp_path)
    dataset = CocoDetection(tmp_path / "images", path, train=True)
    assert dataset.category_to_label == {3: 1, 7: 2, 90: 3}
    assert dataset.label_to_category == {1: 3, 2: 7, 3: 90}
    assert dataset.dropped_degenerate == 1
    assert [dataset.target(i)["image_id"] for i in range(2)] == [7, 42]  # sorted by COCO id
    _, target = dataset[1]
    assert target["sample_id"] == 1 and target["file"] == "a.png"
    assert target["boxes"].tolist() == [[2.0, 1.0, 6.0, 4.0]]  # crowd and degenerate box left out
    assert target["labels"].tolist() == [3]
    assert target["masks"].shape == (1, 10, 12) and target["masks"][0].sum().item() == 12
    assert target["masks"][0, 1:4, 2:6].all()


def test_hand_written_evaluation_keeps_crowd_rle(tmp_path: Path) -> None:
    path, _ = hand_written(tmp_path)
    target = CocoDetection(tmp_path / "images", path, train=False).target(1)
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["labels"].tolist() == [3, 2]
    assert target["masks"][1, 5:9, 1:4].all() and target["masks"][1].sum().item() == 12
    assert target["boxes"][1].tolist() == [1.0, 5.0, 4.0, 9.0]


def test_image_without_annotations(tmp_path: Path) -> None:
    path, _ = hand_written(tmp_path)
    image, target = CocoDetection(tmp_path / "images", path)[0]
    assert target["file"] == "sub/b.png" and image.shape == (3, 10, 12)
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 10, 12)


def test_collate_keeps_lists(tmp_path: Path) -> None:
    path, _ = hand_written(tmp_path)
    dataset = CocoDetection(tmp_path / "images", path)
    images, targets = collate_fn([dataset[0], dataset[1]])
    assert isinstance(images, list) and len(images) == 2 and images[0].shape == (3, 10, 12)
    assert [t["image_id"] for t in targets] == [7, 42]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.pop("annotations"), r"missing required field 'annotations'"),
    (lambda d: d["images"][1].pop("file_name"), r"images\[1\] is missing required field\(s\) \['file_name'\]"),
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] is missing required field\(s\) \['bbox'\]"),
    (lambda d: d["categories"][0].pop("id"), r"categories\[0\] is missing required field\(s\) \['id'\]"),
    (lambda d: d["annotations"][0].update(category_id=5),
     r"annotations\[0\] \(id 500\) refers to unknown category_id 5"),
    (lambda d: d["annotations"][2].update(image_id=1), r"annotations\[2\] \(id 502\) refers to unknown image_id 1"),
    (lambda d: d["annotations"][1].update(bbox=None),
     r"annotations\[1\] \(id 501\) bbox must be \[x, y, width, height\]"),
])
def test_bad_json_names_the_field_and_file(tmp_path: Path, mutate, message: str) -> None:
    path, data = hand_written(tmp_path)
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances\.json: " + message):
        CocoDetection(tmp_path / "images", path)


def test_unreadable_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    path.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"cannot read COCO annotation file .*instances\.json"):
        CocoDetection(tmp_path, path)
    with pytest.raises(DatasetError, match=r"cannot read COCO annotation file .*absent\.json"):
        CocoDetection(tmp_path, tmp_path / "absent.json")


def test_missing_image_file_is_named(tmp_path: Path) -> None:
    path, _ = hand_written(tmp_path)
    (tmp_path / "images" / "sub" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"image id 7 refers to missing file .*sub/b\.png"):
        CocoDetection(tmp_path / "images", path)


def test_image_size_differs_from_json(tmp_path: Path) -> None:
    path, _ = hand_written(tmp_path)
    write_image(tmp_path / "images" / "a.png", height=11)
    with pytest.raises(DatasetError, match=r"a\.png is 12x11 .* says 12x10 for image id 42"):
        CocoDetection(tmp_path / "images", path)[1]


def test_torchvision_mask_rcnn_trains_on_a_batch(small_det_study: Path) -> None:
    """The targets are what torchvision's detectors take, empty images included."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    dataset = det_split(small_det_study, "train", train=True)
    classes = dataset.num_categories + 1  # + background
    width = 8  # a toy Mask R-CNN: the point is the target format, not the model
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, 2, 1), torch.nn.ReLU())
    backbone.out_channels = width
    model = MaskRCNN(
        backbone, min_size=SMALL.height, max_size=SMALL.width,
        rpn_anchor_generator=AnchorGenerator(sizes=((8, 16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(width * 49, 16),
        box_predictor=FastRCNNPredictor(16, classes),
        mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), mask_head=MaskRCNNHeads(width, (width,), 1),
        mask_predictor=MaskRCNNPredictor(width, width, classes),
    )
    empty = next(i for i in range(len(dataset)) if len(dataset.target(i)["boxes"]) == 0)
    images, targets = collate_fn([dataset[0], dataset[empty]])
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_sixteen_bit_grey_image_is_scaled_to_eight_bits_not_clipped(tmp_path: Path) -> None:
    path, _ = hand_written(tmp_path)
    grey16 = np.full((10, 12), 32896, dtype=np.uint16)  # 128 * 257: mid-grey
    Image.fromarray(grey16).save(tmp_path / "images" / "a.png")
    image, _ = CocoDetection(tmp_path / "images", path)[1]
    assert torch.allclose(image, torch.full((3, 10, 12), 128 / 255))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["annotations"][0].update(bbox=[2, 1, -4, 3]),
     r"annotations\[0\] \(id 500\) bbox width must be >= 0, got -4 \(bbox \[2, 1, -4, 3\]\)"),
    (lambda d: d["annotations"][2].update(bbox=[1, 5, 3, -0.5]),
     r"annotations\[2\] \(id 502\) bbox height must be >= 0, got -0\.5"),
    (lambda d: d["annotations"][0].update(bbox=[2, "one", 4, 3]),
     r"annotations\[0\] \(id 500\) bbox\[1\] \(y\) must be a number, got 'one'"),
    (lambda d: d["annotations"][0].update(bbox=[2, 1, True, 3]),
     r"annotations\[0\] \(id 500\) bbox\[2\] \(width\) must be a number, got True"),
    (lambda d: d["annotations"][0].update(bbox=[2, 1, 4, float("nan")]),
     r"annotations\[0\] \(id 500\) bbox\[3\] \(height\) must be a finite number, got nan"),
    (lambda d: d["images"][0].update(id=[42]), r"images\[0\] id must be an integer, got \[42\]"),
])
def test_bad_boxes_and_duplicate_ids_name_the_file_the_annotation_and_the_field(tmp_path: Path, mutate,
                                                                                message: str) -> None:
    path, data = hand_written(tmp_path)
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances\.json: " + message):
        CocoDetection(tmp_path / "images", path)


def test_zero_area_boxes_are_dropped_with_one_warning_that_counts_them(tmp_path: Path) -> None:
    path, data = hand_written(tmp_path)
    data["annotations"].append({**data["annotations"][0], "id": 503, "bbox": [3, 2, 5, 0]})  # zero height
    data["annotations"].append({**data["annotations"][0], "id": 504, "bbox": [20, 2, 5, 3]})  # right of the image
    path.write_text(json.dumps(data))
    warning = r"instances\.json: 3 annotation\(s\) have a zero-width or zero-height box"
    with pytest.warns(UserWarning, match=warning) as caught:
        dataset = CocoDetection(tmp_path / "images", path)
    assert len(caught) == 1 and dataset.dropped_degenerate == 3
    assert dataset.target(1)["boxes"].tolist() == [[2.0, 1.0, 6.0, 4.0]]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["images"][1].update(id=42),
     r"duplicate image id 42 in .*instances\.json \(images\[0\] and images\[1\]\)"),
    (lambda d: d["annotations"][1].update(id=500),
     r"duplicate annotation id 500 in .*instances\.json \(annotations\[0\] and annotations\[1\]\)"),
    (lambda d: d["categories"][2].update(id=3),
     r"duplicate category id 3 in .*instances\.json \(categories\[1\] and categories\[2\]\)"),
])
def test_duplicate_ids_are_named_not_reported_as_unknown(tmp_path: Path, mutate, message: str) -> None:
    path, data = hand_written(tmp_path)
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message):
        CocoDetection(tmp_path / "images", path)
