"""The main job: DR-A and DivDR-A trained the same way on the embedded study, side by side over seeds.

``python pipeline/main_job.py [--out runs/main] [--seeds 3] [--config FILE] [--data DIR] [--set key=value ...]``

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

from divdr.config import PRESETS as PRESETS_ALL
from pipeline.columns import format_seed_table, format_table
from pipeline.config import resolve, with_smoke
from pipeline.train import init_ray, run, with_dataset

PRESETS = ("DR-A", "DivDR-A")
SEEDS = 3
MAIN_JOB: dict[str, Any] = {
    "model_size": "tiny",
    "train": {"steps": 900, "batch_size": 8, "crop": [128, 128], "log_every": 20, "checkpoint_every": 300},
    "clustering": {"k": 3, "update_every": 50},
    "scaling": {"workers": 2},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline/main_job.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/main"), help="output folder (default runs/main)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of every run (repeatable)")
    parser.add_argument("--config", type=Path, help="YAML experiment file of overrides (on MAIN_JOB's values)")
    parser.add_argument("--data", type=Path, help="dataset root (default: the embedded study)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per preset (default {SEEDS})")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=sorted(PRESETS_ALL),
                        help=f"presets to compare (default: {' '.join(PRESETS)})")
    parser.add_argument("--smoke", action="store_true", help="tiny everything, to check the path")
    return parser


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"pipeline/main_job.py: error: --seeds must be >= 1, got {args.seeds}")
    base = with_smoke(MAIN_JOB) if args.smoke else MAIN_JOB
    data = [f"data.root={args.data.resolve()}"] if args.data else []
    configs = [with_dataset(resolve(preset, args.config, [*data, *args.overrides, f"name=main-{preset}-seed{seed}",
                                                          f"train.seed={seed}"], base=base))
               for preset in args.presets for seed in range(args.seeds)]
    started = time.perf_counter()
    init_ray()
    runs: dict[str, list[dict[str, Any]]] = {}
    for cfg in configs:
        runs.setdefault(cfg.preset, []).append(run(cfg, args.out, existing="fresh"))
    wall = time.perf_counter() - started
    per_run = format_table({f"{preset} seed {i}": m for preset, ms in runs.items() for i, m in enumerate(ms)})
    summary = (f"{format_seed_table(runs)}\n\nper run:\n\n{per_run}\n\n"
               f"wall time, everything included: {wall / 60:.1f} min")
    print("\n" + summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "main_job.md").write_text(summary + "\n")
    (args.out / "main_job.json").write_text(json.dumps({"wall_seconds": wall, "runs": runs}, indent=2, default=str))
    return runs


if __name__ == "__main__":
    main()
