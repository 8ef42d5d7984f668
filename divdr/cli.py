"""The divdr command line: summary, make-data, baselines, eval-seg and eval-coco.

Every command is here, parsing its arguments and printing what the library computes: the library
modules (``divdr.summary``, ``divdr.data.synthetic``, ``divdr.data.baselines``, ``divdr.metrics``,
``divdr.coco_eval``) hold no command-line code, and each command imports only what it needs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from divdr.coco_eval import IOU_TYPES, load_gt, results_coco, score
from divdr.config import MODEL_SIZES, ConfigError, get_model_config
from divdr.data.baselines import baseline_rows, format_baselines, load_split
from divdr.data.manifest import SUBSET_MANIFEST
from divdr.data.study import (
    DEFAULT_NUM_SUBSETS,
    DEFAULT_REGIMES,
    PREMISE_STUDY,
    STUDIES,
    StudyConfig,
    regimes_by_name,
    study_config,
)
from divdr.data.synthetic import EMPTY_SUBSET_NAME, SPLITS, generate
from divdr.metrics import evaluate_folders, scores_to_json
from divdr.summary import PAPER_REFERENCE, PAPER_SIZE, TASKS, default_task, load_model_config, summarize


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like HEIGHTxWIDTH (e.g. 1024x2048), got {text!r}") from None
    if height < 1 or width < 1:
        raise ConfigError(f"--size must be positive, got {text!r}")
    return height, width

def _integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``; argparse names the argument in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


count = _integer_at_least(1)  # image counts: an empty split is no study
non_negative = _integer_at_least(0)  # seeds: numpy refuses negative ones

# ---- summary -----------------------------------------------------------------------------------

def summary_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="layer16", choices=sorted(MODEL_SIZES), help="model size")
    source.add_argument("--config", type=Path, help="YAML experiment file with a 'model:' section")
    parser.add_argument("--size", default="1024x2048", help="input HEIGHTxWIDTH (default 1024x2048)")
    parser.add_argument("--task", choices=TASKS,
                        help="heads whose parameters to count (default: detection for Layer17-shaped "
                             "five-scale backbones, else segmentation)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def summary(args: argparse.Namespace) -> int:
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


# ---- make-data ---------------------------------------------------------------------------------

def make_data_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = StudyConfig()
    parser.add_argument("--study", choices=sorted(STUDIES), default="default",
                        help="default: the street study (3 regimes: large, tiny, thin); premise: the two regimes "
                             "that need different routes by construction (fine, coarse; 96x384)")
    parser.add_argument("--kind", choices=("seg", "det"), default="seg",
                        help="seg: Cityscapes layout; det: COCO instances JSON (default seg)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    parser.add_argument("--n-train", type=count, help=f"training images (default: the study's, {defaults.n_train})")
    parser.add_argument("--n-val", type=count,
                        help=f"validation images (default: the study's, {defaults.n_val} or {PREMISE_STUDY.n_val})")
    parser.add_argument("--seed", type=non_negative, help=f"default {defaults.seed}")
    parser.add_argument("--size", help="HEIGHTxWIDTH (default: the study's, 128x256 or 96x384)")
    parser.add_argument("--subsets", type=int,
                        help=f"default study: number of regimes, 1-{len(DEFAULT_REGIMES)}: "
                             f"{', '.join(r.name for r in DEFAULT_REGIMES)} (default {DEFAULT_NUM_SUBSETS})")
    parser.add_argument("--clutter", choices=("shadow", "decoy"),
                        help="default study: the other regimes' shapes as darkened background (shadow, "
                             "the default) or painted like objects but labelled background (decoy)")
    parser.add_argument("--decoy-fraction", type=float,
                        help="decoy mode: each other geometry's share of the object budget "
                             f"(default {defaults.decoy_fraction})")
    parser.add_argument("--regimes", help="default study: regimes by name, in subset order, e.g. "
                                          "large,tiny,medium (instead of --subsets)")


DEFAULT_STUDY_OPTIONS = ("subsets", "clutter", "decoy_fraction", "regimes")


def study_from_args(args: argparse.Namespace) -> StudyConfig:
    """The StudyConfig the command line asks for (named study, then sizes and the default study's knobs)."""
    config = STUDIES[args.study]
    given = [name for name in DEFAULT_STUDY_OPTIONS if getattr(args, name) is not None]
    if args.study != "default" and given:
        raise ConfigError(f"--{given[0].replace('_', '-')} applies to --study default only; "
                          f"the {args.study} study fixes its regimes")
    if args.size:
        height, width = parse_size(args.size)
        config = replace(config, height=height, width=width)
    for name in ("n_train", "n_val", "seed"):
        if getattr(args, name) is not None:
            config = replace(config, **{name: getattr(args, name)})
    if args.study != "default":
        return config
    for name in ("clutter", "decoy_fraction"):
        if getattr(args, name) is not None:
            config = replace(config, **{name: getattr(args, name)})
    if args.regimes:
        return replace(config, regimes=regimes_by_name(args.regimes))
    if args.subsets is not None:
        return replace(config, regimes=study_config(args.subsets).regimes)
    return config


def make_data(args: argparse.Namespace) -> int:
    config = study_from_args(args)
    start = time.perf_counter()
    counts = generate(config, args.out, args.kind)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.kind} study to {args.out} in {elapsed:.1f} s "
          f"({args.study} study, {config.height}x{config.width}, seed {config.seed})")
    order = [r.name for r in config.regimes] + [EMPTY_SUBSET_NAME]
    for split, per_subset in counts.items():
        detail = ", ".join(f"{name} {per_subset[name]}" for name in order if per_subset[name])
        print(f"  {split}: {sum(per_subset.values())} images ({detail})")
    print(f"  subset manifest: {args.out / SUBSET_MANIFEST}")
    if args.kind == "det":
        print(f"  annotations: {args.out / 'annotations'}/instances_{{{','.join(SPLITS)}}}.json")
    return 0


