"""The main job: DR-A and DivDR-A trained the same way on the embedded study, side by side over seeds.

``python pipeline/main_job.py [--out runs] [--seeds 3] [--config FILE] [--data DIR] [--set key=value ...] [--resume]
[--local]``

All runs share one configuration (``MAIN_JOB``, chosen so that one run takes ~4-5 minutes on 2 CPU
cores) and differ only in the preset: DR-A (budget loss) against DivDR-A (budget loss + clustering
loss), each with seeds 0 .. N-1, so the table shows the spread (mean +- std) and not one draw. The
clusters of both are measured the same way (the store clusters for DR too).
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

import yaml

from divdr.config import PRESETS as PRESETS_ALL
from divdr.config import ConfigError
from pipeline.cli_args import add_common, add_local, data_overrides, parser_for, persistent_out
from pipeline.columns import format_seed_table, format_table
from pipeline.config import resolve, with_smoke
from pipeline.run_folder import RunState, run_state
from pipeline.train import init_ray, print_outputs, run, with_dataset

PRESETS = ("DR-A", "DivDR-A")
SEEDS = 3
MAIN_JOB: dict[str, Any] = {
    "model_size": "tiny",
    "train": {"steps": 900, "batch_size": 8, "crop": [128, 128], "log_every": 20, "checkpoint_every": 300},
    "clustering": {"k": 3, "update_every": 50},
    "scaling": {"workers": 2},
    "tracking": {"experiment": "main job"},
}


def build_parser() -> argparse.ArgumentParser:
    parser = parser_for("pipeline/main_job.py", __doc__)
    add_common(parser, "every run (on the main job's values)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per preset (default {SEEDS})")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=sorted(PRESETS_ALL), metavar="PRESET",
                        help=f"presets to compare (default: {' '.join(PRESETS)}; "
                             f"any of {', '.join(sorted(PRESETS_ALL))})")
    add_local(parser, "train every run")
    parser.add_argument("--resume", action="store_true",
                        help="keep what an earlier main job under --out finished or started (default: train every "
                             "run again from scratch)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"pipeline/main_job.py: error: --seeds must be >= 1, got {args.seeds}")
    base = with_smoke(MAIN_JOB) if args.smoke else MAIN_JOB
    try:
        out = persistent_out(args.out)
        configs = [with_dataset(resolve(preset, args.config, [*data_overrides(args), *args.overrides,
                                                               f"name=main-{preset}-seed{seed}", f"train.seed={seed}"],
                                        base=base))
                   for preset in args.presets for seed in range(args.seeds)]
    except ConfigError as err:
        raise SystemExit(f"pipeline/main_job.py: error: {err}") from None
    if args.print_config:
        print(yaml.safe_dump(configs[0].to_dict(), sort_keys=False))
        return {}
    started = time.perf_counter()
    if not args.local:
        init_ray()
    runs: dict[str, list[dict[str, Any]]] = {}
    by_name: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        existing = "fresh" if not args.resume else "continue" if run_state(out / cfg.run_name) is RunState.NEW \
            else "resume"
        by_name[cfg.run_name] = run(cfg, out, existing=existing, local=args.local)
        runs.setdefault(cfg.preset, []).append(by_name[cfg.run_name])
    wall = time.perf_counter() - started
    per_run = format_table({f"{preset} seed {i}": m for preset, ms in runs.items() for i, m in enumerate(ms)})
    summary = (f"{format_seed_table(runs)}\n\nper run:\n\n{per_run}\n\n"
               f"wall time, everything included: {wall / 60:.1f} min")
    print("\n" + summary)
    (out / "main_job.md").write_text(summary + "\n")
    (out / "main_job.json").write_text(json.dumps({"wall_seconds": wall, "runs": runs}, indent=2, default=str))
    print_outputs(by_name, tables=[out / "main_job.md", out / "main_job.json"])
    return runs


if __name__ == "__main__":
    main()
