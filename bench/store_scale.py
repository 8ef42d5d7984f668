"""Scale of the centroid store, by simulation: one store fed by many simulated workers.

    python bench/store_scale.py --json bench/results/store_scale.json

On 2 cores, many simulated senders are themselves a limit, so the store's own cost is measured
apart from the senders' and the worker count it can serve is derived from it:

1. in-process (the code the actor runs, no Ray): one ``ingest`` of a batch (8 x D float16), the
   copy K-means takes, one update (FAISS K-means + diagnostics; Intra exact and as the store
   estimates it), one snapshot;
2. the actor as ``pipeline/train.py`` creates it, flooded by sender actors as fast as they can
   send: the store process's CPU seconds per ingest call (Ray's per-call work included);
3. a paced simulation: ``--workers`` simulated workers (``ActivationSender`` each, as the real
   workers) x ``--images`` per step every ``--step-time`` s, against a store holding N activations
   that re-clusters every ``--update-every`` steps; simulated rank 0 fetches each version at its
   switch step as the real rank 0 does. Reported: ingestion rate, K-means update times, the
   store's memory, how long senders were blocked, how long rank 0 waited at switch steps.

Derived limit: the store's event loop is one thread, so it keeps up while
``workers x cpu_per_call < step_time`` (busy fraction < 1), and an update must fit in
``switch_lag`` steps for rank 0 never to wait.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import cap_threads, finish, median, parser

ASSUMED_STEP_TIMES = (0.1, 0.25, 0.5)  # seconds per training step on a GPU worker (see docs/benchmarks.md)


def _fill(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    patterns = np.where(rng.random((6, dim)) < 0.5, 0.9, -0.3)
    x = patterns[rng.integers(0, 6, n)] + 0.15 * rng.standard_normal((n, dim))
    return np.clip(x, 0.0, 0.999).astype(np.float16)


def in_process_costs(n: int, dim: int, k: int, images: int, calls: int, exact_intra: bool) -> dict[str, Any]:
    from divdr import clustering
    from divdr.config import ClusteringConfig
    from pipeline.centroid_store import CentroidStoreImpl
    from pipeline.config import StoreConfig

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        impl = CentroidStoreImpl(n, dim, 64, 1000, ClusteringConfig(k=k), StoreConfig(), f"{folder}/store")
        impl.ingest(0, -1, np.arange(n), _fill(n, dim), complete=False)
        rng = np.random.default_rng(1)
        acts = _fill(images, dim, 2)
        times = []
        for i in range(calls):
            ids = rng.integers(0, n, images)
            t = time.perf_counter()
            impl.ingest(i % 64, i // 64, ids, acts)
            times.append(time.perf_counter() - t)
        out["ingest_call_us"] = median(times) * 1e6
        t = time.perf_counter()
        ids, points = impl.take_batch()
        out["take_batch_s"] = time.perf_counter() - t
        t = time.perf_counter()
        update = impl.cluster(ids, points)
        out["update_s"] = time.perf_counter() - t
        out["update_kmeans_s"] = update["stats"]["kmeans_seconds"]
        out["update_diagnostics_s"] = out["update_s"] - out["update_kmeans_s"]
        t = time.perf_counter()
        clustering.intra_distance(points, update["assignments"][ids],
                                  max_points_per_cluster=impl.config.intra_sample or None)
        out["intra_sampled_s"] = time.perf_counter() - t
        out["intra_sample"] = impl.config.intra_sample
        if exact_intra:
            t = time.perf_counter()
            clustering.intra_distance(points, update["assignments"][ids])
            out["intra_exact_s"] = time.perf_counter() - t
        impl.publish(update, snapshot=False)
        t = time.perf_counter()
        state = impl.snapshot_state()
        out["snapshot_copy_s"] = time.perf_counter() - t
        t = time.perf_counter()
        impl.write_snapshot(state)
        out["snapshot_write_s"] = time.perf_counter() - t
    return out


def _make_store(n: int, dim: int, world: int, steps: int, k: int, update_every: int, switch_lag: int,
                folder: str | None):
    """The store exactly as ``pipeline.train.run`` creates it (same class, options), pre-filled."""
    import ray

    from divdr.config import ClusteringConfig
    from pipeline.centroid_store import CentroidStore
    from pipeline.config import StoreConfig

    store = CentroidStore.options(num_cpus=0).remote(n, dim, world, steps, ClusteringConfig(k=k,
                                                     update_every=update_every),
                                                     StoreConfig(switch_lag=switch_lag), folder, 0)
    fill = _fill(n, dim)
    chunk = 8192
    ray.get([store.ingest.remote(0, -1, np.arange(i, min(i + chunk, n)), fill[i:i + chunk], False)
             for i in range(0, n, chunk)])
    return store


class SimulatedWorkers:
    """Several simulated training workers in one process: each rank sends its batch's A(x) every
    step through its own ``ActivationSender`` (bounded in-flight calls, as the real worker)."""

    def __init__(self, store: Any, ranks: list[int], world: int, n: int, dim: int, images: int, limit: int) -> None:
        import torch

        from pipeline.worker import ActivationSender

        torch.set_num_threads(1)
        self.store, self.ranks, self.world, self.n, self.images = store, ranks, world, n, images
        self.senders = {r: ActivationSender(store, r, limit, True) for r in ranks}
        self.acts = _fill(images, dim, 3).astype(np.float32)

    def _ids(self, rank: int, step: int) -> list[int]:
        base = (step * self.world + rank) * self.images
        return [(base + j) % self.n for j in range(self.images)]

    def flood(self, seconds: float) -> int:
        """Send as fast as possible for ``seconds``; returns the calls made."""
        calls, step, end = 0, 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            for r in self.ranks:
                self.senders[r].send(step, self._ids(r, step), self.acts)
                calls += 1
            step += 1
        for s in self.senders.values():
            s.flush()
        return calls

    def paced(self, steps: int, step_time: float, start_at: float, switch: dict[int, int] | None,
              switch_timeout: float) -> dict[str, Any]:
        """``steps`` steps every ``step_time`` s from wall-clock ``start_at``. ``switch`` maps a
        switch step to the version simulated rank 0 fetches there (as the real rank 0)."""
        import ray

        while time.time() < start_at:
            time.sleep(0.001)
        t0 = time.perf_counter()
        send_s, late_steps, waits, at_limit = [], 0, [], 0
        for step in range(steps):
            tick = t0 + step * step_time
            now = time.perf_counter()
            if now < tick:
                time.sleep(tick - now)
            elif now - tick > step_time:
                late_steps += 1
            if switch and step in switch:
                t = time.perf_counter()
                ray.get(self.store.get_centres.remote(switch[step], 0, step, switch_timeout))
                waits.append({"step": step, "version": switch[step], "seconds": time.perf_counter() - t})
            for r in self.ranks:
                sender = self.senders[r]
                if len(sender.in_flight) >= sender.limit:  # this send waits for the oldest reply, if not in yet
                    ready, _ = ray.wait([sender.in_flight[0]], timeout=0)
                    at_limit += not ready
                t = time.perf_counter()
                sender.send(step, self._ids(r, step), self.acts)
                send_s.append(time.perf_counter() - t)
        sent_end = time.perf_counter()
        for s in self.senders.values():
            s.flush()
        return {"send_ms_median": median(send_s) * 1e3, "send_ms_max": max(send_s) * 1e3,
                "sends_over_10ms": int(sum(s > 0.01 for s in send_s)), "sends": len(send_s),
                "late_steps": late_steps, "sends_blocked": at_limit, "seconds": sent_end - t0,
                "flush_s": time.perf_counter() - sent_end,
                "switch_waits": waits,
                "dropped": sum(s.failures for s in self.senders.values())}


def _split(ranks: int, groups: int) -> list[list[int]]:
    return [list(range(g, ranks, groups)) for g in range(groups)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=118_000, help="activations the store holds (COCO train: 118k)")
    p.add_argument("--dim", type=int, default=198, help="A-space dimension (COCO Layer17: 198)")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--images", type=int, default=8, help="images per worker per step")
    p.add_argument("--workers", type=int, default=64, help="simulated workers in the paced run")
    p.add_argument("--senders", type=int, default=2, help="sender processes the simulated workers share")
    p.add_argument("--step-time", type=float, default=0.5, help="seconds per step in the paced run")
    p.add_argument("--steps", type=int, default=110, help="steps in the paced run")
    p.add_argument("--update-every", type=int, default=50)
    p.add_argument("--switch-lag", type=int, default=2)
    p.add_argument("--flood-seconds", type=float, default=10.0)
    p.add_argument("--calls", type=int, default=3000, help="in-process ingest calls timed")
    p.add_argument("--no-exact-intra", action="store_true", help="skip timing the exact O(N^2) Intra")
    p.add_argument("--in-flight", type=int, default=8, help="ActivationSender's bound on unanswered sends")
    args = p.parse_args(argv)
    if args.tiny:
        args.n, args.dim, args.workers, args.steps, args.update_every = 2000, 16, 4, 8, 3
        args.flood_seconds, args.calls, args.step_time = 0.5, 50, 0.05
    started = time.perf_counter()
    cap_threads(args.threads)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    result: dict[str, Any] = {"benchmark": "store_scale", "n": args.n, "dim": args.dim, "k": args.k,
                              "images": args.images, "workers": args.workers, "senders": args.senders,
                              "step_time": args.step_time, "steps": args.steps, "update_every": args.update_every,
                              "switch_lag": args.switch_lag, "in_flight": args.in_flight, "threads": args.threads}
    print("1. in-process costs ...", flush=True)
    result["in_process"] = local = in_process_costs(args.n, args.dim, args.k, args.images, args.calls,
                                                    not args.no_exact_intra)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in local.items()}, flush=True)

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    Sim = ray.remote(num_cpus=0)(SimulatedWorkers)
    try:
        print("2. flood: the store's CPU per ingest call ...", flush=True)
        store = _make_store(args.n, args.dim, args.workers, 10**6, args.k, 10**6, args.switch_lag, None)
        info0 = ray.get(store.process_info.remote())
        sims = [Sim.options(scheduling_strategy=here).remote(store, g, args.workers, args.n, args.dim, args.images,
                                                             args.in_flight)
                for g in _split(args.workers, args.senders)]
        ray.get([s.flood.remote(0.2) for s in sims])  # warm-up: imports, first calls
        before = ray.get(store.status.remote())["ingested_rows"]
        info1 = ray.get(store.process_info.remote())
        t = time.perf_counter()
        calls = sum(ray.get([s.flood.remote(args.flood_seconds) for s in sims]))
        elapsed = time.perf_counter() - t
        info2 = ray.get(store.process_info.remote())
        rows = ray.get(store.status.remote())["ingested_rows"] - before
        cpu = info2["cpu_seconds"] - info1["cpu_seconds"]
        flood = {"calls": calls, "seconds": elapsed, "calls_per_s": calls / elapsed, "rows_per_s": rows / elapsed,
                 "store_cpu_s": cpu, "store_cpu_per_call_us": cpu / calls * 1e6,
                 "store_busy_fraction": cpu / elapsed, "faiss_threads": info0["faiss_threads"],
                 "omp_wait_policy": info0["omp_wait_policy"]}
        result["flood"] = flood
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in flood.items()}, flush=True)
        for s in sims:
            ray.kill(s)
        ray.kill(store, no_restart=True)

        print(f"3. paced: {args.workers} workers x {args.images} images every {args.step_time} s ...", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            store = _make_store(args.n, args.dim, args.workers, args.steps, args.k, args.update_every,
                                args.switch_lag, f"{folder}/store")
            info_start = ray.get(store.process_info.remote())
            groups = _split(args.workers, args.senders)
            sims = [Sim.options(scheduling_strategy=here).remote(store, g, args.workers, args.n, args.dim,
                                                                 args.images, args.in_flight) for g in groups]
            ray.get([s.flood.remote(0.0) for s in sims])  # constructed and imported before the clock starts
            triggers = ray.get(store.status.remote())["triggers"]
            switch = {t + args.switch_lag: v + 1 for v, t in enumerate(triggers) if t + args.switch_lag < args.steps}
            start_at = time.time() + 1.0
            t = time.perf_counter()
            reports = ray.get([s.paced.remote(args.steps, args.step_time, start_at, switch if 0 in g else None, 60.0)
                               for s, g in zip(sims, groups, strict=True)])
            elapsed = time.perf_counter() - t - 1.0
            status = ray.get(store.status.remote())
            info_end = ray.get(store.process_info.remote())
            ray.kill(store, no_restart=True)
        history = status["history"]
        paced = {
            "rows_ingested": status["ingested_rows"] - args.n,
            "rows_expected": args.workers * args.images * args.steps,
            "seconds": elapsed,
            "rows_per_s": (status["ingested_rows"] - args.n) / elapsed,
            "rows_per_s_offered": args.workers * args.images / args.step_time,
            "store_busy_fraction": (info_end["cpu_seconds"] - info_start["cpu_seconds"]) / elapsed,
            "updates": [{"version": h["version"], "trigger_step": h["trigger_step"], "seconds": h["seconds"],
                         "kmeans_seconds": h.get("kmeans_seconds"), "points": h["points"]} for h in history],
            "store_peak_rss_mib": info_end["peak_rss_mib"],
            "store_activation_mib": info_end["activation_bytes"] / 2**20,
            "senders": reports,
            "send_ms_max": max(r["send_ms_max"] for r in reports),
            "sends_over_10ms": sum(r["sends_over_10ms"] for r in reports),
            "late_steps": max(r["late_steps"] for r in reports),
            "sends_blocked": sum(r["sends_blocked"] for r in reports),
            "switch_waits": [w for r in reports for w in r["switch_waits"]],
            "dropped_sends": sum(r["dropped"] for r in reports),
        }
        result["paced"] = paced
        print({k: v for k, v in paced.items() if k != "senders"}, flush=True)
    finally:
        if own_ray:
            ray.shutdown()

    per_call = flood["store_cpu_per_call_us"] / 1e6
    update_s = median([u["seconds"] for u in paced["updates"]]) if paced["updates"] else local["update_s"]
    limits = []
    for step_time in sorted({*ASSUMED_STEP_TIMES, args.step_time}):
        limits.append({"step_time": step_time,
                       "workers_at_full_busy": step_time / per_call,
                       "busy_at_64_workers": 64 * per_call / step_time,
                       "update_fits_switch_lag": update_s <= args.switch_lag * step_time,
                       "update_fits_period": update_s <= args.update_every * step_time,
                       "min_switch_lag": math.ceil(update_s / step_time)})
    result["limits"] = limits
    result["update_seconds_used"] = update_s
    for row in limits:
        print(f"step {row['step_time']:.2f} s: ingestion saturates at {row['workers_at_full_busy']:.0f} workers "
              f"(64 workers -> {row['busy_at_64_workers']:.0%} busy); update {update_s:.2f} s fits the switch lag: "
              f"{row['update_fits_switch_lag']}, the period: {row['update_fits_period']} "
              f"(switch_lag >= {row['min_switch_lag']} hides it)")
    return finish(result, args.json, started)


if __name__ == "__main__":
    main()
