"""Detection and instance segmentation on the DR backbone with torchvision's FPN and R-CNN heads.

DivDR Tables 3-5 put DR / DivDR backbones ("Layer17") under Faster R-CNN and Mask R-CNN. Here the
backbone's last-layer features go through ``torchvision.ops.FeaturePyramidNetwork`` and torchvision's
own ``FasterRCNN`` / ``MaskRCNN`` parts (transform, RPN, RoI heads); nothing of the heads is rewritten.

The forward is the few lines of torchvision's ``GeneralizedRCNN.forward`` glue, so that one call gives
the losses (training) or the detections (evaluation) *and* the backbone's ``BackboneOutput``: the gates
and A(x) go to the budget and clustering losses and to the centroid store exactly as in segmentation.

Feature levels: a Layer17 backbone (``final_scales=5``) ends in five maps, 1/4 .. 1/64, which become
FPN's P2-P6 directly. A four-scale backbone gets torchvision's ``LastLevelMaxPool`` for the fifth
level, as ``resnet_fpn_backbone`` does. The RPN uses all five levels, the RoI heads P2-P5 (FPN paper,
torchvision's defaults).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from divdr.backbone import BackboneOutput, DynamicBackbone, feature_name
from divdr.config import FPN_SCALES, ConfigError, ModelConfig

Task = Literal["segmentation", "detection", "instance"]
DETECTION_TASKS: tuple[str, ...] = ("detection", "instance")
FPN_LEVELS = FPN_SCALES  # P2 .. P6
ROI_LEVELS = 4  # the RoI heads pool from P2 .. P5
POOL_LEVEL = "pool"  # torchvision's name for LastLevelMaxPool's output
BOX_POOL_SIZE = 7  # torchvision's defaults for the RoI pools
MASK_POOL_SIZE = 14
ROI_SAMPLING_RATIO = 2


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DetectionConfig:
    """The FPN and R-CNN heads around the DR backbone, and the image sizes torchvision's transform uses.

    Defaults are torchvision's COCO settings (the paper's: shorter edge 800), anchors 32..512 one
    size per level. Small images and a CPU budget want smaller anchors, a narrower FPN and heads.
    """

    fpn_channels: int = 256
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level, P2 .. P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_size: int = 800  # shorter edge after torchvision's resize
    max_size: int = 1333
    representation_size: int = 1024  # TwoMLPHead width
    mask_head_layers: tuple[int, ...] = (256, 256, 256, 256)  # MaskRCNNHeads convs
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100  # COCOeval's maxDets
    box_score_thresh: float = 0.05
    mask_threshold: float = 0.5  # mask probabilities above this are the instance's pixels

    def __post_init__(self) -> None:
        _require(self.fpn_channels >= 1, f"detection.fpn_channels must be >= 1, got {self.fpn_channels}")
        _require(len(self.anchor_sizes) == FPN_LEVELS and all(s > 0 for s in self.anchor_sizes),
                 f"detection.anchor_sizes must be {FPN_LEVELS} positive sizes (one per FPN level P2-P6), "
                 f"got {self.anchor_sizes}")
        _require(len(self.aspect_ratios) >= 1 and all(r > 0 for r in self.aspect_ratios),
                 f"detection.aspect_ratios must be positive numbers, got {self.aspect_ratios}")
        _require(0 < self.min_size <= self.max_size,
                 f"detection.min_size/max_size must satisfy 0 < min <= max, got {self.min_size}, {self.max_size}")
        _require(self.representation_size >= 1,
                 f"detection.representation_size must be >= 1, got {self.representation_size}")
        _require(len(self.mask_head_layers) >= 1 and all(c >= 1 for c in self.mask_head_layers),
                 f"detection.mask_head_layers must be at least one positive width, got {self.mask_head_layers}")
        for name in ("rpn_batch_size_per_image", "box_batch_size_per_image", "box_detections_per_img"):
            _require(getattr(self, name) >= 1, f"detection.{name} must be >= 1, got {getattr(self, name)}")
        _require(0 <= self.box_score_thresh < 1, f"detection.box_score_thresh must be in [0, 1), got "
                                                  f"{self.box_score_thresh}")
        _require(0 < self.mask_threshold < 1, f"detection.mask_threshold must be in (0, 1), got {self.mask_threshold}")


class DynamicFPNBackbone(nn.Module):
    """The DR backbone plus torchvision's FPN, shaped as torchvision's detectors want a backbone:
    an ``out_channels`` attribute and ``forward(tensor) -> OrderedDict`` of the pyramid levels.

    ``routed`` gives the pyramid and the ``BackboneOutput`` (gates, A(x)) of the same pass.
    """

    def __init__(self, config: ModelConfig, fpn_channels: int) -> None:
        super().__init__()
        self.body = DynamicBackbone(config)
        in_channels = list(self.body.out_channels.values())
        extra = None if config.num_scales == FPN_LEVELS else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, extra_blocks=extra)
        self.out_channels = fpn_channels
        self.level_names = [feature_name(s) for s in range(config.num_scales)]
        if extra is not None:
            self.level_names.append(POOL_LEVEL)

    def routed(self, images: torch.Tensor) -> tuple[OrderedDict[str, torch.Tensor], BackboneOutput]:
        out = self.body(images)
        pyramid = self.fpn(OrderedDict((name, out.features[name]) for name in self.body.out_channels))
        return pyramid, out

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.routed(images)[0]


@dataclass
class DetectionOutput:
    """One output type in training and evaluation: torchvision's loss dict (training; empty in
    evaluation), its detections (evaluation, in input-image coordinates; empty in training), the
    backbone's gates and A(x), and the padded batch size the backbone saw (for the cost table)."""

    losses: dict[str, torch.Tensor]
    detections: list[dict[str, torch.Tensor]]
    backbone: BackboneOutput
    image_size: tuple[int, int]


