"""The controlled study's oracle (DivDR sec. 5): one expert per *known* subset, against DivDR.

``python pipeline/oracle.py [--out runs] [--preset DR-A] [--set key=value ...] [--compare MODEL.pt ...] [--local]``

For every subset s of the dataset's manifest, a network of the same size as the main job's is
trained on the images of s only (a symlinked view of the dataset, ``divdr.data.cityscapes.write_subset_view``)
with the same configuration and number of steps, and evaluated on the val images of s. The oracle's
mIoU comes from the experts' confusion matrices summed over subsets (each val image seen by its own
expert: the hypothetical perfect router), its GFLOPs are the mean real GFLOPs per val image.

The paper's local experts are trained on their subset from scratch. Where a subset is too small or too
imbalanced for that (the premise study's fine regime: an expert trained on it alone paints everything
road), ``--set train.init_from=<run>/artifacts/model.pt`` starts every expert from a network trained on
every image (e.g. DR-A of the same seed) and fine-tunes it on its subset: a deviation, named in the table.

``--compare`` evaluates other trained models (``<run>/artifacts/model.pt``, e.g. the main job's
DivDR-A) on the same val images, per subset, so they appear in the same table.

``--reuse-experts`` scores the experts an earlier call trained under the same ``--out`` instead of training
them again, and ``--split train`` scores every row on the training images rather than val (does a model fit
the images it learned from, or is it short of capacity?). Together with ``--compare <out>/oracle-<subset>/
artifacts/model.pt`` they show what an expert does on the other subsets. A rescoring writes its own
``rescored-<split>-<time>.md/.json``: the table of the call that trained the experts is kept.

``--route-experts`` builds the other half of a controlled study's proof (the premise study's): instead of
one expert per subset's *images*, one expert per regime's *route*. Each is the network restricted to the
part of the routing space its regime needs (``model.route`` from the study's ``study.json``, no gates,
every path of the route open), trained on every training image, then scored on each subset's val images;
beside them the whole routing space with no gates (Network-Fix). If each route wins on its own regime and
fails on the others, the regimes need different routes by construction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import yaml

from divdr.config import PRESETS, ConfigError
from divdr.data.cityscapes import CityscapesSegmentation, write_subset_view
from divdr.data.manifest import SUBSET_MANIFEST
from divdr.data.manifest import subset_names as manifest_subset_names
from divdr.data.synthetic import regime_routes
from divdr.evaluation import InferenceResult, run_inference
from divdr.heads import DynamicRoutingSegmenter
from divdr.metrics import scores_from_confusion
from pipeline import model_file, tracking
from pipeline.cli_args import add_common, add_local, data_overrides, parser_for, persistent_out, preset_help
from pipeline.config import ExperimentConfig, deep_merge, redact_uri, resolve, with_smoke
from pipeline.main_job import MAIN_JOB
from pipeline.model_file import ModelFileError
from pipeline.tasks import make_task
from pipeline.train import init_ray, run, with_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = parser_for("pipeline/oracle.py", __doc__)
    add_common(parser, "every expert (on the main job's values)")
    parser.add_argument("--preset", default="DR-A", choices=sorted(PRESETS), metavar="PRESET",
                        help=preset_help("DR-A: the budget of the main job, no clustering", "preset of the experts: "))
    parser.add_argument("--compare", nargs="*", type=Path, default=[], metavar="MODEL_PT",
                        help="trained models (<run>/artifacts/model.pt) to evaluate per subset beside the oracle")
    parser.add_argument("--route-experts", action="store_true",
                        help="one expert per regime's route (study.json) instead of per subset's images")
    parser.add_argument("--no-network-fix", action="store_true",
                        help="with --route-experts: leave out the Network-Fix row (every path, no gates)")
    parser.add_argument("--reuse-experts", action="store_true",
                        help="score the experts an earlier call trained under --out instead of training them")
    add_local(parser, "train every expert")
    parser.add_argument("--split", choices=("val", "train"), default="val",
                        help="the images every row is scored on (train: does a model fit what it learned from?)")
    return parser


def subset_names(root: Path) -> dict[int, str]:
    names = manifest_subset_names(root)
    if not names:
        raise SystemExit(f"pipeline/oracle.py: error: {root} has no {SUBSET_MANIFEST}; the oracle needs known subsets")
    return names


def load_model(path: Path) -> DynamicRoutingSegmenter:
    """A segmentation model written by the pipeline's analysis (``pipeline.model_file``)."""
    try:
        net = model_file.load_model(path)
    except ModelFileError as error:
        raise SystemExit(f"pipeline/oracle.py: error: {error}") from error
    if not isinstance(net, DynamicRoutingSegmenter):
        raise SystemExit(f"pipeline/oracle.py: error: {path} is a detector; the oracle compares segmentation models")
    return net


