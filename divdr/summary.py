"""``divdr summary``: parameters, routing cells, A-space and GFLOPs of a model at an input size."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from divdr.config import FPN_SCALES, MODEL_SIZES, ConfigError, ModelConfig, config_from_dict, get_model_config
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


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like HEIGHTxWIDTH (e.g. 1024x2048), got {text!r}") from None
    if height < 1 or width < 1:
        raise ConfigError(f"--size must be positive, got {text!r}")
    return height, width


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="layer16", choices=sorted(MODEL_SIZES), help="model size")
    source.add_argument("--config", type=Path, help="YAML experiment file with a 'model:' section")
    parser.add_argument("--size", default="1024x2048", help="input HEIGHTxWIDTH (default 1024x2048)")
    parser.add_argument("--task", choices=TASKS,
                        help="heads whose parameters to count (default: detection for Layer17-shaped "
                             "five-scale backbones, else segmentation)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    config = load_model_config(args.config) if args.config else get_model_config(args.model)
    height, width = parse_size(args.size)
    info = summarize(config, height, width, args.task or default_task(config))
    reference = None if args.config else PAPER_REFERENCE.get(args.model)
    if reference and (height, width) != PAPER_SIZE[args.model]:
        reference = None  # the paper's figures are for its size only
    if reference:
        info["paper"] = reference
    if args.json:
        print(json.dumps(info))
        return 0
    name = str(args.config) if args.config else args.model
    print(f"{name}: {config.layers} layers, C={config.channels}, {info['final_scales']} output scales, "
          f"input {height}x{width}, task {info['task']}")
    ref = reference or {}

    def paper(key: str, unit: str = "") -> str | None:
        return f"{ref[key]}{unit}" if key in ref else None

    rows = [
        ("parameters (with gates)", f"{info['params'] / 1e6:.3f} M", paper("params_M", " M")),
        ("parameters (without gates)", f"{info['params_without_gates'] / 1e6:.3f} M",
         paper("params_without_gates_M", " M")),
        ("parameters, backbone alone", f"{info['params_backbone'] / 1e6:.3f} M", None),
        *([("parameters, FPN + R-CNN heads incl.", f"{info['params_detector'] / 1e6:.3f} M", None)]
          if "params_detector" in info else []),
        ("routing cells (+1 initial cell)", str(info["cells"]), None),
        ("A-space dimension", str(info["a_dim"]), paper("a_dim")),
        ("GFLOPs, all paths open, no gates", f"{info['gflops_all_open']:.2f}", paper("gflops_all_open")),
        ("GFLOPs, backbone, all open", f"{info['gflops_backbone_all_open']:.2f}",
         "DR-R {gflops_dr_r}, DivDR-R {gflops_divdr_r} dynamic".format(**ref) if "gflops_dr_r" in ref else None),
        ("GFLOPs of all gates", f"{info['gflops_gates']:.3f}", None),
    ]
    for label, value, figure in rows:
        print(f"  {label:<36} {value:>12}" + (f"   (paper: {figure})" if figure else ""))
    return 0


