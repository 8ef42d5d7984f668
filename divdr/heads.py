"""Task heads on the DR backbone. Semantic segmentation: the official "naive decoder"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from divdr.backbone import SIZE_DIVISIBILITY, BackboneOutput, DynamicBackbone, feature_name
from divdr.config import ModelConfig
from divdr.ops import bilinear, conv_bn, convert_norm, drop_batch_counters, kaiming_init


class NaiveDecoder(nn.Module):
    """Per scale a 1x1 conv + BN + ReLU (halving the width, except at 1/4), summed coarse to fine
    with bilinear x2 up-sampling, then a 3x3 conv to the classes at 1/4 and bilinear x4."""

    def __init__(self, channels: int, num_classes: int, num_scales: int = 4) -> None:
        super().__init__()
        widths = [channels * 2**s for s in range(num_scales)]
        self.lateral = nn.ModuleList(
            conv_bn(w, w if s == 0 else w // 2, 1) for s, w in enumerate(widths)
        )
        self.predictor = nn.Conv2d(channels, num_classes, 3, padding=1, bias=True)
        kaiming_init(self)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        pred: torch.Tensor | None = None
        for scale in reversed(range(len(self.lateral))):
            x = features[feature_name(scale)]
            if pred is not None:
                x = x + pred
            pred = self.lateral[scale](x)
            if scale > 0:  # to the finer map's size: Layer17's 1/64 map is ceil(H/64), not H/64
                pred = bilinear(pred, size=features[feature_name(scale - 1)].shape[-2:])
        logits = self.predictor(pred)
        if logits.dtype in (torch.bfloat16, torch.float16):
            # float32 from here: the losses (cross-entropy's log-softmax) run in float32 under autocast anyway,
            # so the 16x larger map is written once in float32 rather than in bf16 and cast; and the backward adds
            # into the small logits with float32 atomics (-2.2 ms per Layer16 step on an H200)
            logits = logits.float()
        # resized from a contiguous (NCHW) map, also under channels_last: the cross-entropy's log-softmax over the
        # classes needs the full-size logits contiguous and copied the 16x larger map otherwise
        return bilinear(logits.contiguous(), scale_factor=4)


@dataclass
class SegmentationOutput:
    logits: torch.Tensor  # [B, classes, H, W] at the input size
    backbone: BackboneOutput


class DynamicRoutingSegmenter(nn.Module):
    """DR network for semantic segmentation: backbone + naive decoder.

    Inputs of any size are zero-padded (bottom/right) to a multiple of 32, as the official
    ImageList(size_divisibility=32) does, and the logits are cropped back.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = DynamicBackbone(config)
        self.decoder = drop_batch_counters(
            convert_norm(NaiveDecoder(config.channels, config.num_classes, config.num_scales), config.norm))

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        height, width = images.shape[-2:]
        padded = F.pad(images, (0, padded_size(width) - width, 0, padded_size(height) - height))
        out = self.backbone(padded)
        logits = self.decoder(out.features)
        if logits.shape[-2:] != (height, width):  # a crop even of the whole map costs a copy in the backward
            logits = logits[..., :height, :width]
        return SegmentationOutput(logits, out)


def padded_size(n: int) -> int:
    return -(-n // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
