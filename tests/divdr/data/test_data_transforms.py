"""RandomScaleCropFlip: image and label stay aligned, padding is ignored, draws are reproducible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from divdr.config import ConfigError
from divdr.data.labels import IGNORE_INDEX
from divdr.data.transforms import RandomScaleCropFlip, SegTransformConfig

BLOCK = 8  # label blocks large enough that bilinear blending only touches their borders


def painted_pair(height: int = 48, width: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """A label of distinct blocks, and an image whose every channel *is* the label value."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    label = ((ys // BLOCK) * 7 + (xs // BLOCK) * 3) % 19
    image = label.float().expand(3, height, width).clone()
    return image, label


def agreement(image: torch.Tensor, label: torch.Tensor) -> float:
    """Fraction of labelled pixels away from label borders where the image shows the label's value.

    Bilinear resizing legitimately blends the image across block borders, so pixels whose 3x3
    label neighbourhood is not constant are left out; everywhere else the match must be exact.
    """
    padded = F.pad(label[None, None].float(), (1, 1, 1, 1), mode="replicate")
    high = F.max_pool2d(padded, 3, 1)[0, 0]
    low = -F.max_pool2d(-padded, 3, 1)[0, 0]
    interior = (high == low) & (label != IGNORE_INDEX)
    return ((image[0] - label.float()).abs() < 0.5)[interior].float().mean().item()


@pytest.mark.parametrize("seed", range(6))
def test_scale_crop_flip_keeps_image_and_label_aligned(seed: int) -> None:
    image, label = painted_pair()
    transform = RandomScaleCropFlip(SegTransformConfig(crop_size=(40, 40), scale_range=(0.5, 2.0)))
    out_image, out_label = transform(image, label, torch.Generator().manual_seed(seed))
    assert out_image.shape == (3, 40, 40) and out_label.shape == (40, 40)
    assert out_label.dtype == torch.int64
    assert agreement(out_image, out_label) == 1.0
    assert agreement(out_image, out_label.flip(-1)) < 0.5  # the check does see a misaligned pair
    shifted = agreement(out_image[:, :, 1:], out_label[:, :-1]), agreement(out_image[:, 1:], out_label[:-1])
    assert min(shifted) < 1.0 or out_label.unique().numel() == 1


def test_flip_alone_mirrors_both() -> None:
    image, label = painted_pair(16, 24)
    config = SegTransformConfig(crop_size=(16, 24), scale_range=(1.0, 1.0), flip_probability=1.0)
    out_image, out_label = RandomScaleCropFlip(config)(image, label)
    assert torch.equal(out_label, label.flip(-1))
    assert torch.allclose(out_image, image.flip(-1))


def test_small_images_are_padded_with_ignore_and_zero() -> None:
    image, label = painted_pair(16, 24)
    image = image + 1  # so that no real pixel is 0
    config = SegTransformConfig(crop_size=(32, 40), scale_range=(1.0, 1.0), flip_probability=0.0)
    out_image, out_label = RandomScaleCropFlip(config)(image, label)
    assert out_label.shape == (32, 40)
    assert (out_label[16:] == IGNORE_INDEX).all() and (out_label[:, 24:] == IGNORE_INDEX).all()
    assert (out_image[:, 16:] == 0).all() and (out_image[:, :, 24:] == 0).all()
    assert torch.equal(out_label[:16, :24], label)


def test_downscale_pads_then_crops() -> None:
    image, label = painted_pair(40, 40)
    config = SegTransformConfig(crop_size=(40, 40), scale_range=(0.5, 0.5), flip_probability=0.0)
    out_image, out_label = RandomScaleCropFlip(config)(image, label, torch.Generator().manual_seed(0))
    assert (out_label == IGNORE_INDEX).float().mean().item() == pytest.approx(0.75)
    assert agreement(out_image, out_label) == 1.0


def test_same_generator_seed_same_crop_and_different_seeds_differ() -> None:
    image, label = painted_pair()
    transform = RandomScaleCropFlip(SegTransformConfig(crop_size=(24, 24)))
    first = transform(image, label, torch.Generator().manual_seed(5))
    again = transform(image, label, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [transform(image, label, torch.Generator().manual_seed(s))[1] for s in range(6, 10)]
    assert any(not torch.equal(first[1], other) for other in others)


def test_size_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        RandomScaleCropFlip()(torch.zeros(3, 4, 5), torch.zeros(4, 6, dtype=torch.int64))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"crop_size": (0, 8)}, "crop_size"),
    ({"scale_range": (2.0, 0.5)}, "scale_range"),
    ({"scale_range": (0.0, 1.0)}, "scale_range"),
    ({"flip_probability": 1.5}, "flip_probability"),
])
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"transform.{field}"):
        SegTransformConfig(**kwargs)
