"""The main job: DR-A and DivDR-A trained the same way on the embedded study, printed side by side.

``python pipeline/main_job.py [--out runs/main] [--set key=value ...] [--smoke]``

Both runs share one configuration (``MAIN_JOB``, chosen to fit 15 minutes on 2 CPU cores with
everything included) and differ only in the preset: DR-A (budget loss) against DivDR-A (budget loss +
clustering loss). The clusters of both are measured the same way (the store clusters for DR too).
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
from pipeline.config import resolve, with_smoke
from pipeline.train import format_table, init_ray, run, with_dataset

PRESETS = ("DR-A", "DivDR-A")
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
                        help="override a value of both runs (repeatable)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=sorted(PRESETS_ALL),
                        help=f"presets to compare (default: {' '.join(PRESETS)})")
    parser.add_argument("--smoke", action="store_true", help="tiny everything, to check the path")
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = build_parser().parse_args(argv)
    base = with_smoke(MAIN_JOB) if args.smoke else MAIN_JOB
    configs = [resolve(preset, None, [*args.overrides, f"name=main-{preset}"], base=base) for preset in args.presets]
    started = time.perf_counter()
    configs = [with_dataset(cfg) for cfg in configs]
    init_ray()
    rows = {cfg.preset: run(cfg, args.out, fresh=True) for cfg in configs}
    wall = time.perf_counter() - started
    table = format_table(rows)
    summary = f"{table}\n\nwall time, everything included: {wall / 60:.1f} min"
    print("\n" + summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "main_job.md").write_text(summary + "\n")
    (args.out / "main_job.json").write_text(json.dumps({"wall_seconds": wall, "runs": rows}, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
