"""``divdr summary``: parameters, routing cells, A-space and GFLOPs of a model at an input size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from divdr.config import FPN_SCALES, ConfigError, ModelConfig, config_from_dict
from divdr.flops import cost_table
from divdr.heads import DynamicRoutingSegmenter

# DR paper (Layer16, Cityscapes, 1024x2048), Table 3: the figures ``summary`` is checked against.
# DivDR (Layer17, COCO, 800x800): Fig. 4's A-space and Tables 4-5's backbone GFLOPs, which are averages
# of *dynamic* routes after training (DR-R 38.2, DivDR-R 32.9), not an all-open figure.
PAPER_REFERENCE = {
    "layer16": {"gflops_all_open": 103.1, "params_without_gates_M": 15.3, "params_M": 17.8, "a_dim": 183},
    "layer17": {"a_dim": 198, "gflops_dr_r": 38.2, "gflops_divdr_r": 32.9},
}
PAPER_SIZE = {"layer16": (1024, 2048), "layer17": (800, 800)}
COCO_CATEGORIES = 80  # the detector parameter count is given for COCO's 80 classes
TASKS = ("segmentation", "detection", "instance")


def load_model_config(path: Path) -> ModelConfig:
    """The ``model:`` section of a YAML experiment file."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"{path}: expected a mapping with a 'model:' section")
    return config_from_dict(ModelConfig, data["model"], where=f"{path}:model")


def default_task(config: ModelConfig) -> str:
    """Layer17-shaped backbones (five output scales) are the detection backbone."""
    return "detection" if config.final_scales == FPN_SCALES else "segmentation"


def summarize(config: ModelConfig, height: int, width: int, task: str = "segmentation") -> dict[str, Any]:
    """Parameters, cells, A-space and GFLOPs. ``params`` counts the backbone and the segmentation
    decoder; ``params_backbone`` the backbone alone; for a detection task ``params_detector`` counts
    the backbone, FPN and torchvision's heads at their COCO defaults (80 categories). GFLOPs at the
    size asked: ``gflops_all_open`` with the decoder (DR Table 3), ``gflops_backbone_all_open``
    without it (DivDR Tables 4-5 count backbone FLOPs under the detection heads)."""
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {TASKS}, got {task!r}")
    gated = replace(config, gate=replace(config.gate, enabled=True))
    model = DynamicRoutingSegmenter(gated)
    params = sum(p.numel() for p in model.parameters())
    gate_params = sum(p.numel() for n, p in model.named_parameters() if ".gate." in n)
    table = cost_table(gated, height, width)
    extra: dict[str, Any] = {}
    if task != "segmentation":
        from divdr.detection import DetectionConfig, build_detector  # torchvision's heads: only when asked

        detector = build_detector(gated, DetectionConfig(), COCO_CATEGORIES, task)  # type: ignore[arg-type]
        extra["params_detector"] = sum(p.numel() for p in detector.parameters())
    return {
        "size": [height, width],
        "task": task,
        "layers": config.layers,
        "channels": config.channels,
        "final_scales": config.num_scales,
        "params": params,
        "params_without_gates": params - gate_params,
        "params_backbone": sum(p.numel() for p in model.backbone.parameters()),
        **extra,
        "cells": config.routing_cells,
        "cells_with_init": config.routing_cells + 1,
        "a_dim": config.a_dim,
        "gflops_backbone_all_open": table.backbone_all_open / 1e9,
        "gflops_backbone_all_open_with_gates": (table.backbone_all_open + float(table.gate.sum())) / 1e9,
        "gflops_all_open": table.all_open / 1e9,
        "gflops_gates": float(table.gate.sum()) / 1e9,
        "gflops_all_open_with_gates": (table.all_open + float(table.gate.sum())) / 1e9,
        "gflops_stem": table.stem / 1e9,
        "gflops_decoder": table.decoder / 1e9,
        "gflops_init_cell": float(table.cell[0] + table.paths[0].sum()) / 1e9,
    }
