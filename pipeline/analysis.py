"""End-of-run analysis: the metrics of a run and its artifacts (Parquet, plots, image grid, model).

Runs on rank 0 after the final inference passes; artifacts are returned as bytes so the tracker
actor (on the driver's node) can write them wherever the run's MLflow store lives.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from matplotlib.lines import Line2D
from PIL import Image, ImageDraw, ImageFont

from divdr import clustering
from divdr.config import ModelConfig
from divdr.data.cityscapes import DatasetError, read_rgb
from divdr.data.manifest import subset_names
from divdr.evaluation import REFERENCE_SIZE, InferenceResult
from pipeline.config import ExperimentConfig
from pipeline.route_diagram import route_from_activations, routes_figure

if TYPE_CHECKING:  # the loop imports the tasks
    from pipeline.loop import CentreState

NEAREST_PER_CENTRE = 5  # DivDR Fig. 5: top-5 images nearest each centre
THUMBNAIL_HEIGHT = 96
GRID_LABEL_WIDTH = 190  # pixels left of each row of the nearest-image grid, for its caption
GRID_FONT_SIZE = 13
SUBSET_MARKERS = "osd^v<>P*"


def cluster_metrics(acts: np.ndarray, assignments: np.ndarray, centres: np.ndarray, k: int,
                    subsets: np.ndarray) -> dict[str, Any]:
    known = subsets >= 0
    return {
        "inter": clustering.inter_distance(centres),
        "intra": clustering.intra_distance(acts, assignments),
        "cluster_sizes": clustering.cluster_sizes(assignments, k).tolist(),
        "recovery": (clustering.recovery_accuracy(assignments[known], subsets[known])
                     if known.any() else math.nan),
    }


def subset_diagnostics(train_acts: np.ndarray, train_subsets: np.ndarray, val_acts: np.ndarray,
                       val_subsets: np.ndarray, val_gflops: np.ndarray) -> dict[str, Any]:
    """Known subsets only (rows with subset < 0 are dropped): is each subset in A(x) (nearest-mean probe),
    does it dominate A(x) (variance share), and what does each subset cost (mean of ``val_gflops``)?"""
    known_train, known_val = train_subsets >= 0, val_subsets >= 0
    a_val, s_val = val_acts[known_val], val_subsets[known_val]
    return {
        "subset_probe": clustering.subset_probe(train_acts[known_train], train_subsets[known_train], a_val, s_val),
        "subset_variance_share": clustering.subset_variance_share(a_val, s_val),
        "gflops_by_subset": [float(val_gflops[known_val][s_val == s].mean()) for s in np.unique(s_val)],
    }


def routing_curve(val: InferenceResult, centres: np.ndarray | None) -> dict[str, float]:
    """During training (``train.eval_every``), the controlled study's learning curves: the share of A(x)'s
    variance between the known subsets, the nearest-mean probe (two-fold on val: the final one fits its
    means on the training images, which a periodic evaluation does not run), the recovery of the subsets by
    the current centres (when there are some), each subset's mean real GFLOPs and (segmentation) mIoU.
    Empty when the subsets are unknown."""
    known = val.subsets >= 0
    subsets = val.subsets[known]
    if np.unique(subsets).size < 2:
        return {}
    acts = val.activations[known]
    metrics = {"val/subset_variance_share": clustering.subset_variance_share(acts, subsets)}
    even = np.arange(subsets.size) % 2 == 0
    if all(np.unique(subsets[fold]).size >= 2 for fold in (even, ~even)):
        folds = [clustering.subset_probe(acts[f], subsets[f], acts[~f], subsets[~f]) for f in (even, ~even)]
        metrics["val/subset_probe"] = float(np.mean(folds))
    if centres is not None:
        metrics["val/recovery"] = clustering.recovery_accuracy(clustering.assign(acts, centres), subsets)
    for s in np.unique(subsets):
        metrics[f"val/gflops_subset{int(s)}"] = float(val.real_gflops[known][subsets == s].mean())
    for s, scores in val.scores_by_subset().items():
        metrics[f"val/miou_subset{s}"] = scores.miou
    return metrics


def subset_metrics(train: InferenceResult, val: InferenceResult, reference_size: tuple[int, int]) -> dict[str, Any]:
    """Controlled study only: ``subset_diagnostics`` with GFLOPs at the reference size; empty when the
    subsets are unknown."""
    if np.unique(train.subsets[train.subsets >= 0]).size < 2 or not (val.subsets >= 0).any():
        return {}
    metrics = subset_diagnostics(train.activations, train.subsets, val.activations, val.subsets,
                                 val.real_gflops_reference)
    metrics[f"gflops_by_subset_{reference_size[0]}x{reference_size[1]}"] = metrics.pop("gflops_by_subset")
    if val.confusion_by_subset:  # segmentation: each subset's mIoU, in the order of the GFLOPs
        metrics["miou_by_subset"] = [scores.miou for scores in val.scores_by_subset().values()]
    return metrics


def summarize_run(cfg: ExperimentConfig, root: Path, train: InferenceResult, val: InferenceResult, centres: CentreState,
                  store_status: dict[str, Any], net: torch.nn.Module, progress: dict[str, int],
                  task_metrics: dict[str, Any] | None = None, task_artifacts: dict[str, bytes] | None = None,
                  reference_size: tuple[int, int] = REFERENCE_SIZE) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Metrics dict (flat floats plus lists) and artifacts {relative path: bytes}.

    Segmentation scores come from ``val.scores``; other tasks (detection: COCO AP) pass theirs in
    ``task_metrics`` / ``task_artifacts``, and the size their paper reports GFLOPs at."""
    k = cfg.clustering.k
    init = centres.centres.numpy() if centres.centres is not None else None
    final = clustering.kmeans(train.activations, k, init_centres=init, seed=cfg.train.seed,
                              balanced=cfg.clustering.balanced)
    val_assign = clustering.assign(val.activations, final.centres)
    scores = val.scores
    metrics: dict[str, Any] = {
        **progress,
        **({"miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy} if scores is not None else {}),
        **(task_metrics or {}),
        "gflops_real": float(val.real_gflops.mean()),
        f"gflops_real_{reference_size[0]}x{reference_size[1]}": float(val.real_gflops_reference.mean()),
        "gflops_real_std": float(val.real_gflops.std()),
        "distinct_routes_val": len({tuple(r) for r in (val.gates > 1e-4).reshape(len(val.gates), -1)}),
        "centre_version": centres.version,
        "centre_switch_steps": [h["switch_step"] for h in centres.history],
        "kmeans_updates": len(store_status.get("history", [])),
        # the updates eq. 2 used (clustering.stable_max_change pauses it on the others)
        "kmeans_updates_eq2": sum(1 for h in store_status.get("history", []) if h.get("eq2_on", 1)),
        "store_rejected_rows": store_status.get("rejected_rows", 0),
        "train_images_clustered": len(train.sample_ids),
        "val_images": len(val.sample_ids),
        **cluster_metrics(val.activations, val_assign, final.centres, k, val.subsets),
        **subset_metrics(train, val, reference_size),
        "train_cluster_sizes": final.sizes.tolist(),
        "sigma2": final.sigma2,
    }
    if store_status.get("history"):
        last = store_status["history"][-1]
        metrics.update({f"store_{key}": last[key] for key in ("inter", "intra", "sigma2", "changed")})
        metrics["store_cluster_sizes"] = last["cluster_sizes"]
    train_assign = np.asarray(final.assignments)
    artifacts = {
        "final_metrics.json": json.dumps(metrics, indent=2, default=float).encode(),
        **({"per_class_iou.json": json.dumps(scores.per_class, indent=2).encode()} if scores is not None else {}),
        **(task_artifacts or {}),
        "activations_train.parquet": activations_table(train, train_assign, "train"),
        "activations_val.parquet": activations_table(val, val_assign, "val"),
        "centres.npy": _npy_bytes(final.centres),
        "a_space.png": embedding_plot(val.activations, val_assign, val.subsets, final.centres, subset_names(root)),
        "nearest_images.png": nearest_grid(val, final.centres, root, val_assign),
        "routes.png": routes_plot(cfg.model, final.centres, val_assign, val.real_gflops,
                                  val.real_gflops_reference, reference_size),
        "kmeans_history.json": json.dumps(store_status.get("history", []), indent=2, default=float).encode(),
        "model.pt": _model_bytes(net),
    }
    return metrics, artifacts


def activations_table(result: InferenceResult, assignments: np.ndarray, split: str) -> bytes:
    """Columns ``image`` (path relative to the dataset root), ``split``, ``cluster``, ``subset``,
    ``real_gflops`` and ``a`` (the A(x) vector)."""
    dim = result.activations.shape[1]
    table = pa.table({
        "image": pa.array(result.files),
        "split": pa.array([split] * len(result.files)),
        "sample_id": pa.array(result.sample_ids),
        "cluster": pa.array(np.asarray(assignments, dtype=np.int64)),
        "subset": pa.array(result.subsets),
        "real_gflops": pa.array(result.real_gflops),
        "a": pa.FixedSizeListArray.from_arrays(pa.array(result.activations.reshape(-1).astype(np.float32)), dim),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    sink = io.BytesIO()
    np.save(sink, np.asarray(array))
    return sink.getvalue()


def pca_2d(x: np.ndarray, extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first two principal components of ``x``: ``x`` and ``extra`` (e.g. the centres) projected on
    them, and the share of ``x``'s variance each explains (zeros where there is none)."""
    mean = x.mean(0)
    centred = x - mean
    extra = np.zeros((0, x.shape[1])) if extra is None else np.asarray(extra) - mean
    if len(x) < 2 or not np.any(centred):
        return np.zeros((len(x), 2)), np.zeros((len(extra), 2)), np.zeros(2)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:2].T
    if basis.shape[1] < 2:
        basis = np.pad(basis, ((0, 0), (0, 2 - basis.shape[1])))
    explained = np.zeros(2)
    variances = singular**2
    explained[: min(2, variances.size)] = variances[:2] / variances.sum()
    return centred @ basis, extra @ basis, explained


def _count(n: int, noun: str = "images") -> str:
    """``3 images``, ``1 image``."""
    return f"{n} {noun if n != 1 else noun.removesuffix('s')}"


def _cluster_colours(k: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def a_space_legend(assignments: np.ndarray, k: int, subsets: np.ndarray,
                   names: dict[int, str] | None = None) -> list[Line2D]:
    """Colours: each cluster with its size; markers: each known subset by its name (the regime's)."""
    names = names or {}
    colours = _cluster_colours(k)
    sizes = np.bincount(assignments, minlength=k)
    handles = [Line2D([], [], ls="", marker="s", color=colours[c], label=f"cluster {c} ({_count(int(sizes[c]))})")
               for c in range(k)]
    handles.append(Line2D([], [], ls="", marker="x", color="black", label="centres"))
    known = [int(s) for s in np.unique(subsets) if s >= 0]
    if known:  # the markers: the controlled study's subsets
        handles += [Line2D([], [], ls="", marker=SUBSET_MARKERS[s % len(SUBSET_MARKERS)], color="0.4",
                           label=f"subset {names.get(s, s)}") for s in known]
        if (subsets < 0).any():
            handles.append(Line2D([], [], ls="", marker="o", color="0.4", label="subset unknown"))
    return handles


def embedding_plot(acts: np.ndarray, assignments: np.ndarray, subsets: np.ndarray, centres: np.ndarray,
                   names: dict[int, str] | None = None) -> bytes:
    """DivDR Fig. 4: A-space in 2-D (PCA of the images' A(x), centres projected on it), colour = cluster,
    marker = known subset, named from the dataset's subset manifest (``names``)."""
    points, centre_points, explained = pca_2d(acts, centres)
    colours = _cluster_colours(len(centres))
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for subset in np.unique(subsets):
        mask = subsets == subset
        marker = SUBSET_MARKERS[int(subset) % len(SUBSET_MARKERS)] if subset >= 0 else "o"
        ax.scatter(points[mask, 0], points[mask, 1], c=[colours[a] for a in assignments[mask]], s=18,
                   marker=marker, alpha=0.8, linewidths=0)
    ax.scatter(centre_points[:, 0], centre_points[:, 1], c="black", marker="x", s=80, zorder=3)
    for k, (x, y) in enumerate(centre_points):
        ax.annotate(str(k), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=9, weight="bold")
    ax.legend(handles=a_space_legend(assignments, len(centres), subsets, names), fontsize=7, loc="best",
              framealpha=0.8)
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}% of variance)")
    ax.set_title(f"A-space of {len(acts)} images (PCA); colour = cluster, marker = subset", fontsize=9)
    fig.tight_layout()
    sink = io.BytesIO()
    fig.savefig(sink, format="png")
    plt.close(fig)
    return sink.getvalue()


def cluster_captions(assignments: np.ndarray, gflops: np.ndarray, gflops_reference: np.ndarray, k: int,
                     reference_size: tuple[int, int] = REFERENCE_SIZE, what: str = "images") -> list[str]:
    """Per cluster: its size and its images' mean real GFLOPs (at their size and at ``reference_size``)."""
    captions = []
    for cluster in range(k):
        members = assignments == cluster
        if not members.any():
            captions.append(f"cluster {cluster}: no {what}")
            continue
        captions.append(f"cluster {cluster}: {_count(int(members.sum()), what)}\n"
                        f"mean {gflops[members].mean():.3f} GFLOPs ({gflops_reference[members].mean():.2f} "
                        f"at {reference_size[0]}x{reference_size[1]})")
    return captions


def routes_plot(config: ModelConfig, centres: np.ndarray, assignments: np.ndarray, gflops: np.ndarray,
                gflops_reference: np.ndarray, reference_size: tuple[int, int] = REFERENCE_SIZE,
                what: str = "val images") -> bytes:
    """The K prototypical architectures: each centre of A(x) drawn back as its route, one panel per
    cluster, captioned with the size and mean GFLOPs of the images assigned to it."""
    captions = cluster_captions(assignments, gflops, gflops_reference, len(centres), reference_size, what)
    routes = [(route_from_activations(config, centre), caption) for centre, caption in zip(centres, captions,
                                                                                           strict=True)]
    return routes_figure(config, routes, "Prototypical routes: the cluster centres of A(x)")


def nearest_grid(result: InferenceResult, centres: np.ndarray, root: Path, assignments: np.ndarray) -> bytes:
    """DivDR Fig. 5: per cluster (row), its images nearest to its centre, captioned with the cluster, its
    size and its mean GFLOPs; an empty cluster is an empty row (not filled with other clusters' images)."""
    assignments = np.asarray(assignments)
    font = ImageFont.load_default(size=GRID_FONT_SIZE)
    rows = []
    for k, centre in enumerate(centres):
        members = np.flatnonzero(assignments == k)
        distance = np.linalg.norm(result.activations[members] - centre, axis=1)
        nearest = members[np.argsort(distance)[:NEAREST_PER_CENTRE]]
        caption = (f"cluster {k}\n{_count(members.size)}\nmean {result.real_gflops[members].mean():.3f} GFLOPs"
                   if members.size else f"cluster {k}\nno image")
        rows.append((caption, [_thumbnail(root / result.files[i]) for i in nearest]))
    width = GRID_LABEL_WIDTH + max([sum(t.width for t in thumbs) for _, thumbs in rows] + [THUMBNAIL_HEIGHT])
    canvas = Image.new("RGB", (width, THUMBNAIL_HEIGHT * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (caption, thumbs) in enumerate(rows):
        top = r * THUMBNAIL_HEIGHT
        draw.multiline_text((8, top + 10), caption, fill="black", font=font, spacing=4)
        x = GRID_LABEL_WIDTH
        for thumb in thumbs:
            canvas.paste(thumb, (x, top))
            x += thumb.width
        if r:  # a rule between rows, so an empty row reads as one
            draw.line([(0, top), (width, top)], fill=(180, 180, 180), width=1)
    sink = io.BytesIO()
    canvas.save(sink, format="PNG")
    return sink.getvalue()


def _thumbnail(path: Path) -> Image.Image:
    try:
        image = read_rgb(path)  # 16-bit images scaled, not clipped to white
    except DatasetError:  # unreadable: a grey tile, the montage is only a picture
        return Image.new("RGB", (THUMBNAIL_HEIGHT, THUMBNAIL_HEIGHT), "gray")
    scale = THUMBNAIL_HEIGHT / image.height
    return image.resize((max(1, round(image.width * scale)), THUMBNAIL_HEIGHT))


def _model_bytes(net: torch.nn.Module) -> bytes:
    sink = io.BytesIO()
    # a detector also needs its heads' config and category count to be rebuilt
    extra = {name: getattr(net, name) for name in ("detection", "num_categories", "masks") if hasattr(net, name)}
    state = {name: value.detach().cpu() for name, value in net.state_dict().items()}  # loads without a GPU
    torch.save({"config": net.config, **extra, "state_dict": state}, sink)
    return sink.getvalue()
