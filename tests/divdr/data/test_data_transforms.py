"""RandomScaleCropFlip: image and label stay aligned, padding is ignored, draws are reproducible, and the
crop it computes alone equals the crop of the whole rescaled, padded image (the computation it replaced)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from divdr.config import ConfigError
from divdr.data.cityscapes import normalize
from divdr.data.labels import IGNORE_INDEX
from divdr.data.transforms import (
    RandomScaleCropFlip,
    SegTransformConfig,
    _randint,
    _uniform,
    bilinear_taps,
    nearest_taps,
    pad_to,
    rescale,
)

BLOCK = 8  # label blocks large enough that bilinear blending only touches their borders
IMAGE_TOLERANCE = 1e-5  # the crop against the whole-image reference: float rounding only
EQUIVALENCE_SEEDS = 400


def whole_image_reference(image: torch.Tensor, label: torch.Tensor, config: SegTransformConfig,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The transform as it was before it computed only the crop: the whole image rescaled, padded, then
    cropped and flipped, with the same draws in the same order."""
    image, label = rescale(image, label, _uniform(*config.scale_range, generator))
    image, label = pad_to(image, label, config.crop_size, config)
    crop_h, crop_w = config.crop_size
    top = _randint(image.shape[-2] - crop_h, generator)
    left = _randint(image.shape[-1] - crop_w, generator)
    image = image[:, top: top + crop_h, left: left + crop_w]
    label = label[top: top + crop_h, left: left + crop_w]
    if torch.rand((), generator=generator).item() < config.flip_probability:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()


