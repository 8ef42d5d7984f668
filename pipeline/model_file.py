"""A trained model's file (``<run>/artifacts/model.pt``): written by the run's analysis, read back here.

The file holds ``{"config": ModelConfig, "state_dict": ...}`` and, for a detector, its heads' config,
category count and whether it has masks. It is read with ``weights_only=True`` and the model's own
config classes allowlisted: a model file may come from shared storage, and a pickle could run code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from divdr.config import GateConfig, ModelConfig, TemperatureConfig
from divdr.detection import DetectionConfig, DynamicRoutingDetector
from divdr.heads import DynamicRoutingSegmenter

SAFE_CLASSES = [ModelConfig, GateConfig, TemperatureConfig, DetectionConfig]


class ModelFileError(ValueError):
    """A model file that does not exist or was not written by this pipeline; the message names it."""


def load_model(path: Path) -> nn.Module:
    """The network of a model file, in eval mode on the CPU: a segmenter, or a detector."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            saved = torch.load(path, map_location="cpu", weights_only=True)
        net = _build(saved)
        net.load_state_dict(saved["state_dict"])
    except Exception as error:
        raise ModelFileError(f"{path} is not a model file written by this pipeline (or holds more than weights "
                             f"and the model's config): {str(error).splitlines()[0]}") from error
    return net.eval()


def _build(saved: dict) -> nn.Module:
    if "detection" in saved:
        return DynamicRoutingDetector(saved["config"], saved["detection"], saved["num_categories"],
                                      masks=saved["masks"])
    return DynamicRoutingSegmenter(saved["config"])
