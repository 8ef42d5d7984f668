"""Joint training transforms on an (image, label) pair of tensors: random scale, pad + crop, flip.

DR's training recipe (Cityscapes): random scale 0.5-2.0, crop 768x768 (padding when the scaled image
is smaller), random horizontal flip. Evaluation uses no transform at all (full size).

``RandomScaleCropFlip`` computes only the crop (``scaled_crop``); ``rescale`` and ``pad_to`` compute the
whole scaled, padded image, the reference it equals (to float rounding for the image, exactly for the
label).

Every random draw goes through an optional ``torch.Generator``, so a seeded generator reproduces a
crop exactly; without one, torch's global RNG is used (which DataLoader seeds per worker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from divdr.config import ConfigError
from divdr.data.labels import IGNORE_INDEX

# A per-channel affine map of an image's values, e.g. divdr.data.cityscapes.normalize (uint8 scale ->
# ImageNet-normalised float32): it commutes with bilinear resampling, so it may be applied to the crop.
Normalize = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SegTransformConfig:
    """Parameters of the training transform; defaults are the DR paper's, crop size aside."""

    crop_size: tuple[int, int] = (768, 768)  # (height, width)
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip_probability: float = 0.5
    # In the normalised space (padding comes after ``normalize``): 0 is the dataset mean, neutral.
    image_pad_value: float = 0.0
    label_pad_value: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        height, width = self.crop_size
        if height < 1 or width < 1:
            raise ConfigError(f"transform.crop_size must be positive (height, width), got {self.crop_size}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ConfigError(f"transform.scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if not 0 <= self.flip_probability <= 1:
            raise ConfigError(f"transform.flip_probability must be in [0, 1], got {self.flip_probability}")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform in [0, high] inclusive."""
    return int(torch.randint(high + 1, (), generator=generator).item())


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) rescaled by ``scale``, rounded, at least 1."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _source_scale(in_size: int, out_size: int) -> torch.Tensor:
    """in/out as ATen's resampling kernels compute it for float32 images: in float32."""
    return torch.tensor(in_size, dtype=torch.float32) / out_size


@dataclass(frozen=True)
class BilinearTaps:
    """The two source pixels and weights of each output pixel along one axis: out = w0 * x[i0] + w1 * x[i1]."""

    index0: torch.Tensor  # int64
    index1: torch.Tensor
    weight0: torch.Tensor  # float32
    weight1: torch.Tensor

    def flipped(self) -> BilinearTaps:
        return BilinearTaps(self.index0.flip(0), self.index1.flip(0), self.weight0.flip(0), self.weight1.flip(0))

    def shifted(self, offset: int) -> BilinearTaps:
        return BilinearTaps(self.index0 - offset, self.index1 - offset, self.weight0, self.weight1)


def bilinear_taps(start: int, count: int, in_size: int, out_size: int) -> BilinearTaps:
    """Output pixels [start, start + count) of a bilinear (align_corners=False) resize from ``in_size`` to
    ``out_size``, with ``F.interpolate``'s coordinates: output pixel y samples source coordinate
    (y + 0.5) * in / out - 0.5, clamped to [0, in - 1].

    As ATen computes it (CPU, float32): the scale in float32, the coordinate as one fused multiply-add
    rounded once to float32 (the float64 product of two float32 numbers is exact), the weight the
    coordinate's fraction.
    """
    scale = _source_scale(in_size, out_size).double()
    centres = torch.arange(start, start + count, dtype=torch.float64) + 0.5
    source = (centres * scale - 0.5).float().clamp_min(0)
    index0 = source.floor().long().clamp_max(in_size - 1)
    weight1 = (source - index0).clamp(0, 1)
    return BilinearTaps(index0, (index0 + 1).clamp_max(in_size - 1), 1 - weight1, weight1)


def nearest_taps(start: int, count: int, in_size: int, out_size: int) -> torch.Tensor:
    """Source pixels of output pixels [start, start + count) of a 'nearest-exact' resize, as ATen computes
    them: floorf((y + 0.5) * scale), the product in float64 with the float32 scale in/out, rounded to
    float32 before the floor, clamped to in - 1."""
    centres = torch.arange(start, start + count, dtype=torch.float64) + 0.5
    source = (centres * _source_scale(in_size, out_size).double()).float()
    return source.floor().long().clamp_max(in_size - 1)


def _resample(image: torch.Tensor, rows: BilinearTaps, cols: BilinearTaps) -> torch.Tensor:
    """[C, H, W] image (any dtype, any layout) -> float [C, len(rows), len(cols)], sampling only the
    source window the taps read: rows first (whole rows: plain copies, converted to float as they are
    gathered), then columns."""
    top, bottom = int(rows.index0[0]), int(rows.index1[-1]) + 1  # taps are monotonic in the output
    left = int(min(cols.index0[0], cols.index0[-1]))
    right = int(max(cols.index1[0], cols.index1[-1])) + 1  # flipped taps run backwards
    window = image[:, top:bottom, left:right].permute(1, 2, 0)  # [h, w, C]: rows are contiguous for HWC
    rows, cols = rows.shifted(top), cols.shifted(left)
    dtype = image.dtype if image.is_floating_point() else torch.float32
    # in place on the gathered copies (index_select allocates): about twice as fast as out-of-place
    sampled = window.index_select(0, rows.index0).to(dtype).mul_(rows.weight0[:, None, None])
    sampled.addcmul_(window.index_select(0, rows.index1).to(dtype), rows.weight1[:, None, None])
    out = sampled.index_select(1, cols.index0).mul_(cols.weight0[:, None])
    out.addcmul_(sampled.index_select(1, cols.index1), cols.weight1[:, None])
    return out.permute(2, 0, 1)


def scaled_crop(image: torch.Tensor, label: torch.Tensor, scaled: tuple[int, int], corner: tuple[int, int],
                flip: bool, config: SegTransformConfig, normalize: Normalize | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``config.crop_size`` crop at ``corner`` (top, left) of the image and label rescaled to ``scaled``
    (height, width) and padded bottom/right to at least the crop size, flipped horizontally if ``flip``,
    computed from the source pixels the crop needs alone. ``normalize`` (None: the values as they are) is
    applied to the crop before padding. Returns a contiguous float image and a label of ``label``'s dtype.
    """
    (height, width), (crop_h, crop_w), (top, left) = label.shape, config.crop_size, corner
    valid_h, valid_w = max(0, min(crop_h, scaled[0] - top)), max(0, min(crop_w, scaled[1] - left))
    dtype = image.dtype if image.is_floating_point() else torch.float32
    out_image = torch.full((image.shape[0], crop_h, crop_w), config.image_pad_value, dtype=dtype)
    out_label = torch.full((crop_h, crop_w), config.label_pad_value, dtype=label.dtype)
    if valid_h and valid_w:
        rows = bilinear_taps(top, valid_h, height, scaled[0])
        cols = bilinear_taps(left, valid_w, width, scaled[1])
        label_rows = nearest_taps(top, valid_h, height, scaled[0])
        label_cols = nearest_taps(left, valid_w, width, scaled[1])
        first = crop_w - valid_w if flip else 0  # flipped, the padding moves from the right to the left
        if flip:
            cols, label_cols = cols.flipped(), label_cols.flip(0)
        values = _resample(image, rows, cols)
        out_image[:, :valid_h, first:first + valid_w] = normalize(values) if normalize is not None else values
        out_label[:valid_h, first:first + valid_w] = label.index_select(0, label_rows).index_select(1, label_cols)
    return out_image, out_label


def rescale(image: torch.Tensor, label: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear for the image, nearest for the label, to the same rounded size (the whole image: the
    reference ``scaled_crop`` equals).

    'nearest-exact' samples at pixel centres like bilinear with align_corners=False; plain 'nearest'
    is shifted by half a pixel and would misalign labels from the image by up to one pixel.
    """
    size = scaled_size(image.shape[-2:], scale)
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(label.dtype)
    return image, label


def pad_to(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int], config: SegTransformConfig,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right up to ``size`` (no-op where already large enough); padded labels are ignored."""
    pad_h = max(0, size[0] - image.shape[-2])
    pad_w = max(0, size[1] - image.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return image, label
    image = F.pad(image, (0, pad_w, 0, pad_h), value=config.image_pad_value)
    label = F.pad(label, (0, pad_w, 0, pad_h), value=config.label_pad_value)
    return image, label


class RandomScaleCropFlip:
    """Random scale, pad to at least the crop size, random crop, random horizontal flip.

    Only the crop is computed: the scale, crop position and flip are drawn as if the whole image were
    rescaled and padded (``rescale``, ``pad_to``: the reference), then the crop's pixels are sampled
    directly from the source region they need, with the coordinates ``F.interpolate`` uses (bilinear,
    align_corners=False, for the image; nearest-exact for the label). A 768x768 crop of a 1024x2048
    image thus costs the crop's pixels, not the whole image's at up to twice its size.

    ``image`` is [C, H, W], float or integer (e.g. the decoded, unnormalised uint8 pixels; any memory layout:
    a [3, H, W] view of an [H, W, 3] array is the fast one); ``label`` is [H, W], any integer dtype,
    returned in that dtype (uint8 keeps a sample small). ``normalize`` is applied to the crop's values
    before padding: a per-channel affine map (e.g. the dataset's ImageNet normalisation), which commutes
    with bilinear resampling (its weights sum to 1), so normalising the crop equals cropping the
    normalised image, and the padding is ``image_pad_value`` in the normalised space.
    """

    def __init__(self, config: SegTransformConfig | None = None) -> None:
        self.config = config or SegTransformConfig()

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None, *,
                 normalize: Normalize | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[-2:] != label.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} differ in size")
        config = self.config
        height, width = image.shape[-2:]
        scaled = scaled_size((height, width), _uniform(*config.scale_range, generator))
        crop_h, crop_w = config.crop_size
        top = _randint(max(scaled[0], crop_h) - crop_h, generator)  # the padded size, as pad_to makes it
        left = _randint(max(scaled[1], crop_w) - crop_w, generator)
        flip = torch.rand((), generator=generator).item() < config.flip_probability
        return scaled_crop(image, label, scaled, (top, left), flip, config, normalize)
