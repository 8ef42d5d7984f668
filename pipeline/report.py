"""Sweep reports like DivDR Tables 1-3 and Figs. 6-8: mean +- std over seeds per setting, and plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pipeline.columns import LABELS, REPORT_METRICS
from pipeline.tune_space import TuneSpace


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting: mean and std (over seeds) of every report metric."""
    settings: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        settings.setdefault(str(row.get("setting", "base")), []).append(row)
    table = []
    for setting, runs in settings.items():
        entry: dict[str, Any] = {"setting": setting, "seeds": len(runs)}
        entry.update({k: v for k, v in runs[0].items() if k.startswith("param:")})
        entry["cluster_sizes"] = " ".join(str(r.get("cluster_sizes", "")).replace(" ", "") for r in runs)
        for metric in REPORT_METRICS:
            values = np.array([float(r.get(metric, math.nan)) for r in runs], dtype=float)
            entry[f"{metric}_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            entry[f"{metric}_std"] = float(np.nanstd(values)) if np.isfinite(values).any() else math.nan
        table.append(entry)
    return table


def markdown(space: TuneSpace, table: list[dict[str, Any]]) -> str:
    key = f"{space.metric}_mean"
    ordered = sorted(table, key=lambda r: -r[key] if math.isfinite(r[key]) else math.inf)
    header = ("| setting | seeds | " + " | ".join(LABELS[m] for m in REPORT_METRICS)
              + " | val cluster sizes (per seed) |")
    lines = [f"## {space.name}: {space.description}".rstrip(": "), "", header,
             "|" + "---|" * (3 + len(REPORT_METRICS))]
    for row in ordered:
        cells = [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" for m in REPORT_METRICS]
        lines.append(f"| {row['setting']} | {row['seeds']} | " + " | ".join(cells)
                     + f" | {row.get('cluster_sizes', '')} |")
    return "\n".join(lines) + "\n"


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def integer_ticks(values: list[Any]) -> list[int] | None:
    """The ticks of an integer parameter (K, seeds, steps): its own values, so the axis never shows
    2.25 clusters; None for anything else."""
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return sorted(set(values))
    return None


def plot_against(table: list[dict[str, Any]], param: str, path: Path) -> None:
    """Each metric against one swept parameter (DivDR Figs. 6-7), error bars = std over seeds."""
    rows = [r for r in table if f"param:{param}" in r]
    xs = [r[f"param:{param}"] for r in rows]
    if not rows:
        return
    order = np.argsort(xs) if _numeric(xs) else np.arange(len(xs))
    fig, axes = plt.subplots(1, len(REPORT_METRICS), figsize=(3 * len(REPORT_METRICS), 2.8), dpi=100)
    for ax, metric in zip(axes, REPORT_METRICS, strict=True):
        x = [xs[i] if _numeric(xs) else str(xs[i]) for i in order]
        ax.errorbar(x, [rows[i][f"{metric}_mean"] for i in order], yerr=[rows[i][f"{metric}_std"] for i in order],
                    marker="o", capsize=3)
        ticks = integer_ticks(xs)
        if ticks is not None:
            ax.set_xticks(ticks)
        ax.set_xlabel(param)
        ax.set_title(LABELS[metric])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_miou_vs_gflops(table: list[dict[str, Any]], path: Path) -> None:
    """DivDR Fig. 8: accuracy against cost, one point per setting."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for row in table:
        ax.errorbar(row["gflops_real_mean"], row["miou_mean"], xerr=row["gflops_real_std"], yerr=row["miou_std"],
                    marker="o", capsize=3, label=row["setting"])
    ax.set_xlabel("real GFLOPs per image (evaluated size)")
    ax.set_ylabel("mIoU")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(space: TuneSpace, rows: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    table = aggregate(rows)
    text = markdown(space, table)
    (folder / "report.md").write_text(text)
    with (folder / "report.csv").open("w", newline="") as f:
        fields = sorted({k for row in table for k in row}, key=lambda k: (k != "setting", k))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    with (folder / "trials.csv").open("w", newline="") as f:
        fields = sorted({k for row in rows for k in row})
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plots = []
    for param in space.swept:
        path = folder / f"metrics_vs_{param.replace('.', '_')}.png"
        plot_against(table, param, path)
        plots.append(path)
    plot_miou_vs_gflops(table, folder / "miou_vs_gflops.png")
    plots.append(folder / "miou_vs_gflops.png")
    return {"markdown": text, "table": table, "plots": [str(p) for p in plots if p.exists()],
            "folder": str(folder)}
