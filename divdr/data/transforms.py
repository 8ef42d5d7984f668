"""Joint training transforms on an (image, label) pair of tensors: random scale, pad + crop, flip.

DR's training recipe (Cityscapes): random scale 0.5-2.0, crop 768x768 (padding when the scaled image
is smaller), random horizontal flip. Evaluation uses no transform at all (full size).

Every random draw goes through an optional ``torch.Generator``, so a seeded generator reproduces a
crop exactly; without one, torch's global RNG is used (which DataLoader seeds per worker).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from divdr.config import ConfigError
from divdr.data.labels import IGNORE_INDEX


@dataclass(frozen=True)
class SegTransformConfig:
    """Parameters of the training transform; defaults are the DR paper's, crop size aside."""

    crop_size: tuple[int, int] = (768, 768)  # (height, width)
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip_probability: float = 0.5
    # The image is normalised before the transform, so 0 is the dataset mean: padding looks neutral.
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


def rescale(image: torch.Tensor, label: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear for the image, nearest for the label, to the same rounded size.

    'nearest-exact' samples at pixel centres like bilinear with align_corners=False; plain 'nearest'
    is shifted by half a pixel and would misalign labels from the image by up to one pixel.
    """
    height, width = image.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
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
    """Random scale, pad to at least the crop size, random crop, random horizontal flip."""

    def __init__(self, config: SegTransformConfig | None = None) -> None:
        self.config = config or SegTransformConfig()

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[-2:] != label.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} differ in size")
        config = self.config
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
