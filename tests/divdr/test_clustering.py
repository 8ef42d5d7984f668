import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

import divdr.clustering as clustering
from divdr.clustering import (
    ClusteringError,
    assign,
    assignment_change,
    balanced_assign,
    cluster_sizes,
    inter_distance,
    intra_distance,
    kmeans,
    matched_change,
    mean_pairwise_distance,
    recovery_accuracy,
    reseed_centres,
    sigma2,
    subset_probe,
    subset_variance_by_dimension,
    subset_variance_share,
)
from tests.divdr.doubles import FakeGpu

BLOB_CENTRES = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])


def _blobs(per_blob: int, std: float = 0.3, seed: int = 0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c + shift, std, (per_blob, 2)) for c in BLOB_CENTRES]).astype(np.float32)
    return x, np.repeat(np.arange(len(BLOB_CENTRES)), per_blob)


def _brute_objective(x: np.ndarray, centres: np.ndarray) -> tuple[float, np.ndarray]:
    sq = ((x[:, None, :].astype(np.float64) - centres[None].astype(np.float64)) ** 2).sum(-1)
    return float(sq.min(axis=1).sum()), sq.argmin(axis=1)


def test_kmeans_recovers_separated_blobs():
    x, labels = _blobs(200)
    result = kmeans(x, 3, seed=0)
    assert recovery_accuracy(result.assignments, labels) == 1.0
    assert sorted(result.sizes.tolist()) == [200, 200, 200]
    nearest_true = np.linalg.norm(result.centres[:, None] - BLOB_CENTRES[None], axis=-1).min(axis=1)
    assert nearest_true.max() < 0.1
    assert result.centres.dtype == np.float32 and not result.centres.flags.writeable
    assert result.sigma2 == pytest.approx(result.objective / (len(x) - 1))


def test_kmeans_uses_all_points():
    # 2 clusters, 20000 points: FAISS's default cap would train on 256 * 2 = 512 of them
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (10000, 4)), rng.normal(6, 1, (10000, 4))]).astype(np.float32)
    result = kmeans(x, 2, seed=0)
    objective, nearest = _brute_objective(x, result.centres)
    assert result.objective == pytest.approx(objective, rel=1e-9)
    np.testing.assert_array_equal(result.assignments, nearest)
    # FAISS's own last objective is over the points it trained on: all 20000, not a 512 subsample
    assert result.objective_history[-1] == pytest.approx(objective, rel=1e-3)
    # a Lloyd fixed point over all points: each centre is the mean of all its members
    for k in range(2):
        np.testing.assert_allclose(result.centres[k], x[result.assignments == k].mean(axis=0), atol=1e-4)


def test_warm_start_keeps_identities():
    x, labels = _blobs(300, seed=0)
    first = kmeans(x, 3, seed=0)
    assert recovery_accuracy(first.assignments, labels) == 1.0
    drifted, _ = _blobs(300, seed=1, shift=0.2)  # new samples, every blob moved by (0.2, 0.2)
    second = kmeans(drifted, 3, init_centres=first.centres, seed=99)
    assert second.warm_started
    moved = np.linalg.norm(second.centres - first.centres, axis=1)
    assert moved.max() < 0.5  # blobs are 5 apart: a swapped identity would move a centre by >= 5
    # point i comes from the same blob in both sets: it keeps its cluster index
    assert assignment_change(first.assignments, second.assignments) == 0.0


def test_deterministic_under_seed():
    x, _ = _blobs(100, std=1.5)
    for method in ("random", "kmeans++"):
        a = kmeans(x, 4, seed=5, init_method=method)
        b = kmeans(x, 4, seed=5, init_method=method)
        np.testing.assert_array_equal(a.centres, b.centres)
        np.testing.assert_array_equal(a.assignments, b.assignments)


def test_float16_and_torch_accepted():
    x, labels = _blobs(100)
    for data in (x.astype(np.float16), torch.from_numpy(x)):
        result = kmeans(data, 3, seed=0)
        assert result.centres.dtype == np.float32
        assert recovery_accuracy(result.assignments, labels) == 1.0


