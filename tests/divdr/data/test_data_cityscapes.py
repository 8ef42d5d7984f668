"""CityscapesSegmentation and the subset manifest, on generated and hand-written files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from divdr.data.cityscapes import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CityscapesSegmentation,
    DatasetError,
    normalize_image,
    write_subset_view,
)
from divdr.data.labels import IGNORE_INDEX, LABEL_ID_BY_NAME, LabelError, label_ids_to_train_ids
from divdr.data.manifest import SUBSET_MANIFEST, SubsetEntry, read_subset_manifest, write_subset_manifest
from divdr.data.transforms import RandomScaleCropFlip, SegTransformConfig

from .conftest import SMALL
from .test_data_transforms import IMAGE_TOLERANCE, whole_image_reference

RGB = (255, 0, 51)


def write_pair(root: Path, split: str, stem: str, label_ids: np.ndarray, rgb: tuple[int, int, int] = RGB,
               image_size: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """One Cityscapes image/label pair; image_size (H, W) defaults to the label's."""
    city = stem.split("_")[0]
    height, width = image_size or label_ids.shape
    image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
    label = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    label.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), rgb, dtype=np.uint8)).save(image)
    Image.fromarray(label_ids.astype(np.uint8)).save(label)
    return image, label


def road_and_car(height: int = 4, width: int = 6) -> np.ndarray:
    ids = np.full((height, width), LABEL_ID_BY_NAME["road"], dtype=np.uint8)
    ids[:, : width // 2] = LABEL_ID_BY_NAME["car"]
    ids[0, 0] = 0  # "unlabeled": ignored
    return ids


def test_generated_study_samples(small_seg_study: Path) -> None:
    train = CityscapesSegmentation(small_seg_study, "train")
    assert len(train) == SMALL.n_train
    manifest = read_subset_manifest(small_seg_study / SUBSET_MANIFEST)
    for index in range(len(train)):
        sample = train[index]
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, SMALL.height, SMALL.width)
        assert sample["label"].dtype == torch.int64 and sample["label"].shape == (SMALL.height, SMALL.width)
        values = set(sample["label"].unique().tolist())
        assert values <= set(range(19)) | {IGNORE_INDEX} and len(values) >= 5
        assert sample["sample_id"] == index
        assert re.fullmatch(r"[a-z]+_\d{6}_\d{6}", sample["image_id"])
        city = sample["image_id"].split("_")[0]
        assert sample["file"] == f"leftImg8bit/train/{city}/{sample['image_id']}_leftImg8bit.png"
        assert (small_seg_study / sample["file"]).is_file()
        assert sample["subset"] == manifest[sample["file"]].subset
    files = [train[i]["file"] for i in range(len(train))]
    assert files == sorted(files)  # sample ids follow the sorted file list: stable across runs


