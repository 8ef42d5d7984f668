"""The metrics that run tables and sweep reports show: one list, titled and formatted once.

``pipeline/train.py`` prints a run's row with them, ``pipeline/main_job.py`` its per-preset mean +- std
over seeds, ``pipeline/tune.py``'s report (``pipeline.report``) a sweep's; a tune space's ``metric``
must be one of ``REPORT_METRICS``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Column = tuple[str, str, str]  # (title, metric key, format spec; "" = printed as it is)
SEGMENTATION_COLUMNS: tuple[Column, ...] = (
    ("mIoU", "miou", ".3f"), ("GFLOPs (eval size)", "gflops_real", ".3f"),
    ("GFLOPs @1024x2048", "gflops_real_1024x2048", ".1f"), ("Inter", "inter", ".3f"), ("Intra", "intra", ".3f"),
    ("recovery", "recovery", ".3f"), ("val cluster sizes", "cluster_sizes", ""))
# Detection / instance runs: COCO AP (fractions, as COCOeval), backbone GFLOPs at 800x800.
DETECTION_COLUMNS: tuple[Column, ...] = (
    ("bbox AP", "bbox/AP", ".3f"), ("AP50", "bbox/AP50", ".3f"), ("AP75", "bbox/AP75", ".3f"),
    ("segm AP", "segm/AP", ".3f"), ("GFLOPs (eval size)", "gflops_real", ".3f"),
    ("GFLOPs @800x800", "gflops_real_800x800", ".2f"), ("Inter", "inter", ".3f"), ("Intra", "intra", ".3f"),
    ("recovery", "recovery", ".3f"), ("val cluster sizes", "cluster_sizes", ""))
# What sweep reports aggregate over seeds (the numeric segmentation columns), and their titles.
REPORT_METRICS: tuple[str, ...] = tuple(key for _, key, spec in SEGMENTATION_COLUMNS if spec)
LABELS: dict[str, str] = {key: title for title, key, spec in SEGMENTATION_COLUMNS if spec}


def columns_for(rows: dict[str, dict[str, Any]]) -> tuple[Column, ...]:
    """Detection columns when the runs carry COCO AP, else segmentation's."""
    return DETECTION_COLUMNS if any("bbox/AP" in m for m in rows.values()) else SEGMENTATION_COLUMNS


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """One Markdown row per run."""
    columns = columns_for(rows)
    lines = ["| run | " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * (1 + len(columns))]
    for name, m in rows.items():
        cells = [format(m.get(key, float("nan")), spec) if spec else str(m.get(key)) for _, key, spec in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_seed_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """One Markdown row per group of runs (e.g. a preset over seeds): mean +- std of each numeric column."""
    columns = [c for c in columns_for({k: r for k, runs in groups.items() for r in runs[:1]}) if c[2]]
    lines = ["| run | seeds | " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "---|" * (2 + len(columns))]
    for name, runs in groups.items():
        cells = []
        for _, key, spec in columns:
            values = np.array([float(r.get(key, math.nan)) for r in runs], dtype=float)
            cells.append(f"{np.nanmean(values):{spec}} ± {np.nanstd(values):{spec}}" if np.isfinite(values).any()
                         else "nan")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
