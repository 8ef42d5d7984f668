"""The centroid store: a Ray actor that keeps the latest A(x) of every training image and clusters them.

Protocol (SPEC section 5):
- workers call ``ingest(rank, step, sample_ids, activations)`` without waiting on the reply, with
  a bounded number of calls in flight; the latest activation of each sample wins;
- version v is clustered (FAISS K-means, warm-started from version v-1) as soon as every rank has
  sent its activations up to step ``trigger[v] - 1``; the K-means runs in a thread, so ingestion is
  never blocked by it;
- ``get_centres(v)`` waits (bounded) for version v; rank 0 fetches it at the switch step and
  broadcasts it, so all DDP ranks switch at the same step. A version that cannot be clustered yet
  (every rank past its trigger, fewer than K finite samples: the steps were refused) is answered at
  once with None, and a warning, rather than after the timeout at every step;
- with ``clustering.stable_max_change`` a version whose partition differs too much from the previous
  one is published with sigma^2 = 0, which the workers read as "no usable centres": eq. 2 pauses
  (``clustering.on_unstable: pause``), or with the centres and sigma^2 of the last version that
  persisted (``hold``);
- after every ``snapshot_every``-th update the state (activations, centres, sigma^2, version,
  history) is written as Parquet/NumPy/JSON into the run folder; a restarted actor restores it.
  The actor copies the state on its event loop and writes it in a thread, so a snapshot (3.6 s at
  118k x 198) never stalls ingestion;
- the actor's OpenMP threads (FAISS) wait passively: Ray gives a ``num_cpus=0`` actor one OpenMP
  thread, but where it is given more, spinning waits on a node shared with training workers made
  FAISS K-means 20x slower on 2 cores (bench/kmeans.py, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from divdr import clustering
from divdr.config import ClusteringConfig
from pipeline.config import StoreConfig
from pipeline.schedule import kmeans_trigger_steps

log = logging.getLogger(__name__)

ACTIVATIONS_FILE = "activations.parquet"
STATE_FILE = "state.json"
CENTRES_FILE = "centres.npy"
HELD_CENTRES_FILE = "held_centres.npy"  # clustering.on_unstable: hold
# Environment of the store's process: FAISS's OpenMP threads sleep instead of spinning while they
# wait (read by the OpenMP runtime when it loads, hence set for the actor's process, not at run time).
STORE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def store_name(run_name: str) -> str:
    """One store per training run, named after it so concurrent Tune trials never collide."""
    return f"divdr-centroid-store:{run_name}"


class CentroidStoreImpl:
    """The store's logic, plain Python so it can be tested without Ray (see ``CentroidStore``)."""

    def __init__(self, num_samples: int, dim: int, world_size: int, total_steps: int,
                 clustering_config: ClusteringConfig, store_config: StoreConfig, snapshot_dir: str | None,
                 seed: int = 0, gpu: bool = False) -> None:
        if num_samples < clustering_config.k:
            raise ValueError(f"the store needs at least K={clustering_config.k} samples, got {num_samples}")
        self.dim = dim
        self.world_size = world_size
        self.k = clustering_config.k
        self.balanced = clustering_config.balanced
        self.kmeans_start = clustering_config.kmeans_start
        self.stable_max_change = clustering_config.stable_max_change
        self.on_unstable = clustering_config.on_unstable
        # the last version eq. 2 could use: what ``on_unstable: hold`` publishes in an unstable one's place
        self.held: tuple[np.ndarray, float] | None = None
        self.held_assignments: np.ndarray | None = None  # its partition (clustering.membership: kmeans)
        self.membership = clustering_config.membership
        # Whether eq. 2 may use the current version (always without the stability condition).
        self.eq2_on = True
        self.config = store_config
        self.seed = seed
        # K-means on a GPU only where this process was given one (the local runner training on CUDA; a
        # store actor given a GPU by Ray) and FAISS can use it (faiss-gpu): never on a training worker's card
        self.gpu = gpu and clustering.faiss_gpus() > 0
        self.triggers = kmeans_trigger_steps(total_steps, clustering_config.update_every,
                                             clustering_config.update_every_final)
        dtype = np.float16 if store_config.float16 else np.float32
        self.activations = np.zeros((num_samples, dim), dtype=dtype)
        self.seen = np.zeros(num_samples, dtype=bool)
        self.watermark = [-1] * world_size  # per rank: all activations up to this step received
        self.version = 0
        self.centres: np.ndarray | None = None
        self.sigma2 = 0.0
        self.assignments: np.ndarray | None = None
        self.history: list[dict[str, Any]] = []
        self.rejected_rows = 0
        self.ingested_rows = 0
        self.ingest_calls_by_rank = [0] * world_size
        self.running = False
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.restored = self._restore()

    # ---- ingestion -----------------------------------------------------------------------------

    def ingest(self, rank: int, step: int, sample_ids: np.ndarray, activations: np.ndarray,
               complete: bool = True) -> None:
        """Keep the latest A(x) per sample. Non-finite rows never reach the centres: rejected."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        acts = np.asarray(activations)
        if acts.ndim != 2 or acts.shape[1] != self.dim or acts.shape[0] != ids.shape[0]:
            raise ValueError(f"ingest from rank {rank} step {step}: expected [{ids.shape[0]}, {self.dim}] "
                             f"activations, got {list(acts.shape)}")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.seen)):
            raise ValueError(f"ingest from rank {rank} step {step}: sample ids outside [0, {len(self.seen)})")
        finite = np.isfinite(acts).all(axis=1)
        self.rejected_rows += int((~finite).sum())
        self.activations[ids[finite]] = acts[finite]
        self.seen[ids[finite]] = True
        self.ingested_rows += int(finite.sum())
        self.ingest_calls_by_rank[rank] += 1
        if complete:
            self.watermark[rank] = max(self.watermark[rank], step)

    def mark(self, rank: int, step: int) -> None:
        self.watermark[rank] = max(self.watermark[rank], step)

    def next_trigger(self) -> int | None:
        """The step whose K-means is due next, or None once the schedule is exhausted."""
        return self.triggers[self.version] if self.version < len(self.triggers) else None

    def _past_trigger(self) -> bool:
        """Not clustering, and every rank past the next trigger (so what it sent up to there has arrived)."""
        trigger = self.next_trigger()
        return not self.running and trigger is not None and min(self.watermark) >= trigger - 1

    def due(self) -> bool:
        return self._past_trigger() and int(self.seen.sum()) >= self.k

    def starved(self) -> bool:
        """Every rank is past the next trigger, yet fewer than K samples have a finite A(x) (their steps were
        non-finite and refused): that version cannot be clustered until later steps bring more, so nobody should
        wait for it now. Were a rank's calls ever handled out of order (the watermark's own assumption), the
        cost is a switch tried again at the next step."""
        return self._past_trigger() and int(self.seen.sum()) < self.k

    # ---- clustering ----------------------------------------------------------------------------

    def take_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """A consistent copy of what is clustered (ingestion goes on into the live buffer)."""
        ids = np.flatnonzero(self.seen)
        return ids, self.activations[ids].astype(np.float32)

    def cluster(self, ids: np.ndarray, points: np.ndarray) -> dict[str, Any]:
        """FAISS K-means over every held activation, warm-started from the previous centres."""
        start = time.perf_counter()
        warm = self.centres if self.kmeans_start == "warm" else None
        result = clustering.kmeans(points, self.k, init_centres=warm, seed=self.seed + self.version,
                                   niter=self.config.kmeans_iterations, balanced=self.balanced, gpu=self.gpu)
        kmeans_seconds = time.perf_counter() - start
        previous = None
        if self.assignments is not None:
            previous = self.assignments[ids]
        assignments = np.full(len(self.seen), -1, dtype=np.int64)
        assignments[ids] = result.assignments
        both = previous >= 0 if previous is not None else None
        matched = (clustering.matched_change(previous[both], result.assignments[both])
                   if both is not None and both.any() else None)
        crossed = self.crossed(ids, points)
        eq2_on = not self.stable_max_change or (matched is not None and matched <= self.stable_max_change)
        stats = {
            "version": self.version + 1,
            "trigger_step": self.next_trigger(),
            "points": len(ids),
            "sigma2": float(result.sigma2),
            "objective": float(result.objective),
            "inter": float(clustering.inter_distance(result.centres)),
            "intra": float(clustering.intra_distance(points, result.assignments,
                                                     max_points_per_cluster=self.config.intra_sample or None,
                                                     seed=self.seed + self.version)),
            "cluster_sizes": result.sizes.tolist(),
            "reseeded": int(result.reseeded),
            "changed": (float(clustering.assignment_change(previous[both], result.assignments[both]))
                        if matched is not None else None),
            "matched_change": matched,  # the same, up to a relabelling of the clusters
            # of the points eq. 2 gave a cluster since the last update, those now nearer another of its centres
            "crossed": crossed,
            "eq2_on": int(eq2_on),  # 0: eq. 2 pauses with this version (clustering.stable_max_change)
            "kmeans_seconds": kmeans_seconds,
            "seconds": time.perf_counter() - start,
        }
        return {"centres": np.array(result.centres), "sigma2": float(result.sigma2), "assignments": assignments,
                "eq2_on": eq2_on, "stats": stats}

    @property
    def holding(self) -> bool:
        """Whether eq. 2 uses the held version in place of the current, unstable one (``on_unstable: hold``)."""
        return not self.eq2_on and self.on_unstable == "hold" and self.held is not None

    def in_use(self) -> tuple[np.ndarray | None, float, np.ndarray | None]:
        """The centres, sigma^2 and partition that go to eq. 2 for the next interval: the held ones while
        ``holding``, else the last version's (while eq. 2 pauses, what it would use)."""
        if self.holding:
            # a snapshot from before held partitions were kept has none: the last version's
            partition = self.held_assignments if self.held_assignments is not None else self.assignments
            return self.held[0], self.held[1], partition
        return self.centres, self.sigma2, self.assignments

    def crossed(self, ids: np.ndarray, points: np.ndarray) -> float | None:
        """Fraction of the clustered points whose nearest centre (of those in use) is not their cluster in
        the partition in use: images whose routes crossed a midpoint since the last update. With the
        paper's nearest-centre membership eq. 2 pulls them on into the other cluster; with
        ``membership: kmeans``, back."""
        centres, _, partition = self.in_use()
        if centres is None or partition is None:
            return None
        members = partition[ids]
        known = members >= 0
        if not known.any():
            return None
        nearest = clustering.assign(points[known], np.asarray(centres, dtype=np.float32))
        return float(np.mean(nearest != members[known]))

    def publish(self, update: dict[str, Any], snapshot: bool = True) -> None:
        """Adopt an update; with ``snapshot`` write the snapshot now if one is due (the actor
        passes False and writes it in a thread, see ``snapshot_due``)."""
        self.centres = update["centres"]
        self.sigma2 = update["sigma2"]
        self.assignments = update["assignments"]
        self.eq2_on = update.get("eq2_on", True)
        if self.eq2_on:
            self.held = (self.centres, self.sigma2)
            self.held_assignments = self.assignments
        self.version += 1
        self.history.append(update["stats"])
        if snapshot and self.snapshot_due():
            self.snapshot()

    def snapshot_due(self) -> bool:
        return bool(self.snapshot_dir) and self.version % self.config.snapshot_every == 0

    def centres_payload(self) -> dict[str, Any]:
        """What the workers adopt. A version eq. 2 must not use (``clustering.stable_max_change``) has its
        sigma^2 published as 0, which the workers' ``CentreState.usable`` reads as "no centres for eq. 2",
        or, with ``on_unstable: hold``, the last usable version's centres and sigma^2 in its place; the
        stats keep the real ones. With ``clustering.membership: kmeans`` the payload carries the partition
        (cluster per sample id, -1 where unseen) that goes with those centres."""
        centres, sigma2, assignments = self.in_use()
        if not self.eq2_on and not self.holding:
            sigma2 = 0.0
        payload = {"version": self.version, "centres": centres, "sigma2": sigma2,
                   "stats": self.history[-1] if self.history else {}}
        if self.membership == "kmeans":
            payload["assignments"] = assignments
        return payload

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "held": int(self.seen.sum()),
            "watermark": list(self.watermark),
            "ingested_rows": self.ingested_rows,
            "rejected_rows": self.rejected_rows,
            "ingest_calls_by_rank": list(self.ingest_calls_by_rank),
            "history": list(self.history),
            "triggers": list(self.triggers),
            "restored": self.restored,
            "kmeans_on_gpu": self.gpu,
        }

    # ---- snapshots -----------------------------------------------------------------------------

    def snapshot(self) -> None:
        self.write_snapshot(self.snapshot_state())

    def snapshot_state(self) -> dict[str, Any]:
        """A consistent copy of what a snapshot holds (fast: one copy of the held rows), so the
        files can be written while ingestion goes on."""
        ids = np.flatnonzero(self.seen)
        return {"ids": ids, "activations": self.activations[ids], "centres": self.centres,
                "held_centres": self.held[0] if self.held is not None else None,
                "state": {"version": self.version, "sigma2": self.sigma2, "history": list(self.history),
                          "eq2_on": self.eq2_on, "held_sigma2": self.held[1] if self.held is not None else None,
                          "num_samples": len(self.seen), "dim": self.dim, "config": asdict(self.config),
                          "assignments": self.assignments.tolist() if self.assignments is not None else None,
                          "held_assignments": (self.held_assignments.tolist()
                                               if self.held_assignments is not None else None)}}

    def write_snapshot(self, data: dict[str, Any]) -> None:
        """Write a ``snapshot_state`` atomically: files go to a temporary folder renamed over the old one."""
        assert self.snapshot_dir is not None
        tmp = self.snapshot_dir.with_name(self.snapshot_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        table = pa.table({
            "sample_id": pa.array(data["ids"], pa.int64()),
            "a": pa.FixedSizeListArray.from_arrays(pa.array(data["activations"].reshape(-1)), self.dim),
        })
        pq.write_table(table, tmp / ACTIVATIONS_FILE)
        if data["centres"] is not None:
            np.save(tmp / CENTRES_FILE, data["centres"])
        if data["held_centres"] is not None:
            np.save(tmp / HELD_CENTRES_FILE, data["held_centres"])
        (tmp / STATE_FILE).write_text(json.dumps(data["state"]))
        old = self.snapshot_dir.with_name(self.snapshot_dir.name + ".old")
        if self.snapshot_dir.exists():
            os.replace(self.snapshot_dir, old)
        os.replace(tmp, self.snapshot_dir)
        if old.exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def _restore(self) -> bool:
        if not self.snapshot_dir:
            return False
        folder = self.snapshot_dir
        if not (folder / STATE_FILE).exists():
            old = folder.with_name(folder.name + ".old")  # a crash between the two renames
            if not (old / STATE_FILE).exists():
                return False
            folder = old
        try:
            state = json.loads((folder / STATE_FILE).read_text())
            table = pq.read_table(folder / ACTIVATIONS_FILE)
            ids = table.column("sample_id").to_numpy()
            flat = table.column("a").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            raise ValueError(f"centroid store snapshot {folder} is unreadable ({type(err).__name__}: {err}); "
                             "move it away to resume without it, or re-run with --fresh") from None
        if state["num_samples"] != len(self.seen) or state["dim"] != self.dim:
            raise ValueError(f"snapshot in {folder} holds {state['num_samples']} x {state['dim']} activations, "
                             f"this run needs {len(self.seen)} x {self.dim}: wrong --out or run name?")
        self.activations[ids] = flat.reshape(len(ids), self.dim)
        self.seen[ids] = True
        self.version = state["version"]
        self.sigma2 = state["sigma2"]
        self.history = state["history"]
        self.eq2_on = state.get("eq2_on", True)  # older snapshots had no stability condition
        if state["assignments"] is not None:
            self.assignments = np.asarray(state["assignments"], dtype=np.int64)
        if (folder / CENTRES_FILE).exists():
            self.centres = np.load(folder / CENTRES_FILE)
        if (folder / HELD_CENTRES_FILE).exists() and state.get("held_sigma2") is not None:
            self.held = (np.load(folder / HELD_CENTRES_FILE), state["held_sigma2"])
        if state.get("held_assignments") is not None:  # older snapshots: no held partition
            self.held_assignments = np.asarray(state["held_assignments"], dtype=np.int64)
        return True


@ray.remote(max_restarts=-1, max_task_retries=-1, runtime_env={"env_vars": STORE_ENV})
class CentroidStore:
    """The Ray actor around ``CentroidStoreImpl``: async, K-means and snapshot writes in worker threads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # a GPU only if Ray gave this actor one: Ray 2.60 hides no GPU from an actor that asked for none,
        # and one on a worker's node would otherwise take that worker's card (the pipeline asks for none)
        kwargs.setdefault("gpu", bool(ray.get_gpu_ids()))
        self.impl = CentroidStoreImpl(*args, **kwargs)
        self._published = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._writing = asyncio.Lock()  # one snapshot written at a time
        self._starved_warned = -1  # the version after which a starved K-means was last reported

    async def ingest(self, rank: int, step: int, sample_ids: np.ndarray, activations: np.ndarray,
                     complete: bool = True) -> None:
        self.impl.ingest(rank, step, sample_ids, activations, complete)
        self._maybe_cluster()

    async def mark(self, rank: int, step: int) -> None:
        self.impl.mark(rank, step)
        self._maybe_cluster()

    def _maybe_cluster(self) -> None:
        if self.impl.due():
            self.impl.running = True
            self._task = asyncio.get_running_loop().create_task(self._cluster())

    async def _cluster(self) -> None:
        try:
            ids, points = self.impl.take_batch()
            update = await asyncio.to_thread(self.impl.cluster, ids, points)
            self.impl.publish(update, snapshot=False)
        finally:
            self.impl.running = False
        async with self._published:
            self._published.notify_all()
        self._maybe_cluster()  # a later version may already be due
        if self.impl.snapshot_due():
            await self.snapshot()

    async def get_centres(self, version: int, rank: int, step: int, timeout: float) -> dict[str, Any] | None:
        """Centres of ``version`` (or newer); None if not ready within ``timeout`` seconds.

        The caller's step doubles as a watermark: a restarted store learns that the rank is past
        the trigger and can cluster what it holds instead of waiting for activations forever.
        """
        self.impl.mark(rank, step - 1)
        self._maybe_cluster()
        if self.impl.version < version and self.impl.starved():
            if self._starved_warned != self.impl.version:
                self._starved_warned = self.impl.version
                log.warning("K-means for step %d needs K=%d samples with a finite A(x), and only %d arrived "
                            "(%d non-finite rows refused); the run goes on with centres version %d",
                            self.impl.next_trigger(), self.impl.k, int(self.impl.seen.sum()),
                            self.impl.rejected_rows, self.impl.version)
            return None
        try:
            async with self._published:
                await asyncio.wait_for(self._published.wait_for(lambda: self.impl.version >= version), timeout)
        except TimeoutError:
            return None
        return self.impl.centres_payload()

    async def status(self) -> dict[str, Any]:
        return self.impl.status()

    async def snapshot(self) -> None:
        if self.impl.snapshot_dir:
            async with self._writing:
                await asyncio.to_thread(self.impl.write_snapshot, self.impl.snapshot_state())

    async def process_info(self) -> dict[str, Any]:
        """The store's process, for monitoring and benchmarks: pid, memory, CPU time, threads."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        import faiss

        return {"pid": os.getpid(), "peak_rss_mib": usage.ru_maxrss / 1024,
                "cpu_seconds": usage.ru_utime + usage.ru_stime, "faiss_threads": faiss.omp_get_max_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "activation_bytes": int(self.impl.activations.nbytes)}