def test_hand_written_pair_maps_ids_and_normalises(tmp_path: Path) -> None:
    write_pair(tmp_path, "val", "lindau_000001_000019", road_and_car())
    sample = CityscapesSegmentation(tmp_path, "val")[0]
    label = sample["label"]
    assert label[0, 0] == IGNORE_INDEX
    assert label[1, 0] == 13 and label[1, -1] == 0  # car -> train id 13, road -> 0
    expected = [(v / 255 - m) / s for v, m, s in zip(RGB, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(sample["image"][:, 2, 3], torch.tensor(expected), atol=1e-6)
    assert sample["subset"] == -1  # no manifest
    assert sample["image_id"] == "lindau_000001_000019"


def test_sample_ids_are_stable_when_files_are_added(tmp_path: Path) -> None:
    write_pair(tmp_path, "train", "bremen_000002_000019", road_and_car())
    write_pair(tmp_path, "train", "zurich_000000_000019", road_and_car())
    before = {CityscapesSegmentation(tmp_path, "train")[i]["file"]: i for i in range(2)}
    again = CityscapesSegmentation(tmp_path, "train")
    assert {again[i]["file"]: i for i in range(2)} == before


def test_transform_is_applied(tmp_path: Path) -> None:
    write_pair(tmp_path, "train", "aachen_000000_000019", road_and_car(16, 24))
    config = SegTransformConfig(crop_size=(8, 8), scale_range=(1.0, 1.0))
    sample = CityscapesSegmentation(tmp_path, "train", RandomScaleCropFlip(config))[0]
    assert sample["image"].shape == (3, 8, 8) and sample["label"].shape == (8, 8)


def test_transformed_item_is_what_it_was(tmp_path: Path) -> None:
    """A training item (the transform drawing from torch's RNG, seeded as the loader seeds it) equals the
    computation it replaced: the whole image normalised, then rescaled, padded, cropped and flipped;
    its label is uint8 now (int64 before), the same values."""
    rng = np.random.default_rng(0)
    ids = rng.choice([0, 7, 8, 11, 21, 26], size=(37, 53)).astype(np.uint8)
    image, _ = write_pair(tmp_path, "train", "aachen_000000_000019", ids)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(image)  # every pixel differs
    config = SegTransformConfig(crop_size=(40, 24), scale_range=(0.5, 2.0))
    dataset = CityscapesSegmentation(tmp_path, "train", RandomScaleCropFlip(config))
    whole = CityscapesSegmentation(tmp_path, "train")[0]  # no transform: as before, bit for bit
    pixels = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(whole["image"], (pixels - mean) / std)  # the formula as it was
    assert torch.equal(whole["image"], normalize_image(np.asarray(Image.open(image).convert("RGB"))))
    assert torch.equal(whole["label"], torch.from_numpy(label_ids_to_train_ids(ids).astype(np.int64)))
    for seed in range(40):
        torch.manual_seed(seed)
        sample = dataset[0]
        torch.manual_seed(seed)
        expected_image, expected_label = whole_image_reference(whole["image"], whole["label"], config)
        assert sample["label"].dtype == torch.uint8 and torch.equal(sample["label"].long(), expected_label)
        assert (sample["image"] - expected_image).abs().max().item() < IMAGE_TOLERANCE


def test_subset_manifest_round_trip_and_lookup(tmp_path: Path) -> None:
    image, _ = write_pair(tmp_path, "train", "aachen_000000_000019", road_and_car())
    write_pair(tmp_path, "train", "aachen_000001_000019", road_and_car())
    rel = image.relative_to(tmp_path).as_posix()
    write_subset_manifest(tmp_path / SUBSET_MANIFEST, [SubsetEntry(rel, "train", 2, "thin")])
    assert read_subset_manifest(tmp_path / SUBSET_MANIFEST) == {rel: SubsetEntry(rel, "train", 2, "thin")}
    dataset = CityscapesSegmentation(tmp_path, "train")
    assert [dataset[i]["subset"] for i in range(2)] == [2, -1]  # the second image is not listed


def test_manifest_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / SUBSET_MANIFEST
    pq.write_table(pa.table({"image": ["a.png"], "split": ["train"], "subset_name": ["x"]}), path)
    with pytest.raises(DatasetError, match=r"subsets\.parquet.*missing column.*subset"):
        read_subset_manifest(path)


def test_manifest_duplicate_image_is_named(tmp_path: Path) -> None:
    path = tmp_path / SUBSET_MANIFEST
    write_subset_manifest(path, [SubsetEntry("a.png", "train", 0, "x"), SubsetEntry("a.png", "train", 1, "y")])
    with pytest.raises(DatasetError, match=r"'a\.png' is listed twice"):
        read_subset_manifest(path)


def test_manifest_unreadable_is_named(tmp_path: Path) -> None:
    path = tmp_path / SUBSET_MANIFEST
    path.write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=r"cannot read subset manifest .*subsets\.parquet"):
        read_subset_manifest(path)


def test_missing_label_file_fails_at_construction(tmp_path: Path) -> None:
    _, label = write_pair(tmp_path, "train", "aachen_000000_000019", road_and_car())
    label.unlink()
    with pytest.raises(DatasetError, match=r"aachen_000000_000019_leftImg8bit\.png has no label file.*gtFine_labelIds"):
        CityscapesSegmentation(tmp_path, "train")


def test_missing_split_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"split folder .*leftImg8bit/test does not exist"):
        CityscapesSegmentation(tmp_path, "test")


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "leftImg8bit" / "val" / "lindau").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"leftImg8bit/val holds no"):
        CityscapesSegmentation(tmp_path, "val")


def test_label_size_mismatch_names_both_files(tmp_path: Path) -> None:
    write_pair(tmp_path, "train", "aachen_000000_000019", road_and_car(4, 6), image_size=(5, 6))
    dataset = CityscapesSegmentation(tmp_path, "train")  # construction only checks existence
    with pytest.raises(DatasetError, match=r"gtFine_labelIds\.png is 6x4 .* image .*leftImg8bit\.png is 6x5"):
        dataset[0]