class DynamicRoutingDetector(nn.Module):
    """Faster R-CNN (``masks=False``) or Mask R-CNN (``masks=True``) on a DR backbone with FPN.

    ``num_categories`` object classes; torchvision's label 0 is the background, so targets carry
    labels 1..num_categories (what ``divdr.data.coco.CocoDetection`` gives).
    """

    def __init__(self, config: ModelConfig, detection: DetectionConfig, num_categories: int,
                 masks: bool = False) -> None:
        super().__init__()
        if num_categories < 1:
            raise ConfigError(f"a detector needs at least one object category, got {num_categories}")
        self.config = config
        self.detection = detection
        self.num_categories = num_categories
        self.masks = masks
        self.backbone = DynamicFPNBackbone(config, detection.fpn_channels)
        rcnn = self._torchvision_model(detection, num_categories + 1, masks)
        # torchvision's parts, used by the glue in forward; the GeneralizedRCNN shell is dropped
        self.transform = rcnn.transform
        self.rpn = rcnn.rpn
        self.roi_heads = rcnn.roi_heads

    def _torchvision_model(self, det: DetectionConfig, num_classes: int, masks: bool) -> FasterRCNN:
        levels = self.backbone.level_names
        roi_levels = levels[:ROI_LEVELS]
        width = self.backbone.out_channels
        anchors = AnchorGenerator(sizes=tuple((s,) for s in det.anchor_sizes),
                                  aspect_ratios=(tuple(det.aspect_ratios),) * len(levels))
        common = dict(
            num_classes=None, min_size=det.min_size, max_size=det.max_size, rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(roi_levels, BOX_POOL_SIZE, ROI_SAMPLING_RATIO),
            box_head=TwoMLPHead(width * BOX_POOL_SIZE**2, det.representation_size),
            box_predictor=FastRCNNPredictor(det.representation_size, num_classes),
            rpn_batch_size_per_image=det.rpn_batch_size_per_image,
            box_batch_size_per_image=det.box_batch_size_per_image,
            box_detections_per_img=det.box_detections_per_img, box_score_thresh=det.box_score_thresh,
        )
        if not masks:
            return FasterRCNN(self.backbone, **common)
        last = det.mask_head_layers[-1]
        return MaskRCNN(self.backbone, **common,
                        mask_roi_pool=MultiScaleRoIAlign(roi_levels, MASK_POOL_SIZE, ROI_SAMPLING_RATIO),
                        mask_head=MaskRCNNHeads(width, list(det.mask_head_layers), 1),
                        mask_predictor=MaskRCNNPredictor(last, last, num_classes))

    def forward(self, images: list[torch.Tensor],
                targets: list[dict[str, torch.Tensor]] | None = None) -> DetectionOutput:
        if self.training and targets is None:
            raise ValueError("DynamicRoutingDetector in training mode needs targets")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        features, routing = self.backbone.routed(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if not self.training:
            detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        return DetectionOutput({**rpn_losses, **roi_losses}, detections if not self.training else [], routing,
                               _size(image_list.tensors))

    def route(self, images: list[torch.Tensor]) -> tuple[BackboneOutput, tuple[int, int]]:
        """The backbone's gates and A(x) alone (no FPN, no heads), on the images as the detector
        sees them (torchvision's resize, normalisation and padding), and that padded size."""
        image_list, _ = self.transform(images)
        return self.backbone.body(image_list.tensors), _size(image_list.tensors)


def _size(batch: torch.Tensor) -> tuple[int, int]:
    return int(batch.shape[-2]), int(batch.shape[-1])


def build_detector(config: ModelConfig, detection: DetectionConfig, num_categories: int,
                   task: Task) -> DynamicRoutingDetector:
    """``task``: ``detection`` (Faster R-CNN) or ``instance`` (Mask R-CNN)."""
    if task not in DETECTION_TASKS:
        raise ConfigError(f"task must be one of {DETECTION_TASKS} for a detector, got {task!r}")
    return DynamicRoutingDetector(config, detection, num_categories, masks=task == "instance")