def test_reseed_moves_empty_and_duplicate_centres_to_farthest_points():
    x = np.array([[0, 0], [0.1, 0], [10, 0], [10.1, 0]], np.float32)
    centres = np.array([[0.05, 0], [0.05, 0], [50, 50]], np.float32)
    # all points are nearest to centre 0 (ties go to the lower index): centre 1 duplicates it, centre 2
    # is empty. Squared distances to centre 0: 0.0025, 0.0025, 99.0025, 102.01 -> farthest (10.1, 0), (10, 0)
    new, moved = reseed_centres(x, centres, tolerance=0.01)
    assert moved == [1, 2]
    np.testing.assert_allclose(new, [[0.05, 0], [10.1, 0], [10, 0]], rtol=1e-6)
    assert reseed_centres(x, new, tolerance=0.01)[1] == []


def test_kmeans_reseeds_and_reports_empty_clusters():
    x, labels = _blobs(300)
    # a centre far from all data is empty at the first step; FAISS splits a large cluster into two
    # near-identical copies, which one iteration leaves near-duplicate: this module re-seeds one
    result = kmeans(x, 3, init_centres=[[0, 0], [5, 0], [100, 100]], niter=1)
    assert result.faiss_splits >= 1 and result.reseeded >= 1
    assert result.empty_clusters == 0
    assert recovery_accuracy(result.assignments, labels) == 1.0
    # two distinct points cannot fill 3 clusters: reported, not hidden
    collapsed = np.zeros((100, 2), np.float32)
    collapsed[90:] = 1.0
    result = kmeans(collapsed, 3)
    assert result.empty_clusters == 1 and sorted(result.sizes.tolist()) == [0, 10, 90]


def test_bad_inputs():
    x, _ = _blobs(1)
    with pytest.raises(ClusteringError, match="k = 5 clusters is more than the 3 points"):
        kmeans(x, 5)
    bad = x.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ClusteringError, match=r"NaN or Inf.*row 1"):
        kmeans(bad, 2)
    bad[1, 0] = np.inf
    with pytest.raises(ClusteringError, match="row 1"):
        sigma2(bad, x)
    with pytest.raises(ClusteringError, match="init_centres must have shape"):
        kmeans(x, 2, init_centres=np.zeros((3, 2)))
    with pytest.raises(ClusteringError, match=r"shape \(3,\)"):
        kmeans(x[:, 0], 1)
    with pytest.raises(ClusteringError, match="current assignments has 3 entries, expected 2"):
        assignment_change([0, 1], [0, 1, 2])


def test_sigma2_inter_intra_by_hand():
    x = np.array([[0, 0], [2, 0], [10, 0]], np.float32)
    # nearest centres (1,0), (1,0), (10,0): squared distances 1 + 1 + 0 = 2, over N - 1 = 2 -> 1
    assert sigma2(x, [[1, 0], [10, 0]]) == pytest.approx(1.0)
    np.testing.assert_array_equal(assign(x, [[1, 0], [10, 0]]), [0, 0, 1])
    # centre distances 5, 10, 5 -> 20 / 3
    assert inter_distance([[0, 0], [3, 4], [6, 8]]) == pytest.approx(20 / 3)
    assert math.isnan(inter_distance([[0, 0]]))
    points = np.array([[0, 0], [3, 4], [0, 8], [10, 0], [10, 2], [50, 50]], np.float32)
    # cluster 0: pairs 5, 8, 5 -> 6; cluster 1: 2; cluster 2 has one member and is skipped -> (6 + 2) / 2
    assert intra_distance(points, [0, 0, 0, 1, 1, 2]) == pytest.approx(4.0)
    assert math.isnan(intra_distance(points, [0, 1, 2, 3, 4, 5]))


