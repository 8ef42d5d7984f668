"""Cityscapes semantic segmentation in its on-disk layout (the subset manifest: ``divdr.data.manifest``).

Layout (the real one, so the same loader reads Cityscapes and the generated study)::

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
    root/subsets.parquet            (optional: hidden subset label of each image)

File pairing is checked when the dataset is built (existence only, cheap); sizes and label
contents are checked when a sample is loaded, so a bad file fails with its name, not a shape error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from divdr.data.errors import DatasetError
from divdr.data.labels import label_ids_to_train_ids
from divdr.data.manifest import (
    SUBSET_MANIFEST,
    UNKNOWN_SUBSET,
    read_subset_manifest,
    write_subset_manifest,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXEL_VALUE = 255.0
# Integer grey modes: a 16-bit grey PNG opens as "I;16" (older Pillow and TIFFs: "I"). Pillow's
# convert("RGB") clips them at 255, so everything above 255 of 65535 would turn white.
INTEGER_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAX_16_BIT_VALUE = 65535

IMAGE_DIR = "leftImg8bit"
LABEL_DIR = "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class JointTransform(Protocol):
    """A joint (image, label) transform, e.g. divdr.data.transforms.RandomScaleCropFlip: it gets the decoded
    image (uint8 [3, H, W]), the train ids (uint8 [H, W]) and the dataset's ``normalize`` (a per-channel
    affine map), and returns the image normalised (float32) and the label."""

    def __call__(self, image: torch.Tensor, label: torch.Tensor, *, normalize: Callable[[torch.Tensor], torch.Tensor],
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...


def normalize(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] pixel values on the 0-255 scale (uint8, or float: e.g. resampled) -> float32, ImageNet
    mean/std normalised. Per-channel affine, so it commutes with bilinear resampling."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() / MAX_PIXEL_VALUE).sub_(mean).div_(std)  # in place on the quotient: a new tensor


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, H, W], a view of the same memory (no copy)."""
    return torch.from_numpy(rgb).permute(2, 0, 1)