def test_label_ids_outside_table_name_the_file(tmp_path: Path) -> None:
    ids = road_and_car()
    ids[2, 2] = 77
    write_pair(tmp_path, "train", "aachen_000000_000019", ids)
    with pytest.raises(LabelError, match=r"aachen_000000_000019_gtFine_labelIds\.png.*\[77\]"):
        CityscapesSegmentation(tmp_path, "train")[0]


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    image, _ = write_pair(tmp_path, "train", "aachen_000000_000019", road_and_car(40, 60))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(image)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cannot read image .*aachen_000000_000019_leftImg8bit\.png"):
        CityscapesSegmentation(tmp_path, "train")[0]


def test_garbage_label_file_names_the_file(tmp_path: Path) -> None:
    _, label = write_pair(tmp_path, "train", "aachen_000000_000019", road_and_car())
    label.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"cannot read label file .*gtFine_labelIds\.png"):
        CityscapesSegmentation(tmp_path, "train")[0]


def test_colour_label_file_is_rejected(tmp_path: Path) -> None:
    _, label = write_pair(tmp_path, "train", "aachen_000000_000019", road_and_car())
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(label)
    with pytest.raises(DatasetError, match=r"gtFine_labelIds\.png: expected a single-channel labelIds PNG, got mode"):
        CityscapesSegmentation(tmp_path, "train")[0]


def test_subset_view_holds_one_subset_of_both_splits(small_seg_study: Path, tmp_path: Path) -> None:
    full = {split: CityscapesSegmentation(small_seg_study, split) for split in ("train", "val")}
    view = write_subset_view(small_seg_study, tmp_path / "view", subset=1)
    for split, dataset in full.items():
        expected = sorted(dataset.relative_file(i) for i in range(len(dataset)) if dataset.subset_of(i) == 1)
        part = CityscapesSegmentation(view, split)
        assert sorted(part.relative_file(i) for i in range(len(part))) == expected
        assert {part.subset_of(i) for i in range(len(part))} == {1}
        sample = part[0]
        original = dataset[[dataset.relative_file(i) for i in range(len(dataset))].index(sample["file"])]
        assert torch.equal(sample["label"], original["label"]) and torch.equal(sample["image"], original["image"])
    assert write_subset_view(small_seg_study, view, subset=1) == view  # idempotent


def test_subset_view_errors_name_what_is_missing(small_seg_study: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="subset 7 has no 'train' image"):
        write_subset_view(small_seg_study, tmp_path / "v7", subset=7)
    bare = tmp_path / "bare"
    write_pair(bare, "train", "aachen_000000_000000", road_and_car())
    with pytest.raises(DatasetError, match=f"has no {SUBSET_MANIFEST}"):
        write_subset_view(bare, tmp_path / "v", subset=0)


def test_sixteen_bit_grey_image_is_scaled_to_eight_bits_not_clipped(tmp_path: Path) -> None:
    image, _ = write_pair(tmp_path, "val", "lindau_000001_000019", road_and_car(2, 3))
    grey16 = np.array([[0, 257, 1000], [32896, 60000, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(image)  # a 16-bit grey PNG: Pillow opens it as mode I;16
    assert Image.open(image).mode == "I;16"
    sample = CityscapesSegmentation(tmp_path, "val")[0]
    grey8 = np.array([[0, 1, 4], [128, 233, 255]], dtype=np.float32)  # round(v / 257)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.from_numpy(grey8 / 255).expand(3, -1, -1) - mean) / std
    assert torch.allclose(sample["image"], expected, atol=1e-6)


def test_read_rgb_scales_integer_modes_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    from divdr.data.cityscapes import read_rgb

    path = tmp_path / "grey32.tif"  # mode I (32-bit integers), as older Pillow opens 16-bit PNGs
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(path)
    assert Image.open(path).mode == "I"
    assert np.asarray(read_rgb(path)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(path)
    with pytest.raises(DatasetError, match=r"grey32\.tif: mode I pixel values 0\.\.70000 lie outside"):
        read_rgb(path)
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.5, 2.0]], dtype=np.float32)).save(path)
    with pytest.raises(DatasetError, match=r"float\.tif: floating-point pixels \(mode F\)"):
        read_rgb(path)