def test_intra_on_a_sample_is_exact_for_small_clusters_and_close_for_large_ones():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 1, (3000, 6)), rng.normal(5, 2, (40, 6))]).astype(np.float32)
    labels = np.array([0] * 3000 + [1] * 40)
    exact = intra_distance(x, labels)
    # the 40-point cluster is below the cap: exact; the 3000-point one estimated from 500 points
    sampled = intra_distance(x, labels, max_points_per_cluster=500, seed=1)
    assert sampled == pytest.approx(exact, rel=0.02)
    assert intra_distance(x, labels, max_points_per_cluster=5000) == pytest.approx(exact, rel=1e-12)
    assert intra_distance(x, labels, max_points_per_cluster=500, seed=1) == sampled  # deterministic per seed
    with pytest.raises(ClusteringError, match="max_points_per_cluster must be >= 2"):
        intra_distance(x, labels, max_points_per_cluster=1)


def test_blocked_pairwise_distance_matches_pdist(monkeypatch):
    x = np.random.default_rng(3).normal(size=(300, 7))
    expected = pdist(x).mean()
    monkeypatch.setattr(clustering, "BLOCK_ELEMENTS", 1000)  # 3 rows per block: many partial blocks
    assert mean_pairwise_distance(x) == pytest.approx(expected, rel=1e-10)
    monkeypatch.setattr(clustering, "BLOCK_ELEMENTS", 1)  # one row per block
    assert mean_pairwise_distance(x[:50]) == pytest.approx(pdist(x[:50]).mean(), rel=1e-10)


def test_recovery_accuracy():
    assert recovery_accuracy([2, 2, 0, 0, 1, 1], ["a", "a", "b", "b", "c", "c"]) == 1.0
    # contingency: cluster 0 = {a: 2, b: 1}, 1 = {b: 2}, 2 = {c: 2, a: 1}; best matching 0-a, 1-b, 2-c -> 6 / 8
    assert recovery_accuracy([0, 0, 0, 1, 1, 2, 2, 2], list("aabbbcca")) == pytest.approx(0.75)
    # 4 clusters, 3 subsets: clusters 0 and 1 both hold a; only one can match it -> (2 + 2 + 2) / 8
    assert recovery_accuracy([0, 0, 1, 1, 2, 2, 3, 3], list("aaaabbcc")) == pytest.approx(0.75)
    # 1 cluster, 2 subsets: the larger subset matches -> 3 / 4
    assert recovery_accuracy([0, 0, 0, 0], [1, 1, 1, 2]) == pytest.approx(0.75)