def normalize_image(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W], ImageNet mean/std normalised (the whole image)."""
    return normalize(image_tensor(np.array(rgb, dtype=np.uint8)))


def read_png(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image, so a truncated or corrupt file fails here, named."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read {what} {path}: {err}") from err


def read_rgb(path: Path, what: str = "image") -> Image.Image:
    """An image file as 8-bit RGB: 16-bit grey scaled to 8 bits (round(v / 257)), never clipped."""
    image = read_png(path, what)
    if image.mode == "F":
        raise DatasetError(f"{what} {path}: floating-point pixels (mode F) have no fixed range; "
                           "save it as an 8- or 16-bit PNG")
    if image.mode not in INTEGER_GREY_MODES:
        return image.convert("RGB")
    values = np.asarray(image).astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > MAX_16_BIT_VALUE:
        raise DatasetError(f"{what} {path}: mode {image.mode} pixel values {low}..{high} lie outside the "
                           f"16-bit range 0..{MAX_16_BIT_VALUE}")
    grey = (values * int(MAX_PIXEL_VALUE) + MAX_16_BIT_VALUE // 2) // MAX_16_BIT_VALUE
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")


def read_label_ids(path: Path) -> np.ndarray:
    label = read_png(path, "label file")
    if label.mode not in ("L", "P", "I", "I;16"):
        raise DatasetError(f"label file {path}: expected a single-channel labelIds PNG, got mode {label.mode}")
    return np.asarray(label)


class CityscapesSegmentation(Dataset):
    """Cityscapes-layout semantic segmentation.

    Each sample is a dict: ``image`` float32 [3, H, W] (ImageNet-normalised), ``label`` int64 [H, W]
    (train ids 0-18, 255 ignored; with a transform, the dtype it returns: uint8 for
    ``RandomScaleCropFlip``), ``sample_id`` (index in the sorted file list of the split: the
    same file always gets the same id), ``image_id`` (e.g. ``aachen_000000_000019``), ``file`` (image
    path relative to ``root``) and ``subset`` (from ``root/subsets.parquet``; -1 when there is no
    manifest or the image is not listed in it).

    ``transform(image, label, normalize=normalize)`` gets the decoded pixels (uint8) and the train ids
    (uint8) and normalises what it keeps (training: random scale, crop, flip, which normalises only the
    crop). Evaluation: no transform, the whole image normalised.
    """

    def __init__(self, root: str | Path, split: str, transform: JointTransform | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.images = self._find_images()
        self.labels = [self._label_path(p) for p in self.images]
        manifest_path = self.root / SUBSET_MANIFEST
        self.manifest = read_subset_manifest(manifest_path) if manifest_path.exists() else {}

    def _find_images(self) -> list[Path]:
        split_dir = self.root / IMAGE_DIR / self.split
        if not split_dir.is_dir():
            raise DatasetError(f"split folder {split_dir} does not exist (root {self.root}, split {self.split!r})")
        images = sorted(split_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise DatasetError(f"split folder {split_dir} holds no {{city}}/*{IMAGE_SUFFIX} images")
        return images

    def _label_path(self, image: Path) -> Path:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = self.root / LABEL_DIR / self.split / image.parent.name / f"{stem}{LABEL_SUFFIX}"
        if not label.is_file():
            raise DatasetError(f"image {image} has no label file: expected {label}")
        return label

    def __len__(self) -> int:
        return len(self.images)

    def relative_file(self, index: int) -> str:
        return self.images[index].relative_to(self.root).as_posix()

    def subset_of(self, index: int) -> int:
        entry = self.manifest.get(self.relative_file(index))
        return entry.subset if entry else UNKNOWN_SUBSET

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.images[index], self.labels[index]
        rgb = read_rgb(image_path)
        label_ids = read_label_ids(label_path)
        if label_ids.shape != (rgb.height, rgb.width):
            raise DatasetError(
                f"label {label_path} is {label_ids.shape[1]}x{label_ids.shape[0]} (WxH) but image "
                f"{image_path} is {rgb.width}x{rgb.height}"
            )
        train_ids = label_ids_to_train_ids(label_ids, source=str(label_path))
        if self.transform is None:
            image = normalize_image(np.asarray(rgb))
            label = torch.from_numpy(train_ids.astype(np.int64))
        else:
            pixels = image_tensor(np.array(rgb, dtype=np.uint8))  # writable: torch.from_numpy warns otherwise
            image, label = self.transform(pixels, torch.from_numpy(train_ids), normalize=normalize)
        return {
            "image": image,
            "label": label,
            "sample_id": index,
            "image_id": image_path.name[: -len(IMAGE_SUFFIX)],
            "file": self.relative_file(index),
            "subset": self.subset_of(index),
        }


def write_subset_view(root: str | Path, out: str | Path, subset: int) -> Path:
    """A Cityscapes-layout view of ``root`` holding only the images of one hidden ``subset`` (both
    splits), as symbolic links plus a filtered manifest: what the controlled study's *oracle* (one
    expert per known subset) trains and is evaluated on. Idempotent: an existing complete view is
    reused. Raises DatasetError if ``root`` has no manifest or no image of that subset in a split.
    """
    root, out = Path(root).resolve(), Path(out)
    manifest_path = root / SUBSET_MANIFEST
    if not manifest_path.exists():
        raise DatasetError(f"{root} has no {SUBSET_MANIFEST}: the oracle needs known subsets")
    entries = [e for e in read_subset_manifest(manifest_path).values() if e.subset == subset]
    splits = sorted({e.split for e in entries})
    for split in ("train", "val"):
        if split not in splits:
            raise DatasetError(f"subset {subset} has no {split!r} image in {manifest_path}")
    if (out / SUBSET_MANIFEST).exists():
        return out
    for entry in entries:
        image = root / entry.image
        split, city = image.parent.parent.name, image.parent.name
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = root / LABEL_DIR / split / city / f"{stem}{LABEL_SUFFIX}"
        for source, rel in ((image, Path(entry.image)), (label, label.relative_to(root))):
            if not source.is_file():
                raise DatasetError(f"subset manifest {manifest_path} lists {entry.image}, but {source} is missing")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            if not (out / rel).exists():
                (out / rel).symlink_to(source)
    write_subset_manifest(out / SUBSET_MANIFEST, entries)  # last: its presence marks a complete view
    return out
