"""K-means over gate activations A(x) with FAISS, and DivDR's cluster diagnostics.

DivDR (sec. 3) alternates K-means over the gate activations of the whole training set with training
against the fixed centres. What this module guarantees beyond a bare ``faiss.Kmeans``:

- every point is used: FAISS subsamples to ``max_points_per_centroid * K`` points (256 K by default);
  the cap is lifted to N so the centres are the K-means solution of all activations;
- a warm start from the previous centres keeps cluster identities (centre k stays centre k);
- empty and near-duplicate centres are re-seeded. FAISS already splits empty clusters inside its
  iterations (a perturbed copy of a large centre, DeepCluster's remedy; counted in ``faiss_splits``),
  but a split in the last iteration leaves two near-identical centres, and the final assignment can
  still leave a centre empty. Those centres are moved onto the points farthest from their centres
  (as scikit-learn relocates empty clusters) and FAISS runs again, warm-started (``reseeded``);
- the objective and sigma^2 are recomputed in float64 on all points with the final centres.

Diagnostics (DivDR Tables 2/3): ``sigma2``, ``inter_distance``, ``intra_distance``, ``cluster_sizes``,
``assignment_change`` (``matched_change``: the same up to a relabelling of the clusters) and
``recovery_accuracy`` (best one-to-one matching of clusters to known subsets); ``subset_probe`` and
``subset_variance_share`` say whether known subsets are in A(x) at all and whether they dominate it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import pdist

InitMethod = Literal["random", "kmeans++"]

DEFAULT_NITER = 25  # faiss's default; FAISS stops earlier once the objective stops changing
DEFAULT_SEED = 1234  # faiss's default seed
# Centres closer than this fraction of the data's RMS spread (around its mean) are near-duplicates.
NEAR_DUPLICATE_FRACTION = 1e-2
# Re-seed, then run K-means again, at most this many times; what is left is reported, not hidden.
MAX_RESEED_ROUNDS = 3
# Balanced K-means (SwAV's Sinkhorn-Knopp equipartition): the entropic temperature as a fraction of
# the mean squared point-centre distance (small = close to the exact balanced transport), the
# Sinkhorn iterations per assignment, and the balanced Lloyd rounds after the plain K-means.
SINKHORN_EPS_FRACTION = 0.02
SINKHORN_ITERATIONS = 50
SINKHORN_FLOOR = 1e-300
BALANCED_ROUNDS = 10
# Blocked pairwise distances hold at most this many float64 values at once (32 MB).
BLOCK_ELEMENTS = 1 << 22
# FAISS on a GPU (faiss-gpu, the `gpu` extra): the scratch memory its resources may hold on the card.
# FAISS's default (18% of the card) would come out of training's memory; a flat L2 index over K centres
# needs little.
GPU_TEMP_MEMORY = 256 * 2**20
_INIT_METHODS = {
    "random": faiss.ClusteringInitMethod_RANDOM,
    "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
}


class ClusteringError(ValueError):
    """Bad input to the clustering: the message names the argument and the value at fault."""


@dataclass(frozen=True)
class KMeansResult:
    """The outcome of ``kmeans``; arrays are read-only."""

    centres: np.ndarray  # [K, D] float32
    assignments: np.ndarray  # [N] int64, index of the nearest centre
    sizes: np.ndarray  # [K] int64
    objective: float  # sum of squared distances to the nearest centre, all N points
    sigma2: float  # DivDR: objective / (N - 1); NaN when N == 1
    iterations: int  # Lloyd iterations run by FAISS, over all rounds
    reseeded: int  # centres moved onto far points by this module
    faiss_splits: int  # empty clusters FAISS split inside its iterations
    empty_clusters: int  # still empty at the end (e.g. fewer distinct points than K)
    objective_history: tuple[float, ...]  # FAISS's per-iteration objective, last round
    warm_started: bool
    balanced: bool = False  # assignments from balanced_assign (equal sizes), not the nearest centre


# ---------------------------------------------------------------- input checks


def as_activations(x: object, name: str = "activations") -> np.ndarray:
    """[N, D] numeric array (float16/32/64, numpy or torch) -> C-contiguous float32; rejects NaN/Inf."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ClusteringError(f"{name} must be a non-empty [N, D] array, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ClusteringError(f"{name} must be numeric (float16/32/64 or integer), got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ClusteringError(f"{name} has NaN or Inf (after conversion to float32) in {rows.size} row(s), "
                              f"first at row {int(rows[0])}")
    return x


