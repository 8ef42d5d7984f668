"""Do a run's routes carry the known subsets? ``python pipeline/probe.py RUN_DIR [RUN_DIR ...]``

Reads what every finished run writes (``<run>/artifacts/activations_{train,val}.parquet``: A(x), the
final cluster, the known subset and the real GFLOPs of each image) and prints, per run, a Markdown row:

- recovery: the run's own clusters against the subsets (val; best one-to-one matching);
- probe: nearest-subset-mean accuracy on val with train means (``divdr.clustering.subset_probe``),
  the supervised ceiling: if it is low, the subsets are not in A(x); if it is high and recovery is
  low, they are in A(x) but K-means finds something else;
- share: between-subset share of the variance of A(x) on val (``subset_variance_share``): K-means
  finds the subsets only when they dominate;
- GFLOPs per subset (at the image size, mean over val): whether the subsets get different compute;
- mIoU, overall and by subset, from the run's ``result.json`` (runs trained before ``miou_by_subset``
  existed show the overall mIoU only);
- with ``--data ROOT`` (the run's dataset): what the clusters follow besides the subsets, as the share
  of the variance of image brightness between the run's clusters (eta^2) against between the subsets;
- with ``--curves PNG``: the learning curves the runs logged at each ``train.eval_every`` (share, probe,
  recovery by the current centres, mIoU and GFLOPs by subset), plotted one line per run, and printed;
- with ``--by-gate N``: where the share comes from, per value of A(x) (cell and path): the N values that
  hold the most variance within the subsets and the N that separate them most, with each subset's mean
  and spread (a gate that opens for some images of a subset and not for others shows as a large spread).

A run trained before these were computed at its end gets them here from its artifacts. Runs of a
sweep (``<name>-seed<N>``) are also summarised per setting: mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow.parquet as pq

from divdr import clustering
from divdr.config import ConfigError
from divdr.data.cityscapes import DatasetError, read_rgb
from divdr.routing import a_space_labels
from pipeline.analysis import subset_diagnostics
from pipeline.config import from_dict
from pipeline.run_folder import CONFIG_FILE, saved_config
from pipeline.tracking import PROGRESS_FILE

ARTIFACTS = "artifacts"
SEED_SUFFIX = re.compile(r"-seed\d+$")  # pipeline/tune.py names trials <space>[<setting>]-seed<N>
SUMMARY_KEYS = ("miou", "recovery", "probe", "share")


def read_activations(run_dir: Path, split: str) -> dict[str, np.ndarray]:
    path = Path(run_dir) / ARTIFACTS / f"activations_{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished run folder?")
    table = pq.read_table(path, columns=["image", "a", "cluster", "subset", "real_gflops"])
    a = table.column("a").combine_chunks()
    return {"a": a.values.to_numpy().reshape(len(a), -1), "cluster": table.column("cluster").to_numpy(),
            "subset": table.column("subset").to_numpy(), "gflops": table.column("real_gflops").to_numpy(),
            "image": np.array(table.column("image").to_pylist())}


def brightness(root: Path, images: np.ndarray) -> np.ndarray:
    """Mean grey level (0-255) of each image (paths relative to ``root``)."""
    return np.array([np.asarray(read_rgb(root / image).convert("L"), dtype=np.float64).mean()
                     for image in images])


def eta_squared(values: np.ndarray, groups: np.ndarray) -> float:
    """Correlation ratio: the share of the variance of ``values`` that lies between ``groups``."""
    return clustering.subset_variance_share(values.reshape(-1, 1), groups)


def probe_run(run_dir: Path, data: Path | None = None) -> dict[str, object]:
    train, val = read_activations(run_dir, "train"), read_activations(run_dir, "val")
    known = val["subset"] >= 0
    if not known.any():
        raise ValueError(f"{run_dir}: its val images have no known subsets (no subset manifest)")
    found = subset_diagnostics(train["a"], train["subset"], val["a"], val["subset"], val["gflops"])
    return {
        "recovery": clustering.recovery_accuracy(val["cluster"][known], val["subset"][known]),
        "probe": found["subset_probe"],
        "share": found["subset_variance_share"],
        "gflops_by_subset": found["gflops_by_subset"],
        "val_cluster_sizes": clustering.cluster_sizes(val["cluster"], int(train["cluster"].max()) + 1).tolist(),
        **(brightness_follow(data, val) if data is not None else {}),
        **scores(run_dir),
    }


def scores(run_dir: Path) -> dict[str, object]:
    """The run's mIoU and each subset's, from its ``result.json`` (NaN / [] where it has none)."""
    path = Path(run_dir) / "result.json"
    try:
        result = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): a run folder's result.json, rewritten?") from None
    return {"miou": float(result.get("miou", np.nan)), "miou_by_subset": list(result.get("miou_by_subset", []))}


def brightness_follow(data: Path, val: dict[str, np.ndarray]) -> dict[str, float]:
    grey = brightness(data, val["image"])
    known = val["subset"] >= 0
    return {"brightness_eta2_clusters": eta_squared(grey, val["cluster"]),
            "brightness_eta2_subsets": eta_squared(grey[known], val["subset"][known])}


def value_names(run_dir: Path, a_dim: int) -> list[str]:
    """Each A(x) value's cell and path from the run's config.yaml (``A[i]`` where there is none)."""
    if (Path(run_dir) / CONFIG_FILE).is_file():
        try:
            names = a_space_labels(from_dict(saved_config(run_dir)).model)
        except ConfigError as error:
            raise ValueError(f"{Path(run_dir) / CONFIG_FILE}: {error}") from None
        if len(names) == a_dim:
            return names
    return [f"A[{i}]" for i in range(a_dim)]


def by_gate(run_dir: Path, count: int) -> str:
    """Markdown: the ``count`` A(x) values holding the most within-subset variance of val, then the ``count``
    separating the subsets most (not repeated), each with its part of the within / between variance, its own
    between-subset share, and each subset's mean +- std."""
    val = read_activations(run_dir, "val")
    known = val["subset"] >= 0
    acts, subsets = val["a"][known], val["subset"][known]
    between, within = clustering.subset_variance_by_dimension(acts, subsets)
    names = value_names(run_dir, acts.shape[1])
    by_within, by_between = np.argsort(-within)[:count], np.argsort(-between)[:count]
    shown = [*by_within, *(d for d in by_between if d not in by_within)]
    half = int(np.searchsorted(np.cumsum(np.sort(within)[::-1]) / max(within.sum(), 1e-12), 0.5)) + 1
    lines = [f"{Path(run_dir).name}: share {clustering.subset_variance_share(acts, subsets):.3f}; {half} of "
             f"{acts.shape[1]} values hold half of the within-subset variance",
             "| A(x) value | of the within variance | of the between variance | its own share | "
             + " | ".join(f"subset {s}: mean ± std" for s in np.unique(subsets)) + " |",
             "|---|---|---|---|" + "---|" * np.unique(subsets).size]
    for d in shown:
        total = between[d] + within[d]
        spread = " | ".join(f"{acts[subsets == s, d].mean():.2f} ± {acts[subsets == s, d].std():.2f}"
                            for s in np.unique(subsets))
        lines.append(f"| {names[d]} | {within[d] / max(within.sum(), 1e-12):.3f} | "
                     f"{between[d] / max(between.sum(), 1e-12):.3f} | {between[d] / total if total else 0.0:.2f} | "
                     f"{spread} |")
    return "\n".join(lines)