def test_sizes_and_changes():
    np.testing.assert_array_equal(cluster_sizes([0, 2, 2], 4), [1, 0, 2, 0])
    with pytest.raises(ClusteringError, match="0-1"):
        cluster_sizes([0, 2], 2)
    assert assignment_change([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.25)


def test_matched_change_ignores_a_relabelling_of_the_clusters():
    # the same partition under swapped names: every label changed, no point changed cluster
    assert assignment_change([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    assert matched_change([0, 0, 1, 1], [1, 1, 0, 0]) == 0.0
    # one point of four moved, names swapped as well
    assert matched_change([0, 0, 1, 1], [1, 0, 0, 0]) == pytest.approx(0.25)
    # exact, so that a threshold compares as written: 12 of 240 points is 0.05, not 0.05 + 4e-17
    assert matched_change([0] * 120 + [1] * 120, [1] * 12 + [0] * 108 + [1] * 120) == 0.05
    with pytest.raises(ClusteringError, match="current assignments"):
        matched_change([0, 1], [0, 1, 1])


def test_balanced_assign_splits_one_blob_evenly_and_keeps_separated_blobs():
    rng = np.random.default_rng(5)
    one_blob = rng.normal(0, 1, (300, 8)).astype(np.float32)
    centres = one_blob[:3] * 0.1  # all near the middle: nearest-centre assignment is lopsided
    sizes = np.bincount(balanced_assign(one_blob, centres), minlength=3)
    assert sizes.min() >= 90  # near 100 each (entropic transport: near-equal, not exactly equal)
    blobs, labels = _blobs(60)
    true_centres = np.stack([blobs[labels == j].mean(0) for j in range(3)])
    assert np.array_equal(balanced_assign(blobs, true_centres), assign(blobs, true_centres))


def test_balanced_kmeans_prevents_collapse_onto_a_dominant_blob():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(0, 1, (200, 10)), rng.normal(4, 1, (20, 10)),
                        rng.normal(-4, 1, (20, 10))]).astype(np.float32)
    plain = kmeans(x, 3)
    balanced = kmeans(x, 3, balanced=True)
    assert sorted(plain.sizes.tolist()) == [20, 20, 200] and not plain.balanced
    assert balanced.balanced and balanced.sizes.min() >= 60 and balanced.sizes.sum() == 240
    own = ((x - balanced.centres[balanced.assignments]) ** 2).sum()
    assert balanced.objective == pytest.approx(float(own), rel=1e-5)  # of the balanced assignments
    with pytest.raises(ClusteringError, match="dimension"):
        balanced_assign(x, balanced.centres[:, :5])


def test_subset_probe_sees_a_subset_that_kmeans_misses():
    # the subsets differ along a low-variance dimension; a dominant nuisance splits the data otherwise
    rng = np.random.default_rng(0)
    subsets = np.repeat([0, 1], 100)
    nuisance = rng.choice([-10.0, 10.0], 200) + rng.normal(0, 0.5, 200)
    signal = subsets * 1.0 + rng.normal(0, 0.1, 200)
    x = np.c_[nuisance, signal].astype(np.float32)
    assert subset_probe(x[::2], subsets[::2], x[1::2], subsets[1::2]) == 1.0
    assert recovery_accuracy(kmeans(x, 2, seed=0).assignments, subsets) < 0.7
    assert subset_variance_share(x, subsets) < 0.01
    assert subset_variance_share(x[:, 1:], subsets) > 0.9
    between, within = subset_variance_by_dimension(x, subsets)  # where the share comes from
    assert within[0] > 100 * within[1] and between[1] > 10 * between[0]  # the nuisance varies within subsets
    total = ((x.astype(np.float64) - x.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(between + within, total, rtol=1e-9)


def test_subset_probe_ignores_closed_gates_and_names_bad_input():
    x, labels = _blobs(50)
    x = np.c_[x, np.zeros(len(x))]  # a dimension that never varies (a gate closed for every image)
    assert subset_probe(x, labels, x, labels) == 1.0
    assert subset_variance_share(np.zeros((4, 3)), [0, 0, 1, 1]) == 0.0
    with pytest.raises(ClusteringError, match="val_subsets has 3 entries"):
        subset_probe(x, labels, x[:4], labels[:3])
    with pytest.raises(ClusteringError, match=">= 2 train subsets"):
        subset_probe(x, np.zeros(len(x), int), x, labels)


# ---------------------------------------------------------------- FAISS on a GPU (faked: CI has none)


def test_faiss_without_gpu_code_has_no_gpu(monkeypatch):
    monkeypatch.delattr(clustering.faiss, "StandardGpuResources", raising=False)
    assert clustering.faiss_gpus() == 0
    assert isinstance(clustering.flat_l2_index(4, gpu=True), clustering.faiss.IndexFlatL2)


def test_kmeans_runs_on_a_gpu_only_when_asked_and_faiss_has_one(monkeypatch):
    x, _ = _blobs(40)
    on_cpu = kmeans(x, 3, seed=1)
    fake = FakeGpu(monkeypatch, gpus=1)
    assert kmeans(x, 3, seed=1).centres.tolist() == on_cpu.centres.tolist() and fake.indexes == []
    on_gpu = kmeans(x, 3, seed=1, gpu=True)
    assert fake.indexes and set(fake.indexes) == {2}  # every FAISS round and the final assignment
    assert fake.temp_memory == [clustering.GPU_TEMP_MEMORY]  # one set of resources, its scratch memory capped
    assert on_gpu.centres.tolist() == on_cpu.centres.tolist()  # the fake GPU index computes as the CPU's
    assert assign(x, on_gpu.centres, gpu=True).tolist() == on_cpu.assignments.tolist()


def test_no_visible_gpu_keeps_kmeans_on_the_cpu(monkeypatch):
    fake = FakeGpu(monkeypatch, gpus=0)
    kmeans(_blobs(10)[0], 3, gpu=True)
    assert fake.indexes == [] and clustering.faiss_gpus() == 0
