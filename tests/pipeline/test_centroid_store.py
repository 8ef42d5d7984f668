"""The centroid store's logic, without Ray (the actor is a thin async wrapper around it)."""

import re

import numpy as np
import pytest

from divdr import clustering
from divdr.config import ClusteringConfig, ConfigError
from pipeline.centroid_store import CentroidStoreImpl
from pipeline.config import StoreConfig
from tests.divdr.doubles import FakeGpu

DIM = 6


def blobs(n_per: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(3, DIM) * 0.9
    labels = np.repeat(np.arange(3), n_per)
    return (centres[labels] + rng.normal(0, 0.02, (len(labels), DIM))).astype(np.float32), labels


def make_store(tmp_path=None, n=60, world=2, steps=20, every=5) -> CentroidStoreImpl:
    return CentroidStoreImpl(n, DIM, world, steps, ClusteringConfig(k=3, update_every=every), StoreConfig(),
                             str(tmp_path / "store") if tmp_path else None)


def test_clusters_only_when_every_rank_reached_the_trigger():
    store = make_store()
    points, _ = blobs(20)
    assert store.triggers == [5, 10, 15]
    store.ingest(0, 4, np.arange(30), points[:30])
    assert not store.due()  # rank 1 has sent nothing
    store.ingest(1, 3, np.arange(30, 60), points[30:])
    assert not store.due()  # rank 1 is at step 3 < trigger - 1
    store.ingest(1, 4, np.arange(30, 60), points[30:])
    assert store.due()


def test_update_records_stats_and_recovers_blobs():
    store = make_store()
    points, labels = blobs(20)
    store.ingest(0, 4, np.arange(60), points)
    store.mark(1, 4)
    store.publish(store.cluster(*store.take_batch()))
    stats = store.history[-1]
    assert store.version == 1 and stats["version"] == 1 and stats["trigger_step"] == 5
    assert sorted(stats["cluster_sizes"]) == [20, 20, 20]
    assert stats["points"] == 60 and stats["inter"] > 1.0 > 0.1 > stats["intra"]
    assert stats["changed"] is None  # nothing to compare with yet
    # second update, warm-started: identities stable, nothing changes
    store.mark(0, 9)
    store.mark(1, 9)
    assert store.due()
    previous = store.centres.copy()
    store.publish(store.cluster(*store.take_batch()))
    assert store.history[-1]["changed"] == 0.0
    assert np.abs(store.centres - previous).max() < 1e-3
    assert len(set(store.assignments[labels == 0])) == 1


def test_latest_activation_wins_and_non_finite_rows_rejected():
    store = make_store()
    store.ingest(0, 0, np.array([3, 4]), np.full((2, DIM), 0.1, np.float32))
    store.ingest(0, 1, np.array([3]), np.full((1, DIM), 0.7, np.float32))
    bad = np.full((2, DIM), 0.5, np.float32)
    bad[1, 2] = np.nan
    store.ingest(1, 1, np.array([5, 6]), bad)
    assert store.activations[3, 0] == pytest.approx(0.7, abs=1e-3)
    assert store.seen[[3, 4, 5]].all() and not store.seen[6]
    assert store.rejected_rows == 1


def test_bad_ingest_is_a_clear_error():
    store = make_store()
    with pytest.raises(ValueError, match="expected \\[2, 6\\]"):
        store.ingest(0, 0, np.array([1, 2]), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="sample ids outside"):
        store.ingest(0, 0, np.array([99]), np.zeros((1, DIM), np.float32))
    with pytest.raises(ValueError, match="at least K=3"):
        make_store(n=2)


def test_snapshot_restores_everything(tmp_path):
    store = make_store(tmp_path)
    points, _ = blobs(20)
    store.ingest(0, 4, np.arange(60), points)
    store.mark(1, 4)
    store.publish(store.cluster(*store.take_batch()))  # snapshot_every=1: written now
    restored = make_store(tmp_path)
    assert restored.restored and restored.version == 1
    assert np.array_equal(restored.centres, store.centres)
    assert restored.sigma2 == store.sigma2 and restored.history == store.history
    assert np.array_equal(restored.activations, store.activations) and restored.seen.all()
    assert np.array_equal(restored.assignments, store.assignments)
    # the next update continues from the restored version
    restored.mark(0, 9)
    restored.mark(1, 9)
    restored.publish(restored.cluster(*restored.take_batch()))
    assert restored.version == 2 and restored.history[-1]["changed"] == 0.0


def test_snapshot_of_another_shape_is_refused(tmp_path):
    store = make_store(tmp_path)
    store.ingest(0, 4, np.arange(3), np.eye(3, DIM, dtype=np.float32))
    store.snapshot()
    with pytest.raises(ValueError, match="wrong --out or run name"):
        make_store(tmp_path, n=61)


def test_fresh_kmeans_start_ignores_the_previous_centres():
    fresh = CentroidStoreImpl(60, DIM, 1, 20, ClusteringConfig(k=3, update_every=5, kmeans_start="fresh"),
                              StoreConfig(), None)
    points, _ = blobs(20)
    fresh.ingest(0, 4, np.arange(60), points)
    fresh.publish(fresh.cluster(*fresh.take_batch()))
    # centres planted far from the data: a warm start would begin there, a fresh one never sees them
    fresh.centres = np.full((3, DIM), 50.0, dtype=np.float32)
    fresh.mark(0, 9)
    fresh.publish(fresh.cluster(*fresh.take_batch()))
    assert sorted(fresh.history[-1]["cluster_sizes"]) == [20, 20, 20]
    assert np.abs(fresh.centres).max() < 2.0


@pytest.mark.parametrize(("asked", "gpus", "on_gpu"), [(True, 1, True), (True, 0, False), (False, 1, False)])
def test_the_store_clusters_on_a_gpu_only_where_it_was_given_one_and_faiss_has_one(monkeypatch, asked, gpus,
                                                                                     on_gpu):
    fake = FakeGpu(monkeypatch, gpus)
    store = CentroidStoreImpl(60, DIM, 1, 20, ClusteringConfig(k=3, update_every=5), StoreConfig(), None, gpu=asked)
    points, _ = blobs(20)
    store.ingest(0, 4, np.arange(60), points)
    store.publish(store.cluster(*store.take_batch()))
    assert store.status()["kmeans_on_gpu"] is on_gpu
    assert bool(fake.indexes) is on_gpu
    assert sorted(store.history[-1]["cluster_sizes"]) == [20, 20, 20]


def stable_store(tmp_path=None, max_change=0.05) -> CentroidStoreImpl:
    """K = 2, fresh K-means every 5 of 40 steps, eq. 2 only with a partition that persists."""
    config = ClusteringConfig(weight=0.5, k=2, alpha=1.0, update_every=5, kmeans_start="fresh",
                              stable_max_change=max_change)
    return CentroidStoreImpl(40, DIM, 1, 40, config, StoreConfig(), str(tmp_path / "store") if tmp_path else None)


def two_partitions(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """40 points on two axes, K-means' partition by the wider one: the first (points 0-19 against 20-39);
    the second axis (even against odd) is a fifth as wide."""
    rng = np.random.default_rng(seed)
    first, second = np.repeat([0.0, 1.0], 20), np.tile([0.0, 0.2], 20)
    points = np.zeros((40, DIM), np.float32)
    points[:, 0], points[:, 1] = first, second
    return (points + rng.normal(0, 0.01, points.shape)).astype(np.float32), first.astype(int)


def update(store: CentroidStoreImpl, points: np.ndarray, step: int) -> dict:
    store.ingest(0, step - 1, np.arange(len(points)), points)
    assert store.due()
    store.publish(store.cluster(*store.take_batch()))
    return store.centres_payload()


def test_eq2_uses_only_partitions_that_persist(tmp_path):
    store = stable_store(tmp_path)
    points, halves = two_partitions()
    flipped = points * np.array([0.2, 5.0] + [1.0] * (DIM - 2), np.float32)  # now the other split wins
    # the first version has nothing to agree with: eq. 2 waits
    payload = update(store, points, 5)
    assert payload["sigma2"] == 0.0 and payload["stats"]["eq2_on"] == 0 and store.sigma2 > 0
    # the same partition again (fresh starts may rename the clusters): eq. 2 uses it, with the real sigma^2
    payload = update(store, points, 10)
    assert store.history[-1]["matched_change"] == 0.0
    assert payload["sigma2"] == store.sigma2 > 0 and payload["stats"]["eq2_on"] == 1
    assert clustering.recovery_accuracy(store.assignments, halves) == 1.0
    # a flip (half of the points change cluster) pauses eq. 2, and so does the way back
    payload = update(store, flipped, 15)
    assert payload["sigma2"] == 0.0 and store.history[-1]["matched_change"] == pytest.approx(0.5)
    assert update(store, points, 20)["sigma2"] == 0.0
    # the pause is kept across a restart from the snapshot; the next agreeing version resumes eq. 2
    restored = stable_store(tmp_path)
    assert restored.centres_payload()["sigma2"] == 0.0
    assert update(restored, points, 25)["sigma2"] == restored.sigma2 > 0


def test_without_the_stability_condition_every_version_is_published_with_its_sigma2():
    store = CentroidStoreImpl(40, DIM, 1, 40, ClusteringConfig(weight=0.5, k=2, alpha=1.0, update_every=5),
                              StoreConfig(), None)
    points, _ = two_partitions()
    payload = update(store, points, 5)
    assert payload["sigma2"] == store.sigma2 > 0 and payload["stats"]["eq2_on"] == 1


def test_hold_keeps_eq2_on_the_last_partition_that_persisted(tmp_path):
    """clustering.on_unstable: hold publishes, in an unstable version's place, the centres and sigma^2 of
    the last version eq. 2 could use (kept across a restart); before any, eq. 2 waits as with pause."""
    config = ClusteringConfig(weight=0.5, k=2, alpha=1.0, update_every=5, kmeans_start="fresh",
                              stable_max_change=0.05, on_unstable="hold")
    store = CentroidStoreImpl(40, DIM, 1, 40, config, StoreConfig(), str(tmp_path / "store"))
    points, halves = two_partitions()
    flipped = points * np.array([0.2, 5.0] + [1.0] * (DIM - 2), np.float32)
    assert update(store, points, 5)["sigma2"] == 0.0  # nothing persisted yet
    stable = update(store, points, 10)
    kept_centres, kept_sigma2 = stable["centres"].copy(), stable["sigma2"]
    assert kept_sigma2 > 0
    held = update(store, flipped, 15)  # a flip: the halves' centres and sigma^2 stay in use
    assert held["stats"]["eq2_on"] == 0 and store.sigma2 != kept_sigma2
    np.testing.assert_array_equal(held["centres"], kept_centres)
    assert held["sigma2"] == kept_sigma2
    assert clustering.recovery_accuracy(clustering.assign(points, held["centres"]), halves) == 1.0
    restored = CentroidStoreImpl(40, DIM, 1, 40, config, StoreConfig(), str(tmp_path / "store"))
    again = restored.centres_payload()
    np.testing.assert_array_equal(again["centres"], kept_centres)
    assert again["sigma2"] == kept_sigma2


def test_kmeans_membership_sends_the_partition_that_goes_with_the_centres(tmp_path):
    """clustering.membership: kmeans: the payload carries each sample's cluster; with on_unstable: hold, the
    partition of the version that persisted, with its centres (kept across a restart)."""
    config = ClusteringConfig(weight=0.5, k=2, alpha=1.0, update_every=5, kmeans_start="fresh",
                              stable_max_change=0.05, on_unstable="hold", membership="kmeans")
    store = CentroidStoreImpl(40, DIM, 1, 40, config, StoreConfig(), str(tmp_path / "store"))
    points, halves = two_partitions()
    flipped = points * np.array([0.2, 5.0] + [1.0] * (DIM - 2), np.float32)
    update(store, points, 5)
    stable = update(store, points, 10)
    assert clustering.recovery_accuracy(stable["assignments"], halves) == 1.0
    np.testing.assert_array_equal(stable["assignments"], clustering.assign(points, stable["centres"]))
    held = update(store, flipped, 15)
    assert held["stats"]["eq2_on"] == 0
    assert clustering.recovery_accuracy(store.assignments, halves) < 1.0  # K-means itself moved on ...
    np.testing.assert_array_equal(held["assignments"], stable["assignments"])  # ... eq. 2 keeps the halves
    restored = CentroidStoreImpl(40, DIM, 1, 40, config, StoreConfig(), str(tmp_path / "store"))
    np.testing.assert_array_equal(restored.centres_payload()["assignments"], stable["assignments"])
    nearest = CentroidStoreImpl(40, DIM, 1, 40, ClusteringConfig(weight=0.5, k=2, alpha=1.0, update_every=5),
                                StoreConfig(), None)
    assert "assignments" not in update(nearest, points, 5)  # the paper's membership needs no partition


def test_each_update_counts_the_points_that_crossed_to_another_centre():
    """stats["crossed"]: of the points eq. 2 gave a cluster since the last update, the fraction now nearest
    another of the centres in use (routes that crossed a midpoint); None before there is a partition."""
    store = CentroidStoreImpl(40, DIM, 1, 40, ClusteringConfig(weight=0.5, k=2, alpha=1.0, update_every=5),
                              StoreConfig(), None)
    points, _ = two_partitions()
    assert update(store, points, 5)["stats"]["crossed"] is None
    assert update(store, points, 10)["stats"]["crossed"] == 0.0
    moved = points.copy()
    moved[:4, 0] = 1.0 - moved[:4, 0]  # 4 of the 40 now sit on the other half's centre
    assert update(store, moved, 15)["stats"]["crossed"] == pytest.approx(0.1)


def test_on_unstable_is_validated_by_name():
    with pytest.raises(ConfigError, match=re.escape("clustering.on_unstable must be 'pause' or 'hold', got 'keep'")):
        ClusteringConfig(on_unstable="keep")


def test_a_version_with_too_few_finite_samples_is_reported_starved_not_due():
    """Every rank past the trigger, but the rows that came were non-finite (refused): nothing in flight can make
    the version, so the store says so (starved) instead of letting rank 0 wait for it; later rows make it due."""
    store = make_store()
    points, _ = blobs(20)
    store.ingest(0, 4, np.arange(30), np.full((30, DIM), np.nan, dtype=np.float32))
    assert not store.starved()  # rank 1 may still send
    store.mark(1, 4)  # rank 1's steps were left out: a mark, no rows
    assert store.starved() and not store.due() and store.rejected_rows == 30
    store.ingest(1, 6, np.arange(30, 60), points[30:])  # a later step brings finite rows
    assert store.due() and not store.starved()


def test_the_actor_answers_at_once_for_a_starved_version(monkeypatch, caplog):
    """get_centres returns None without waiting its timeout when the version is starved, says why once, and
    still waits for a version that is only late (a rank not past the trigger yet)."""
    import asyncio
    import time

    import ray

    from pipeline.centroid_store import CentroidStore

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    actor_class = CentroidStore.__ray_actor_class__

    async def scenario():
        store = actor_class(60, DIM, 2, 20, ClusteringConfig(k=3, update_every=5), StoreConfig(), None)
        late = time.perf_counter()
        assert await store.get_centres(1, 0, 6, timeout=0.3) is None  # rank 1 not past step 4: waited
        late = time.perf_counter() - late
        await store.mark(1, 4)
        starved = time.perf_counter()
        answers = [await store.get_centres(1, 0, 6 + i, timeout=30.0) for i in range(2)]
        return late, time.perf_counter() - starved, answers

    with caplog.at_level("WARNING", logger="pipeline.centroid_store"):
        late, starved, answers = asyncio.run(scenario())
    assert late >= 0.3 and starved < 5 and answers == [None, None]
    warned = [r.getMessage() for r in caplog.records if "K-means for step 5" in r.getMessage()]
    assert len(warned) == 1 and "needs K=3 samples with a finite A(x), and only 0 arrived" in warned[0]