def _as_labels(labels: object, name: str, n: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ClusteringError(f"{name} must be one-dimensional, got shape {labels.shape}")
    if n is not None and labels.shape[0] != n:
        raise ClusteringError(f"{name} has {labels.shape[0]} entries, expected {n}")
    return labels


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClusteringError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ClusteringError(f"k = {k} clusters is more than the {n} points to cluster")


# ---------------------------------------------------------------- the index: CPU or GPU


def faiss_gpus() -> int:
    """GPUs this FAISS can use: 0 with faiss-cpu (no GPU code), or where no GPU is visible."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


_gpu_resources = None  # one set per process, made on first use


def flat_l2_index(dim: int, gpu: bool = False) -> faiss.Index:
    """An exact L2 index: on the GPU where ``gpu`` is asked and FAISS has one (faiss-gpu and a visible
    device), otherwise on the CPU. A GPU's results can differ from the CPU's in the last bits."""
    global _gpu_resources
    if gpu and faiss_gpus() > 0:
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
            _gpu_resources.setTempMemory(GPU_TEMP_MEMORY)
        return faiss.GpuIndexFlatL2(_gpu_resources, dim)
    return faiss.IndexFlatL2(dim)


# ---------------------------------------------------------------- assignment and distances


def assign(activations: object, centres: object, gpu: bool = False) -> np.ndarray:
    """Index of the nearest centre (L2) for each activation, int64 [N]; ``gpu``: see ``flat_l2_index``."""
    x = as_activations(activations)
    c = as_activations(centres, "centres")
    if c.shape[1] != x.shape[1]:
        raise ClusteringError(f"centres have dimension {c.shape[1]}, activations {x.shape[1]}")
    index = flat_l2_index(c.shape[1], gpu)
    index.add(c)
    _, nearest = index.search(x, 1)
    return nearest[:, 0].astype(np.int64)


def _own_sq_distances(x: np.ndarray, centres: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """||x_i - c_{a_i}||^2 in float64, in row blocks so N x D float64 is never held at once."""
    out = np.empty(x.shape[0], np.float64)
    step = max(1, BLOCK_ELEMENTS // x.shape[1])
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        diff = x[rows].astype(np.float64) - centres[assignments[rows]].astype(np.float64)
        out[rows] = np.einsum("ij,ij->i", diff, diff)
    return out


def sigma2(activations: object, centres: object, assignments: object | None = None) -> float:
    """DivDR: sigma^2 = 1/(N-1) sum_i ||A(x_i) - mu(x_i)||^2, mu(x) the nearest centre (or the given one).

    NaN when N == 1 (the estimate is undefined).
    """
    x = as_activations(activations)
    c = as_activations(centres, "centres")
    a = assign(x, c) if assignments is None else _as_labels(assignments, "assignments", x.shape[0])
    if x.shape[0] < 2:
        return float("nan")
    return float(_own_sq_distances(x, c, a.astype(np.int64)).sum() / (x.shape[0] - 1))


def inter_distance(centres: object) -> float:
    """DivDR Inter: mean L2 distance over all pairs of centres (NaN with fewer than 2 centres)."""
    c = as_activations(centres, "centres").astype(np.float64)
    return float(pdist(c).mean()) if c.shape[0] >= 2 else float("nan")


def mean_pairwise_distance(points: np.ndarray) -> float:
    """Mean L2 distance over all pairs i < j, computed in row blocks: O(block x N) memory, not O(N^2)."""
    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        return float("nan")
    norms = np.einsum("ij,ij->i", x, x)
    step = max(1, BLOCK_ELEMENTS // n)
    total = 0.0
    for start in range(0, n, step):
        stop = min(n, start + step)
        # rows [start, stop) against columns [start, n): only pairs with column > row are kept
        sq = norms[start:stop, None] + norms[None, start:] - 2.0 * (x[start:stop] @ x[start:].T)
        dist = np.sqrt(np.maximum(sq, 0.0))  # rounding can make tiny squared distances negative
        upper = np.arange(start, n)[None, :] > np.arange(start, stop)[:, None]
        total += float(dist[upper].sum())
    return total / (n * (n - 1) / 2)


def intra_distance(activations: object, assignments: object, max_points_per_cluster: int | None = None,
                   seed: int = 0) -> float:
    """DivDR Intra: mean L2 distance over all pairs of activations inside a cluster, averaged over clusters.

    Clusters with fewer than 2 members have no pairs and are skipped (NaN if no cluster has 2).
    Each cluster weighs the same in the average, whatever its size, as "averaged over clusters" reads.

    Exact by default, which costs O(n^2 D) per cluster of n points (about 90 s for 118,000 points on
    one core). With ``max_points_per_cluster`` a larger cluster is estimated from that many of its
    points drawn without replacement (an unbiased estimate of its mean pairwise distance: every
    pair is equally likely to be drawn); smaller clusters are still exact.
    """
    x = as_activations(activations)
    a = _as_labels(assignments, "assignments", x.shape[0])
    if max_points_per_cluster is not None and max_points_per_cluster < 2:
        raise ClusteringError(f"max_points_per_cluster must be >= 2, got {max_points_per_cluster}")
    rng = np.random.default_rng(seed)
    means = []
    for label in np.unique(a):
        members = np.flatnonzero(a == label)
        if members.size < 2:
            continue
        if max_points_per_cluster is not None and members.size > max_points_per_cluster:
            members = np.sort(rng.choice(members, max_points_per_cluster, replace=False))
        means.append(mean_pairwise_distance(x[members]))
    return float(np.mean(means)) if means else float("nan")


def cluster_sizes(assignments: object, k: int) -> np.ndarray:
    """Members per cluster, int64 [k]."""
    a = _as_labels(assignments, "assignments").astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= k):
        raise ClusteringError(f"assignments must lie in 0-{k - 1}, got {a.min()}..{a.max()}")
    return np.bincount(a, minlength=k).astype(np.int64)


def assignment_change(previous: object, current: object) -> float:
    """Fraction of points whose cluster changed between two assignment vectors of the same points."""
    before = _as_labels(previous, "previous assignments")
    after = _as_labels(current, "current assignments", before.shape[0])
    if before.size == 0:
        raise ClusteringError("assignment_change needs at least one point")
    return float(np.count_nonzero(before != after) / before.size)


def matched_change(previous: object, current: object) -> float:
    """Fraction of points whose cluster changed between two partitions of the same points, after the
    best one-to-one relabelling of the clusters: 0 when they are the same partition under other names
    (a fresh K-means start numbers its clusters anew, which ``assignment_change`` counts as change)."""
    before = _as_labels(previous, "previous assignments")
    after = _as_labels(current, "current assignments", before.shape[0])
    if before.size == 0:
        raise ClusteringError("matched_change needs at least one point")
    # counted, not 1 - recovery_accuracy: 12 of 240 must be exactly 0.05 for a threshold of 0.05
    return float((before.size - _matched_points(after, before)) / before.size)


def recovery_accuracy(assignments: object, subset_labels: object) -> float:
    """Best one-to-one matching of clusters to known subsets (Hungarian on the contingency table) / N.

    Works when the number of clusters differs from the number of subsets: the unmatched ones count as wrong.
    """
    clusters = _as_labels(assignments, "assignments")
    subsets = _as_labels(subset_labels, "subset_labels", clusters.shape[0])
    if clusters.size == 0:
        raise ClusteringError("recovery_accuracy needs at least one point")
    return float(_matched_points(clusters, subsets) / clusters.size)


def _matched_points(clusters: np.ndarray, subsets: np.ndarray) -> int:
    """Points on the diagonal of the best one-to-one matching of clusters to subsets (Hungarian)."""
    _, cluster_idx = np.unique(clusters, return_inverse=True)
    _, subset_idx = np.unique(subsets, return_inverse=True)
    table = np.zeros((cluster_idx.max() + 1, subset_idx.max() + 1), np.int64)
    np.add.at(table, (cluster_idx, subset_idx), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return int(table[rows, cols].sum())


# Two questions recovery alone cannot tell apart: are the subsets in A(x) at all (the probe), and are
# they its dominant structure (the variance share)? K-means finds only what dominates the variance.
PROBE_SCALE_FLOOR = 1e-6  # per-dimension scale floor: constant dimensions (closed gates) weigh nothing


def subset_probe(train_activations: object, train_subsets: object, val_activations: object,
                 val_subsets: object) -> float:
    """Supervised ceiling for recovery: the share of val points nearest (after scaling every dimension
    by its train std) to the train mean of their own subset. Uses the subset labels, so it is a
    diagnostic of the controlled study only, never a training signal."""
    x_train, x_val = as_activations(train_activations), as_activations(val_activations, "val_activations")
    y_train = _as_labels(train_subsets, "train_subsets", x_train.shape[0])
    y_val = _as_labels(val_subsets, "val_subsets", x_val.shape[0])
    if x_val.shape[1] != x_train.shape[1]:
        raise ClusteringError(f"val activations have dimension {x_val.shape[1]}, train {x_train.shape[1]}")
    names = np.unique(y_train)
    if y_val.size == 0 or names.size < 2:
        raise ClusteringError(f"subset_probe needs val points and >= 2 train subsets, got {names.size}")
    scale = np.maximum(x_train.std(axis=0), PROBE_SCALE_FLOOR)
    means = np.stack([x_train[y_train == name].mean(axis=0) for name in names]) / scale
    nearest = names[assign(x_val / scale, means.astype(np.float32))]
    return float((nearest == y_val).mean())


def subset_variance_by_dimension(activations: object, subsets: object) -> tuple[np.ndarray, np.ndarray]:
    """Per dimension of A(x), the sums of squares between the subsets and within them ([D] each; they add
    up to each dimension's total): which gates separate the subsets, and which vary inside them."""
    x = as_activations(activations).astype(np.float64)
    y = _as_labels(subsets, "subsets", x.shape[0])
    total = ((x - x.mean(axis=0)) ** 2).sum(axis=0)
    within = sum(((x[y == name] - x[y == name].mean(axis=0)) ** 2).sum(axis=0) for name in np.unique(y))
    return total - within, within


def subset_variance_share(activations: object, subsets: object) -> float:
    """Between-subset variance of A(x) over its total variance (summed over dimensions): 1 when every
    subset is a single point, ~0 when the subsets' means coincide."""
    between, within = subset_variance_by_dimension(activations, subsets)
    total = between.sum() + within.sum()
    if total == 0:
        return 0.0
    return float(1.0 - within.sum() / total)


# ---------------------------------------------------------------- K-means


def degenerate_centres(centres: np.ndarray, sizes: np.ndarray, tolerance: float) -> list[int]:
    """Empty centres, and every centre within ``tolerance`` of an earlier kept centre."""
    bad: list[int] = []
    for j in range(centres.shape[0]):
        kept = [i for i in range(j) if i not in bad]
        too_close = bool(kept) and float(np.linalg.norm(centres[kept] - centres[j], axis=1).min()) < tolerance
        if sizes[j] == 0 or too_close:
            bad.append(j)
    return bad


def reseed_centres(activations: object, centres: object, tolerance: float = 0.0) -> tuple[np.ndarray, list[int]]:
    """Move empty and near-duplicate centres onto the points farthest from their own centres.

    Returns the new centres and the indices moved. Only points farther than ``tolerance`` from their
    centre are used as seeds (a point sitting on a centre would make a duplicate), so fewer centres
    than were degenerate may move when the data has fewer distinct points than K.
    """
    x = as_activations(activations)
    new = as_activations(centres, "centres").copy()
    a = assign(x, new)
    bad = degenerate_centres(new, np.bincount(a, minlength=new.shape[0]), tolerance)
    if not bad:
        return new, []
    sq = _own_sq_distances(x, new, a)
    farthest = np.argsort(-sq, kind="stable")[: len(bad)]
    seeds = [int(i) for i in farthest if sq[i] > tolerance**2]
    moved = bad[: len(seeds)]
    new[moved] = x[seeds]
    return new, moved


def _rms_spread(x: np.ndarray) -> float:
    """Root mean squared distance of the points to their mean, in row blocks."""
    mean = x.mean(axis=0, dtype=np.float64)
    step = max(1, BLOCK_ELEMENTS // x.shape[1])
    total = sum(float(((x[i : i + step] - mean) ** 2).sum()) for i in range(0, x.shape[0], step))
    return float(np.sqrt(total / x.shape[0]))


def _faiss_round(x: np.ndarray, init: np.ndarray | None, k: int, niter: int, seed: int,
                 init_method: InitMethod, gpu: bool = False) -> tuple[np.ndarray, list]:
    params = faiss.ClusteringParameters()
    params.niter = niter
    params.seed = seed
    params.init_method = _INIT_METHODS[init_method]
    params.max_points_per_centroid = x.shape[0]  # no subsampling: k * N >= N points are allowed
    params.min_points_per_centroid = 1  # silences FAISS's "please provide more points" warning
    params.verbose = False
    clus = faiss.Clustering(x.shape[1], k, params)
    if init is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(init, np.float32).ravel(), clus.centroids)
    clus.train(x, flat_l2_index(x.shape[1], gpu))
    stats = [clus.iteration_stats.at(i) for i in range(clus.iteration_stats.size())]
    centres = faiss.vector_float_to_array(clus.centroids).reshape(k, x.shape[1])
    return centres, stats


def _sq_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[N, K] squared distances (float32 products, float64 result; K is small, N x K fits)."""
    cross = (x @ centres.T).astype(np.float64)
    x_sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    c_sq = np.einsum("ij,ij->i", centres, centres, dtype=np.float64)
    return np.maximum(x_sq[:, None] - 2 * cross + c_sq[None, :], 0.0)


def balanced_assign(activations: object, centres: object, iterations: int = SINKHORN_ITERATIONS) -> np.ndarray:
    """Assignments of N points to K centres with (near-)equal cluster sizes: SwAV's Sinkhorn-Knopp
    equipartition of exp(-d^2 / eps), then each point's most probable centre.

    Against collapse (one centre taking nearly everything, DeepCluster/SwAV's degenerate solution),
    it assumes the hidden subsets are of similar size, the assumption DivDR states in its
    limitations; plain nearest-centre assignment is ``assign``.
    """
    x = as_activations(activations)
    c = as_activations(centres, "centres")
    if c.shape[1] != x.shape[1]:
        raise ClusteringError(f"centres have dimension {c.shape[1]}, activations {x.shape[1]}")
    if iterations < 1:
        raise ClusteringError(f"iterations must be >= 1, got {iterations}")
    sq = _sq_distances(x, c)
    eps = SINKHORN_EPS_FRACTION * max(float(sq.mean()), np.finfo(np.float64).tiny)
    # Scaling form (matrix-vector products only); each row is shifted by its minimum so that every
    # point keeps at least its nearest centre, and the floor keeps far entries from underflowing to 0.
    q = np.maximum(np.exp(-(sq - sq.min(axis=1, keepdims=True)) / eps), SINKHORN_FLOOR)
    n, k = q.shape
    row = np.ones(n)
    for _ in range(iterations):
        col = (n / k) / (q.T @ row)  # every centre receives N / K points
        row = 1.0 / (q @ col)  # every point sends one unit
    return (q * col[None, :]).argmax(axis=1).astype(np.int64)


def _balanced_lloyd(x: np.ndarray, centres: np.ndarray, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations whose assignment step is ``balanced_assign``; stops when assignments settle."""
    assignments = balanced_assign(x, centres)
    for _ in range(rounds):
        one_hot = np.zeros((x.shape[0], centres.shape[0]), np.float32)
        one_hot[np.arange(x.shape[0]), assignments] = 1.0
        sums = (one_hot.T @ x).astype(np.float64)
        counts = np.bincount(assignments, minlength=centres.shape[0])
        filled = counts > 0
        centres = centres.copy()
        centres[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        updated = balanced_assign(x, centres)
        if np.array_equal(updated, assignments):
            break
        assignments = updated
    return centres, assignments


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def kmeans(
    activations: object,
    k: int,
    *,
    init_centres: object | None = None,
    niter: int = DEFAULT_NITER,
    seed: int = DEFAULT_SEED,
    init_method: InitMethod = "kmeans++",
    balanced: bool = False,
    gpu: bool = False,
) -> KMeansResult:
    """K-means of all N activations [N, D] into k clusters with FAISS (deterministic for a seed).

    ``init_centres`` [k, D] warm-starts from previous centres so cluster k stays cluster k; without it
    FAISS initialises with ``init_method``: "kmeans++" (D^2 sampling; the default here, since random
    starts often land in a poor local optimum, e.g. two centres in one blob) or "random" (k random
    points, FAISS's own default).

    ``balanced``: after FAISS, Lloyd rounds with equal-size assignments (``balanced_assign``), so no
    cluster collapses; ``assignments``/``sizes``/``objective``/``sigma2`` are then the balanced ones.

    ``gpu``: FAISS's assignments on a GPU where FAISS has one (``flat_l2_index``); the rest (re-seeding,
    the float64 objective) stays on the CPU.
    """
    x = as_activations(activations)
    _check_k(k, x.shape[0])
    if niter < 1:
        raise ClusteringError(f"niter must be >= 1, got {niter}")
    if init_method not in _INIT_METHODS:
        raise ClusteringError(f"init_method must be one of {sorted(_INIT_METHODS)}, got {init_method!r}")
    init = None
    if init_centres is not None:
        init = as_activations(init_centres, "init_centres")
        if init.shape != (k, x.shape[1]):
            raise ClusteringError(f"init_centres must have shape {(k, x.shape[1])}, got {init.shape}")
    tolerance = NEAR_DUPLICATE_FRACTION * _rms_spread(x)

    centres, stats, iterations, splits, reseeded = init, [], 0, 0, 0
    for round_ in range(MAX_RESEED_ROUNDS + 1):
        centres, stats = _faiss_round(x, centres, k, niter, seed + round_, init_method, gpu)
        iterations += len(stats)
        splits += sum(s.nsplit for s in stats)
        if round_ == MAX_RESEED_ROUNDS:
            break
        candidate, moved = reseed_centres(x, centres, tolerance)
        if not moved:
            break
        centres, reseeded = candidate, reseeded + len(moved)

    if balanced and k > 1:
        centres, assignments = _balanced_lloyd(x, centres, BALANCED_ROUNDS)
    else:
        assignments = assign(x, centres, gpu)
    sizes = np.bincount(assignments, minlength=k).astype(np.int64)
    objective = float(_own_sq_distances(x, centres, assignments).sum())
    return KMeansResult(
        centres=_readonly(np.ascontiguousarray(centres, np.float32)),
        assignments=_readonly(assignments),
        sizes=_readonly(sizes),
        objective=objective,
        sigma2=objective / (x.shape[0] - 1) if x.shape[0] > 1 else float("nan"),
        iterations=iterations,
        reseeded=reseeded,
        faiss_splits=splits,
        empty_clusters=int(np.count_nonzero(sizes == 0)),
        objective_history=tuple(float(s.obj) for s in stats),
        warm_started=init is not None,
        balanced=balanced and k > 1,
    )
