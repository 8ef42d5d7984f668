"""Step time of DivDR against DR on the same net and data, and the streaming overhead.

    python bench/step_time.py --json bench/results/step_time.json

Three variants of one training step (``bench/training.py``: the worker's step, outside Ray Train),
each with its own copy of the same initial network, run in interleaved blocks:

- ``DR``: DR-A, the store disabled (nothing streamed, no K-means): the baseline;
- ``DR+store``: DR-A streaming every batch's A(x) to a real centroid-store actor that re-clusters
  every ``clustering.update_every`` steps (the streaming overhead: DR+store / DR);
- ``DivDR``: DivDR-A: clustering loss against the store's centres, streaming, K-means updates and the
  centre switch at the schedule's steps (DivDR / DR).

A block's figure is its mean step time, so the K-means updates and centre fetches inside it are
amortised. The store runs in its own process (as in the pipeline); its K-means seconds are also
added to DivDR's time as if they had run on the worker's own core (the "serial" ratio, an upper bound).
Each store starts pre-filled with N activations (default 2975, Cityscapes' train split).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cap_threads, finish, interleaved, median, parser, ratio_summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--block", type=int, default=25, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=8, help="blocks per variant (interleaved)")
    p.add_argument("--num-samples", type=int, default=2975, help="activations the store holds (N)")
    p.add_argument("--update-every", type=int, default=50, help="K-means period in steps (paper: 50)")
    args = p.parse_args(argv)
    if args.tiny:
        args.model_size, args.batch, args.crop, args.block, args.rounds = "micro", 2, 64, 3, 2
        args.num_samples, args.update_every = 64, 2
    started = time.perf_counter()
    cap_threads(args.threads)
    import ray

    from bench.training import Trainer, batches, experiment, start_store

    steps = args.block * args.rounds + 3
    extra = [f"train.steps={steps}", f"clustering.update_every={args.update_every}", "store.switch_lag=2"]
    cfg_dr = experiment("DR-A", args.model_size, args.batch, args.crop, extra)
    cfg_div = experiment("DivDR-A", args.model_size, args.batch, args.crop, extra)
    data = batches(cfg_dr, 8, args.num_samples)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    snapshots = tempfile.TemporaryDirectory()
    try:
        links = {"DR+store": start_store(cfg_dr, args.num_samples, f"{snapshots.name}/dr"),
                 "DivDR": start_store(cfg_div, args.num_samples, f"{snapshots.name}/divdr")}
        trainers = {"DR": Trainer(cfg_dr), "DR+store": Trainer(cfg_dr, links["DR+store"]),
                    "DivDR": Trainer(cfg_div, links["DivDR"])}
        counters = dict.fromkeys(trainers, 0)
        clu_values: list[float] = []
        for name, trainer in trainers.items():  # warm-up: first-call allocations, not timed
            for _ in range(3):
                trainer.step(data[counters[name] % len(data)])
                counters[name] += 1

        def block(name: str):
            def run() -> float:
                trainer = trainers[name]
                t = time.perf_counter()
                for _ in range(args.block):
                    clu = trainer.step(data[counters[name] % len(data)])
                    counters[name] += 1
                    if name == "DivDR":
                        clu_values.append(clu)
                return (time.perf_counter() - t) / args.block
            return run

        times = interleaved({name: block(name) for name in trainers}, args.rounds)
        for link in links.values():
            link.sender.flush()
        status = {name: ray.get(link.store.status.remote()) for name, link in links.items()}
    finally:
        if own_ray:
            ray.shutdown()
        snapshots.cleanup()
    kmeans_seconds = {name: [h["seconds"] for h in s["history"]] for name, s in status.items()}
    timed_steps = args.block * args.rounds
    serial = [t + sum(kmeans_seconds["DivDR"]) / timed_steps for t in times["DivDR"]]
    result = {
        "benchmark": "step_time", "model_size": args.model_size, "batch": args.batch, "crop": args.crop,
        "threads": args.threads, "block": args.block, "rounds": args.rounds, "num_samples": args.num_samples,
        "update_every": args.update_every, "a_dim": cfg_dr.model.a_dim,
        "step_seconds": {name: {"median": median(v), "blocks": v} for name, v in times.items()},
        "divdr_over_dr": ratio_summary(times["DivDR"], times["DR"]),
        "divdr_over_dr_serial_kmeans": ratio_summary(serial, times["DR"]),
        "streaming_overhead": ratio_summary(times["DR+store"], times["DR"]),
        "divdr_over_dr_store": ratio_summary(times["DivDR"], times["DR+store"]),
        "kmeans_updates": {name: len(v) for name, v in kmeans_seconds.items()},
        "kmeans_seconds": kmeans_seconds,
        "clustering_loss_active_fraction": (sum(v > 0 for v in clu_values) / len(clu_values)) if clu_values else 0.0,
        "store_ingested_rows": {name: s["ingested_rows"] for name, s in status.items()},
    }
    for name, v in result["step_seconds"].items():
        print(f"{name:9s} median step {v['median'] * 1e3:.1f} ms")
    for key in ("divdr_over_dr", "divdr_over_dr_serial_kmeans", "streaming_overhead", "divdr_over_dr_store"):
        r = result[key]
        print(f"{key:28s} {r['median']:.3f} (per-round min {r['min']:.3f}, max {r['max']:.3f})")
    print(f"K-means updates {result['kmeans_updates']}, seconds {kmeans_seconds}")
    return finish(result, args.json, started)


if __name__ == "__main__":
    main()
