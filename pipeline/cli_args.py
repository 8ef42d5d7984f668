"""The options every entry point shares (train, main job, sweeps, oracle), spelled and explained once.

``--data``, ``--out``, ``--config``, ``--set``, ``--smoke``, ``--tracking-uri`` and ``--print-config`` mean
the same thing wherever they appear; ``--out`` defaults to ``runs/`` everywhere, so every entry point
shares one MLflow store (``runs/mlflow.db``), each in an experiment named for what it holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from divdr.config import PRESETS, ConfigError
from pipeline.config import absolute_root

DEFAULT_OUT = Path("runs")


def description(doc: str | None) -> str:
    """A module docstring's first line as plain help text (no RST backticks)."""
    return (doc or "").strip().splitlines()[0].replace("``", "")


def parser_for(prog: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description(doc))


def preset_help(default: str, what: str = "") -> str:
    return f"{what}one of {', '.join(sorted(PRESETS))} (default {default})"


def add_common(parser: argparse.ArgumentParser, what: str = "the run") -> None:
    """The shared options; ``what`` names what ``--set`` / ``--config`` apply to."""
    parser.add_argument("--data", help="dataset root: Cityscapes layout, or COCO layout for task detection / "
                        "instance; a path present on every node that trains, or a URI (s3://, gs://, file://) "
                        "fetched once per node (default: the embedded study, generated on first use)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default runs/, shared by every entry point: one MLflow store)")
    parser.add_argument("--config", type=Path, help=f"YAML experiment file applied to {what} (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one value of {what}, e.g. --set clustering.k=4 (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny everything: the whole path in a minute or two")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite store under --out)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration and exit without training")


def add_local(parser: argparse.ArgumentParser, what: str = "train") -> None:
    parser.add_argument("--local", action="store_true",
                        help=f"{what} in this process, without Ray: the same loop, the centroid store's logic "
                             "in-process (one worker; scaling.* is ignored)")


RAY_JOB_COPY = "working_dir_files"  # runtime_resources/working_dir_files/_ray_pkg_<hash>: a job's working dir


def persistent_out(out: Path, cwd: Path | None = None) -> Path:
    """``--out`` as an absolute path; refused when relative inside a Ray job, whose working directory is
    Ray's temporary copy of the uploaded one (deleted with the session: the runs would be lost)."""
    cwd = cwd or Path.cwd()
    if not out.is_absolute() and RAY_JOB_COPY in cwd.parts:
        raise ConfigError(f"--out {out} is relative, and this job runs in Ray's temporary copy of its working "
                          f"directory ({cwd}), deleted with the Ray session: give --out an absolute path on "
                          "persistent storage, e.g. --out $HOME/divdr-runs (the same on every node)")
    return (cwd / out).resolve() if not out.is_absolute() else out


def data_overrides(args: argparse.Namespace) -> list[str]:
    """``--data`` and ``--tracking-uri`` as overrides, placed before the user's own ``--set``."""
    return [*([f"data.root={absolute_root(args.data)}"] if args.data else []),
            *([f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else [])]