def combine(parts: list[InferenceResult]) -> dict[str, float]:
    """mIoU from the summed confusion matrices, mean real GFLOPs per image."""
    matrix = sum(p.confusion.matrix.cpu().numpy().astype(np.int64) for p in parts)
    names = parts[0].confusion.class_names
    gflops = np.concatenate([p.real_gflops for p in parts])
    gflops_ref = np.concatenate([p.real_gflops_reference for p in parts])
    return {"miou": scores_from_confusion(matrix, names).miou, "gflops_real": float(gflops.mean()),
            "gflops_real_1024x2048": float(gflops_ref.mean()), "images": int(gflops.size)}


def evaluate_per_subset(nets: dict[int, DynamicRoutingSegmenter], views: dict[int, Path],
                        split: str = "val") -> dict[str, Any]:
    """Each subset's ``split`` images scored by ``nets[subset]`` (the oracle's experts, or one model for all)."""
    parts = {s: run_inference(nets[s], CityscapesSegmentation(view, split)) for s, view in views.items()}
    row = combine(list(parts.values()))
    row["per_subset_miou"] = {s: p.scores.miou for s, p in parts.items()}
    return row


def format_rows(rows: dict[str, dict[str, Any]], names: dict[int, str], split: str = "val") -> str:
    subsets = sorted(names)
    header = (f"| model | mIoU (all {split}) | " + " | ".join(f"mIoU {names[s]}" for s in subsets)
              + " | GFLOPs (eval size) | GFLOPs @1024x2048 |")
    lines = [header, "|" + "---|" * (4 + len(subsets))]
    for label, r in rows.items():
        per = " | ".join(f"{r['per_subset_miou'][s]:.3f}" for s in subsets)
        lines.append(f"| {label} | {r['miou']:.3f} | {per} | {r['gflops_real']:.3f} | "
                     f"{r['gflops_real_1024x2048']:.2f} |")
    return "\n".join(lines)


# A route expert: the task loss alone, no gates (every path of its route open), no centroid store.
ROUTE_EXPERT_OVERRIDES = ("model.gate.enabled=false", "budget.weight=0", "clustering.weight=0", "resource.weight=0",
                          "store.enabled=false")


def expert(cfg: ExperimentConfig, out: Path, args: argparse.Namespace) -> DynamicRoutingSegmenter:
    """The expert ``cfg`` describes: trained now under ``out`` (``--local``: in this process), or with
    ``--reuse-experts`` the one trained there before."""
    if args.reuse_experts:
        path = out / cfg.run_name / "artifacts" / "model.pt"
        if not path.is_file():
            raise SystemExit(f"pipeline/oracle.py: error: --reuse-experts: no expert {cfg.run_name!r} under {out} "
                             f"({path} does not exist); train the experts first (the same command without it)")
        return load_model(path)
    metrics = run(cfg, out, existing="fresh", local=args.local)
    return load_model(Path(metrics["run_dir"]) / "artifacts" / "model.pt")


