"""``divdr summary``: parameters, routing cells, A-space and GFLOPs of a model at an input size."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from divdr.config import MODEL_SIZES, ConfigError, ModelConfig, config_from_dict, get_model_config
from divdr.flops import cost_table
from divdr.heads import DynamicRoutingSegmenter

# DR paper (Layer16, Cityscapes, 1024x2048), Table 3: the figures ``summary`` is checked against.
PAPER_REFERENCE = {
    "layer16": {"gflops_all_open": 103.1, "params_without_gates_M": 15.3, "params_M": 17.8, "a_dim": 183},
}


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


def summarize(config: ModelConfig, height: int, width: int) -> dict[str, Any]:
    gated = replace(config, gate=replace(config.gate, enabled=True))
    model = DynamicRoutingSegmenter(gated)
    params = sum(p.numel() for p in model.parameters())
    gate_params = sum(p.numel() for n, p in model.named_parameters() if ".gate." in n)
    table = cost_table(gated, height, width)
    return {
        "size": [height, width],
        "layers": config.layers,
        "channels": config.channels,
        "params": params,
        "params_without_gates": params - gate_params,
        "cells": config.routing_cells,
        "cells_with_init": config.routing_cells + 1,
        "a_dim": config.a_dim,
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
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    config = load_model_config(args.config) if args.config else get_model_config(args.model)
    height, width = parse_size(args.size)
    info = summarize(config, height, width)
    reference = None if args.config else PAPER_REFERENCE.get(args.model)
    if reference and (height, width) == (1024, 2048):
        info["paper"] = reference
    if args.json:
        print(json.dumps(info))
        return 0
    name = str(args.config) if args.config else args.model
    print(f"{name}: {config.layers} layers, C={config.channels}, input {height}x{width}")
    rows = [
        ("parameters (with gates)", f"{info['params'] / 1e6:.3f} M", reference and f"{reference['params_M']} M"),
        ("parameters (without gates)", f"{info['params_without_gates'] / 1e6:.3f} M",
         reference and f"{reference['params_without_gates_M']} M"),
        ("routing cells (+1 initial cell)", str(info["cells"]), None),
        ("A-space dimension", str(info["a_dim"]), reference and str(reference["a_dim"])),
        ("GFLOPs, all paths open, no gates", f"{info['gflops_all_open']:.2f}",
         reference and f"{reference['gflops_all_open']}"),
        ("GFLOPs of all gates", f"{info['gflops_gates']:.3f}", None),
    ]
    for label, value, paper in rows:
        print(f"  {label:<34} {value:>12}" + (f"   (DR paper: {paper})" if paper else ""))
    return 0