# ---- baselines ---------------------------------------------------------------------------------

def baselines_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="a study folder (Cityscapes layout with subsets.parquet)")
    parser.add_argument("--split", default="val", help="which split to cluster (default val)")
    parser.add_argument("--json", type=Path, help="also write the recoveries to this JSON file")


def baselines(args: argparse.Namespace) -> int:
    images, labels, subsets, names = load_split(args.root, args.split)
    rows = baseline_rows(images, labels, subsets)
    print(format_baselines(rows, len(subsets), names))
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "subsets": names, "recovery": rows}, indent=1))
    return 0


# ---- eval-seg ----------------------------------------------------------------------------------

def eval_seg_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", type=Path, required=True,
                        help="folder of predictions, searched recursively: <image id>.png holding train ids "
                             "(0-18, 255 = none), or <image id>_gtFine_labelIds.png holding Cityscapes labelIds")
    parser.add_argument("--gt", type=Path, required=True, help="gtFine folder (holds **/*_gtFine_labelIds.png)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def eval_seg(args: argparse.Namespace) -> int:
    scores, num_images = evaluate_folders(args.pred, args.gt)
    if args.json:
        print(json.dumps(scores_to_json(scores, num_images)))
        return 0
    print(f"{num_images} images")
    for name, value in scores.per_class.items():
        print(f"  {name:<16} {'n/a' if math.isnan(value) else f'{100 * value:6.2f}'}")
    print(f"  {'mIoU':<16} {100 * scores.miou:6.2f}")
    return 0


# ---- eval-coco ---------------------------------------------------------------------------------

def eval_coco_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", type=Path, required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument("--pred", type=Path, required=True, help="COCO results JSON (a list of detections)")
    parser.add_argument("--iou-type", choices=IOU_TYPES, default="bbox", help="bbox or segm (default bbox)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (undefined metrics: null)")
    parser.add_argument("--verbose", action="store_true", help="let pycocotools print its progress and summary")


def eval_coco(args: argparse.Namespace) -> int:
    coco_gt = load_gt(args.gt, args.iou_type, args.verbose)
    coco_dt = results_coco(args.pred, coco_gt, args.iou_type, args.verbose)
    scores = score(coco_gt, coco_dt, args.iou_type, args.verbose)
    if args.json:
        info: dict[str, Any] = {"iou_type": args.iou_type, "num_images": len(coco_gt.imgs),
                                "num_results": len(coco_dt.anns)}
        info.update({name: None if math.isnan(v) else v for name, v in scores.items()})  # JSON has no NaN
        print(json.dumps(info))
        return 0
    print(f"COCO {args.iou_type}: {len(coco_dt.anns)} results on {len(coco_gt.imgs)} images")
    for name, value in scores.items():
        print(f"  {name:<6} {'n/a' if math.isnan(value) else f'{value:.4f}'}")
    return 0


# ---- dispatch ----------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "summary": ("parameters, cells, A-space and GFLOPs of a model", summary_arguments, summary),
    "make-data": ("generate a controlled study (Cityscapes seg or COCO det layout)", make_data_arguments, make_data),
    "baselines": ("can colour, random nets or an untrained net find the subsets?", baselines_arguments, baselines),
    "eval-seg": ("mIoU of prediction PNGs (train ids or labelIds) against a Cityscapes gtFine folder",
                 eval_seg_arguments, eval_seg),
    "eval-coco": ("COCO bbox / segm mAP of a results JSON (pycocotools COCOeval)", eval_coco_arguments, eval_coco),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="divdr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"divdr {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
