"""Memory: peak RSS of the centroid store holding N activations, and of a training worker.

    python bench/memory.py --json bench/results/memory.json

Each figure comes from a fresh child process (``ru_maxrss``), reported beside the RSS of the same
child after its imports, so the difference is what the store or the training holds:

- store: ``CentroidStoreImpl`` (the actor's logic) holding N activations of dimension D (float16,
  the default, or float32), then one K-means update as the actor runs it (it clusters a float32
  copy of the held rows);
- worker: ``--steps`` training steps of DR-A and DivDR-A (``bench/training.py``, the worker's step;
  DivDR with centres), batch 8 of 128x128 crops, for the model sizes asked.

A Ray Train worker's own peak RSS is reported by ``bench/ray_vs_plain.py``, the store actor's in the
scale simulation (``bench/store_scale.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cap_threads, finish, parser, peak_rss_mib, table


def _current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_store(n: int, dim: int, float16: bool, k: int) -> dict[str, Any]:
    import numpy as np

    from divdr.config import ClusteringConfig
    from pipeline.centroid_store import CentroidStoreImpl
    from pipeline.config import StoreConfig

    after_imports = _current_rss_mib()
    impl = CentroidStoreImpl(n, dim, 1, 100, ClusteringConfig(k=k), StoreConfig(float16=float16), None)
    rng = np.random.default_rng(0)
    chunk = 65536
    for i in range(0, n, chunk):
        rows = min(chunk, n - i)
        impl.ingest(0, 0, np.arange(i, i + rows), (rng.random((rows, dim), dtype=np.float32) * 0.9))
    holding = _current_rss_mib()
    t = time.perf_counter()
    impl.publish(impl.cluster(*impl.take_batch()), snapshot=False)
    return {"after_imports_mib": after_imports, "holding_mib": holding, "peak_mib": peak_rss_mib(),
            "buffer_mib": impl.activations.nbytes / 2**20, "update_s": time.perf_counter() - t}


def child_worker(preset: str, model_size: str, steps: int) -> dict[str, Any]:
    import torch

    from bench.training import StoreLink, Trainer, batches, experiment
    from pipeline.loop import CentreState

    torch.set_num_threads(1)
    after_imports = _current_rss_mib()
    cfg = experiment(preset, model_size, 8, 128, [f"train.steps={steps}"])
    link = None
    if cfg.clustering.weight:  # centres as after the first update; sends go nowhere (no store here)
        centres = CentreState(version=1, centres=torch.rand(cfg.clustering.k, cfg.model.a_dim), sigma2=1.0)
        link = StoreLink(store=None, sender=_NullSender(), centres=centres, triggers=[])
    trainer = Trainer(cfg, link)
    for batch in batches(cfg, steps, 1000)[:steps]:
        trainer.step(batch)
    return {"after_imports_mib": after_imports, "peak_mib": peak_rss_mib(),
            "parameters_m": sum(p.numel() for p in trainer.net.parameters()) / 1e6}


class _NullSender:
    def send(self, *args: Any, **kwargs: Any) -> None:
        pass


def _run_child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--child", nargs="+", help=argparse_suppress())
    p.add_argument("--ns", type=int, nargs="+", default=[3000, 30000, 118000, 1000000])
    p.add_argument("--dim", type=int, default=198)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--model-sizes", nargs="+", default=["tiny", "small"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    p.add_argument("--presets", nargs="+", default=["DR-A", "DivDR-A"])
    args = p.parse_args(argv)
    if args.child:
        cap_threads(1)
        kind, *rest = args.child
        if kind == "store":
            res = child_store(int(rest[0]), int(rest[1]), rest[2] == "float16", int(rest[3]))
        else:
            res = child_worker(rest[0], rest[1], int(rest[2]))
        print(json.dumps(res))
        return res
    if args.tiny:
        args.ns, args.dim, args.model_sizes, args.steps = [500], 16, ["micro"], 2
        args.dtypes, args.presets = ["float16"], ["DivDR-A"]
    started = time.perf_counter()
    store_rows = []
    for n in args.ns:
        for dtype in args.dtypes:
            res = _run_child(["store", str(n), str(args.dim), dtype, str(args.k)])
            row = {"N": n, "D": args.dim, "dtype": dtype, **res,
                   "held_mib": res["holding_mib"] - res["after_imports_mib"],
                   "peak_over_imports_mib": res["peak_mib"] - res["after_imports_mib"]}
            store_rows.append(row)
            print(f"store N={n} {dtype}: buffer {row['buffer_mib']:.1f} MiB, held {row['held_mib']:.1f} MiB, "
                  f"peak {row['peak_mib']:.0f} MiB (+{row['peak_over_imports_mib']:.0f} over imports), "
                  f"update {row['update_s']:.2f} s", flush=True)
    worker_rows = []
    for size in args.model_sizes:
        for preset in args.presets:
            res = _run_child(["worker", preset, size, str(args.steps)])
            row = {"model_size": size, "preset": preset, **res,
                   "peak_over_imports_mib": res["peak_mib"] - res["after_imports_mib"]}
            worker_rows.append(row)
            print(f"worker {size} {preset}: peak {row['peak_mib']:.0f} MiB "
                  f"(+{row['peak_over_imports_mib']:.0f} over imports)", flush=True)
    print(table(store_rows, ["N", "D", "dtype", "buffer_mib", "held_mib", "peak_mib", "peak_over_imports_mib"],
                {"buffer_mib": ".1f", "held_mib": ".1f", "peak_mib": ".0f", "peak_over_imports_mib": ".0f"}))
    print(table(worker_rows, ["model_size", "preset", "parameters_m", "peak_mib", "peak_over_imports_mib"],
                {"parameters_m": ".2f", "peak_mib": ".0f", "peak_over_imports_mib": ".0f"}))
    result = {"benchmark": "memory", "store": store_rows, "worker": worker_rows, "steps": args.steps,
              "worker_batch": 8, "worker_crop": 128}
    return finish(result, args.json, started)


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