def random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, SegTransformConfig]:
    """Odd and even sizes, crops smaller and larger than the scaled image, scales below and above 1,
    flips always, never or at random; pixels random (the hardest case for resampling: no smoothness)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    height, width = (int(torch.randint(1, 70, (), generator=g)) for _ in range(2))
    crop = tuple(int(torch.randint(1, 90, (), generator=g)) for _ in range(2))
    low = 0.2 + 1.5 * torch.rand((), generator=g).item()
    high = low * (1 + 1.5 * torch.rand((), generator=g).item())
    flip = (0.0, 1.0, 0.5)[seed % 3]
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    label = torch.randint(0, IGNORE_INDEX, (height, width), generator=g, dtype=torch.uint8)  # 255: padding only
    return image, label, SegTransformConfig(crop_size=crop, scale_range=(low, high), flip_probability=flip)


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


def test_crop_equals_the_whole_image_reference_over_many_seeds() -> None:
    """Float images (the transform's values kept) and uint8 pixels normalised by the transform, against the
    whole normalised image rescaled, padded, cropped, flipped: image to float rounding, label exactly."""
    paddings = flips = 0
    for seed in range(EQUIVALENCE_SEEDS):
        pixels, label, config = random_case(seed)
        expected_image, expected_label = whole_image_reference(normalize(pixels), label, config,
                                                               torch.Generator().manual_seed(seed))
        image, out_label = RandomScaleCropFlip(config)(pixels, label, torch.Generator().manual_seed(seed),
                                                       normalize=normalize)
        floats, float_label = RandomScaleCropFlip(config)(normalize(pixels), label.long(),
                                                          torch.Generator().manual_seed(seed))
        assert image.shape == expected_image.shape == (3, *config.crop_size), seed
        assert image.dtype == torch.float32 and image.is_contiguous() and out_label.dtype == torch.uint8, seed
        assert torch.equal(out_label, expected_label), seed
        assert torch.equal(float_label, expected_label.long()) and float_label.dtype == torch.int64, seed
        assert (image - expected_image).abs().max().item() < IMAGE_TOLERANCE, seed
        assert (floats - expected_image).abs().max().item() < IMAGE_TOLERANCE, seed
        padded = expected_label == IGNORE_INDEX
        assert (image[:, padded] == 0).all() and (floats[:, padded] == 0).all(), seed  # the mean, exactly
        paddings += bool(padded.any())
        flips += config.flip_probability == 1.0
    assert paddings > EQUIVALENCE_SEEDS // 4 and flips > EQUIVALENCE_SEEDS // 4  # the cases were exercised


@pytest.mark.parametrize("scale", [0.5, 0.61, 0.75, 1.0, 1.37, 2.0])
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_cityscapes_size_crop_equals_the_reference(scale: float, flip: float) -> None:
    """1024x2048 -> a 768x768 crop, as in training: padded below (scale < 0.75), up to 4x larger above."""
    g = torch.Generator().manual_seed(int(scale * 100) + int(flip))
    pixels = torch.randint(0, 256, (1024, 2048, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1)
    label = torch.randint(0, 19, (1024, 2048), generator=g, dtype=torch.uint8)
    config = SegTransformConfig(crop_size=(768, 768), scale_range=(scale, scale), flip_probability=flip)
    for seed in range(2):
        expected = whole_image_reference(normalize(pixels), label, config, torch.Generator().manual_seed(seed))
        found = RandomScaleCropFlip(config)(pixels, label, torch.Generator().manual_seed(seed), normalize=normalize)
        assert (found[0] - expected[0]).abs().max().item() < IMAGE_TOLERANCE
        assert torch.equal(found[1], expected[1])


def test_global_rng_draws_are_the_reference_draws() -> None:
    """Without a generator (training: torch's RNG, seeded per image) the same draws in the same order."""
    pixels, label, config = random_case(1)
    torch.manual_seed(3)
    expected = whole_image_reference(normalize(pixels), label, config)
    after_reference = torch.rand(())
    torch.manual_seed(3)
    found = RandomScaleCropFlip(config)(pixels, label, normalize=normalize)
    assert torch.equal(found[1], expected[1]) and torch.allclose(found[0], expected[0], atol=IMAGE_TOLERANCE)
    assert torch.equal(torch.rand(()), after_reference)  # no extra draw


def test_taps_are_f_interpolates_coordinates() -> None:
    """Bilinear and nearest-exact taps resample a 1-D ramp of random values as F.interpolate does, for
    sizes whose in/out ratios are not representable (where float32 rounding decides)."""
    for in_size in (1, 2, 3, 7, 64, 127, 1024, 2047):
        values = torch.rand(in_size, generator=torch.Generator().manual_seed(in_size), dtype=torch.float32)
        for out_size in {1, 2, 5, in_size, round(in_size * 0.61), round(in_size * 1.37), 2 * in_size + 1}:
            expected = F.interpolate(values[None, None, None], size=(1, out_size), mode="bilinear",
                                     align_corners=False)[0, 0, 0]
            taps = bilinear_taps(0, out_size, in_size, out_size)
            found = values[taps.index0] * taps.weight0 + values[taps.index1] * taps.weight1
            assert torch.allclose(found, expected, atol=1e-6, rtol=0), (in_size, out_size)
            ids = torch.arange(in_size, dtype=torch.float32)
            nearest = F.interpolate(ids[None, None], size=out_size, mode="nearest-exact")[0, 0].long()
            assert torch.equal(nearest_taps(0, out_size, in_size, out_size), nearest), (in_size, out_size)
            start = out_size // 3  # a window of the output: the same taps
            assert torch.equal(nearest_taps(start, out_size - start, in_size, out_size), nearest[start:])


def test_source_is_left_untouched() -> None:
    pixels, label, config = random_case(2)
    before = pixels.clone(), label.clone()
    RandomScaleCropFlip(config)(pixels, label, torch.Generator().manual_seed(0), normalize=normalize)
    assert torch.equal(pixels, before[0]) and torch.equal(label, before[1])
    image = normalize(pixels)  # float: the resampling works in place on copies, never on the source
    kept = image.clone()
    RandomScaleCropFlip(config)(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(image, kept)
