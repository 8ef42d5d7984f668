"""Loading a run's ``artifacts/model.pt`` (written by ``pipeline.analysis._model_bytes``) safely.

The file holds ``{"config": ModelConfig, "state_dict": ...}``, plus ``detection``, ``num_categories``
and ``masks`` for a detector. It is loaded with ``weights_only=True`` and the model's own config
classes allowlisted: a model file may come from shared storage, and a pickle could run code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from divdr.config import GateConfig, ModelConfig, TemperatureConfig
from divdr.detection import DetectionConfig, build_detector
from divdr.heads import DynamicRoutingSegmenter

SAFE_CLASSES = [ModelConfig, GateConfig, TemperatureConfig, DetectionConfig]


class ModelFileError(ValueError):
    """A model file is missing, unreadable or not one this pipeline wrote; the message names it."""


def load_model(path: Path) -> nn.Module:
    """The network of a model file, in eval mode on the CPU: a ``DynamicRoutingSegmenter``, or a
    ``DynamicRoutingDetector`` when the file carries detection heads."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelFileError(f"{path} is not a model file written by this pipeline (or holds more than "
                             f"weights and a ModelConfig): {str(error).splitlines()[0]}") from error
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), ModelConfig) or "state_dict" not in saved:
        raise ModelFileError(f"{path} is not a model file written by this pipeline: expected a dict with a "
                             "ModelConfig under 'config' and a 'state_dict'")
    if "detection" in saved:
        net: nn.Module = build_detector(saved["config"], saved["detection"], int(saved["num_categories"]),
                                        "instance" if saved.get("masks") else "detection")
    else:
        net = DynamicRoutingSegmenter(saved["config"])
    try:
        net.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise ModelFileError(f"{path}: its weights do not fit the network its config describes: "
                             f"{str(error).splitlines()[0]}") from error
    return net.eval()


def load_weights(net: nn.Module, path: Path) -> nn.Module:
    """``net`` with the weights of the model file ``path`` (``train.init_from``). The file's network must
    have the same parameters and buffers; its gate, budget or clustering settings may differ."""
    source = load_model(path)
    if type(source) is not type(net):
        raise ModelFileError(f"train.init_from: {path} holds a {type(source).__name__}, this run trains a "
                             f"{type(net).__name__}")
    try:
        net.load_state_dict(source.state_dict())
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:])[:400]
        raise ModelFileError(f"train.init_from: the weights of {path} do not fit this run's network "
                             f"(model.size, classes or routing space differ): {detail}") from error
    return net