def train_subset_experts(args: argparse.Namespace, base: dict[str, Any], views: dict[int, Path], names: dict[int, str],
                         out: Path) -> dict[str, dict[str, Any]]:
    """The oracle: one expert per subset, trained on that subset's images only."""
    experts: dict[int, DynamicRoutingSegmenter] = {}
    for s, view in views.items():
        cfg = resolve(args.preset, args.config, [*args.overrides, f"name=oracle-{names[s]}", f"data.root={view}"],
                      base=base)
        experts[s] = expert(cfg, out, args)
    if args.reuse_experts:
        label = f"oracle (experts per subset trained earlier under {out})"
    else:
        start = f", each fine-tuned from {cfg.train.init_from}" if cfg.train.init_from else ""
        label = f"oracle ({args.preset} expert per subset{start})"
    return {label: evaluate_per_subset(experts, views, args.split)}


def train_route_experts(args: argparse.Namespace, base: dict[str, Any], root: Path, views: dict[int, Path],
                        names: dict[int, str], out: Path) -> dict[str, dict[str, Any]]:
    """One network per regime's route, and Network-Fix, trained on every image, scored per subset."""
    routes = regime_routes(root)
    if not routes:
        raise SystemExit(f"pipeline/oracle.py: error: {root}/study.json states no route for any regime "
                         "(make the study with `divdr make-data --study premise`)")
    experts = {f"route {list(route)} ({names[s]}'s part)": (f"expert-route-{names[s]}", [f"model.route={list(route)}"])
               for s, route in routes.items()}
    if not args.no_network_fix:
        experts["Network-Fix (every path, no gates)"] = ("expert-network-fix", [])
    rows = {}
    for label, (name, route) in experts.items():
        cfg = resolve("DR-Raw", args.config, [*args.overrides, *ROUTE_EXPERT_OVERRIDES, *route, f"name={name}",
                                              f"data.root={root}"], base=base)
        model = expert(cfg, out, args)
        rows[label] = evaluate_per_subset(dict.fromkeys(views, model), views, args.split)
    return rows


def table_stem(args: argparse.Namespace) -> str:
    """``oracle`` for the call that trains the experts; a rescoring gets its own name, so it replaces nothing."""
    if args.reuse_experts:
        return f"rescored-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    return "oracle" if args.split == "val" else f"oracle-{args.split}"


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = build_parser().parse_args(argv)
    base = deep_merge(with_smoke(MAIN_JOB) if args.smoke else MAIN_JOB, {"tracking": {"experiment": "oracle"}})
    args.overrides = [*data_overrides(args), *args.overrides]
    try:
        probe = resolve(args.preset, args.config, args.overrides, base=base)
        out = persistent_out(args.out)
    except ConfigError as err:
        raise SystemExit(f"pipeline/oracle.py: error: {err}") from None
    if args.print_config:
        print(yaml.safe_dump(probe.to_dict(), sort_keys=False))
        return {}
    root = make_task(with_dataset(probe)).root  # a URI is fetched to this node's cache
    names = subset_names(root)
    views = {s: write_subset_view(root, out / "subset-views" / f"subset-{s}-{names[s]}", s) for s in sorted(names)}
    started = time.perf_counter()
    if not args.reuse_experts and not args.local:
        init_ray()
    if args.route_experts:
        rows = train_route_experts(args, base, root, views, names, out)
    else:
        rows = train_subset_experts(args, base, views, names, out)
    for path in args.compare:
        model = load_model(path)
        rows[str(path)] = evaluate_per_subset(dict.fromkeys(views, model), views, args.split)
    table = format_rows(rows, names, args.split)
    wall = time.perf_counter() - started
    print(f"\n{table}\n\nwall time: {wall / 60:.1f} min")
    stem = table_stem(args)
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"wall_seconds": wall, "split": args.split, "subsets": names,
                                                  "rows": rows}, indent=2, default=float))
    uri = redact_uri(probe.tracking.uri) or tracking.local_tracking_uri(out)
    print(f"\nOutputs:\n  tables          {out / f'{stem}.md'}, {out / f'{stem}.json'}\n"
          f"  experts         run folders oracle-* under {out} (MLflow experiment 'oracle')\n"
          f"  MLflow UI       {tracking.ui_command(uri)}")
    return rows


if __name__ == "__main__":
    main()