CURVES = {"val/subset_variance_share": "share", "val/subset_probe": "probe (2-fold on val)",
          "val/recovery": "recovery (current centres)"}


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The controlled study's learning curves a run logged (``val/...`` metrics of ``metrics.jsonl``)."""
    path = Path(run_dir) / PROGRESS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder?")
    curves: dict[str, list[tuple[int, float]]] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a run stopped while writing its last line
            raise ValueError(f"{path}, line {number}: not JSON") from None
        for key, value in record.get("metrics", {}).items():
            if key.startswith("val/") and (key in CURVES or "_subset" in key):
                curves.setdefault(key, []).append((int(record["step"]), float(value)))
    if not curves:
        raise ValueError(f"{path} holds no learning curves: train with --set train.eval_every=N on a study "
                         "with known subsets")
    return curves


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    """Share, probe, recovery, and mIoU / GFLOPs by subset against the step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*CURVES, "val/miou_subset", "val/gflops_subset"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (run, found) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        for ax, panel in zip(axes, panels, strict=True):
            keys = [panel] if panel in CURVES else sorted(k for k in found if k.startswith(panel))
            for style, key in zip(["-", "--", ":", "-."], keys[:4], strict=False):
                if key in found:
                    steps, values = zip(*found[key], strict=True)
                    label = run if key == keys[0] else None
                    ax.plot(steps, values, style, color=colour, label=label)
    for ax, panel in zip(axes, panels, strict=True):
        ax.set_title(CURVES.get(panel, panel.split("/")[1].replace("_subset", " by subset (- 0, -- 1, : 2)")),
                     fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def curves_markdown(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> str:
    """One table per curve of ``CURVES``: a row per evaluation step, a column per run."""
    tables = []
    for key, title in CURVES.items():
        steps = sorted({step for found in curves.values() for step, _ in found.get(key, [])})
        if not steps:
            continue
        values = {run: dict(found.get(key, [])) for run, found in curves.items()}
        rows = [f"{title}:", "| step | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
        rows += [f"| {step} | " + " | ".join(f"{values[run][step]:.3f}" if step in values[run] else ""
                                          for run in curves) + " |" for step in steps]
        tables.append("\n".join(rows))
    return "\n\n".join(tables)


def markdown(rows: dict[str, dict[str, object]]) -> str:
    eta = any("brightness_eta2_clusters" in r for r in rows.values())
    lines = ["| run | mIoU (per subset) | recovery | probe | share | GFLOPs per subset | val cluster sizes |"
             + (" brightness eta^2 clusters / subsets |" if eta else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if eta else "")]
    for name, r in rows.items():
        gflops = " / ".join(f"{g:.3f}" for g in r["gflops_by_subset"])  # type: ignore[union-attr]
        per_subset = " / ".join(f"{m:.3f}" for m in r.get("miou_by_subset", []))  # type: ignore[union-attr]
        miou = f"{r.get('miou', np.nan):.3f}" + (f" ({per_subset})" if per_subset else "")
        extra = (f" {r['brightness_eta2_clusters']:.3f} / {r['brightness_eta2_subsets']:.3f} |" if eta else "")
        lines.append(f"| {name} | {miou} | {r['recovery']:.3f} | {r['probe']:.3f} | {r['share']:.3f} | {gflops} "
                     f"| {r['val_cluster_sizes']} |" + extra)
    return "\n".join(lines)


def per_setting(rows: dict[str, dict[str, object]]) -> str:
    """Mean +- std over the seeds of each setting (runs named ``...-seed<N>``); "" if none is."""
    groups: dict[str, list[dict[str, object]]] = {}
    for name, row in rows.items():
        if SEED_SUFFIX.search(name):
            groups.setdefault(SEED_SUFFIX.sub("", name), []).append(row)
    if not groups:
        return ""
    lines = ["| setting | seeds | " + " | ".join(SUMMARY_KEYS) + " |", "|---|---|" + "---|" * len(SUMMARY_KEYS)]
    for setting, runs in groups.items():
        cells = [f"{np.mean([r[k] for r in runs]):.3f} ± {np.std([r[k] for r in runs]):.3f}" for k in SUMMARY_KEYS]
        lines.append(f"| {setting} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_labels(runs: list[Path]) -> list[str]:
    """A row label per run folder: its name, or ``<parent>/<name>`` for every run when two folders share a
    name (the same preset and seed under two ``--out`` folders), so that no row replaces another."""
    names = [run.name for run in runs]
    if len(set(names)) == len(set(runs)):
        return names
    labels = [f"{run.parent.name}/{run.name}" for run in runs]
    return labels if len(set(labels)) == len(set(runs)) else [str(run) for run in runs]


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="pipeline/probe.py", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (they hold artifacts/activations_*.parquet)")
    parser.add_argument("--data", type=Path, help="the runs' dataset root: adds brightness eta^2 (clusters, subsets)")
    parser.add_argument("--curves", type=Path, metavar="PNG",
                        help="plot the runs' learning curves (train.eval_every) into this file, and print them")
    parser.add_argument("--by-gate", type=int, default=0, metavar="N",
                        help="per run, the N A(x) values holding the most within-subset variance and the N "
                             "separating the subsets most")
    args = parser.parse_args(argv)
    try:
        labels = run_labels(args.runs)
        rows = {label: probe_run(run, args.data) for label, run in zip(labels, args.runs, strict=True)}
        gates = [by_gate(run, args.by_gate) for run in args.runs] if args.by_gate > 0 else []
        curves = {label: read_curves(run) for label, run in zip(labels, args.runs, strict=True)} if args.curves else {}
    except (FileNotFoundError, ValueError, DatasetError) as err:
        print(f"pipeline/probe.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(markdown(rows))
    summary = per_setting(rows)
    if summary:
        print("\n" + summary)
    for table in gates:
        print("\n" + table)
    if curves:
        plot_curves(curves, args.curves)
        print("\n" + curves_markdown(curves) + f"\n\nlearning curves plotted in {args.curves}")
    return rows


if __name__ == "__main__":
    main()
