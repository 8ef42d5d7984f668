"""Ray Train with 2 workers against a plain single-process PyTorch loop of the same model on the
same cores: training images per second.

    python bench/ray_vs_plain.py --json bench/results/ray_vs_plain.json

- plain: one process, ``--workers`` torch threads, batch ``workers x batch``, no DDP, no Ray;
- Ray: a ``TorchTrainer`` with ``--workers`` workers (1 torch thread each, DDP over gloo), batch
  ``--batch`` each, so the same global batch on the same cores;
- plain, 1 thread: one process, 1 torch thread, batch ``--batch``; its rate times ``--workers`` is
  what perfect data-parallel scaling on these cores would give (a stricter reference: a 2-thread
  process loses to intra-op synchronisation, more so on a shared machine).

Both run the same step (``bench/training.py``: DR-A, no store) on the same in-memory batches; the
throughput is taken over the steps after ``--warmup`` (Ray's start-up, the process group and the
first steps are reported apart). Runs alternate plain, Ray, plain, Ray, ...; the headline is the
median of the per-round ratios Ray / plain. Each Ray worker also reports its peak RSS.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cap_threads, finish, interleaved, median, parser, peak_rss_mib, ratio_summary


def _timed_steps(trainer: Any, data: list[Any], steps: int, warmup: int, barrier: Any = None) -> float:
    """Seconds for ``steps`` steps after ``warmup`` untimed ones."""
    for i in range(warmup):
        trainer.step(data[i % len(data)])
    if barrier is not None:
        barrier()
    t = time.perf_counter()
    for i in range(steps):
        trainer.step(data[(warmup + i) % len(data)])
    if barrier is not None:
        barrier()
    return time.perf_counter() - t


def ray_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from bench.training import Trainer, batches, experiment

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    cfg = experiment("DR-A", config["model_size"], config["batch"], config["crop"],
                     [f"train.steps={config['steps'] + config['warmup']}"])
    data = batches(cfg, 4, 10_000, seed=rank)
    trainer = Trainer(cfg, wrap=ray.train.torch.prepare_model)
    seconds = _timed_steps(trainer, data, config["steps"], config["warmup"], dist.barrier)
    # Ray Train V2 keeps only reports that carry a checkpoint in Result.metrics: a file instead
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"seconds": seconds,
                                                                   "peak_rss_mib": peak_rss_mib()}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--batch", type=int, default=8, help="per Ray worker (plain: workers x batch)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "default"], default="default",
                   help="OMP_WAIT_POLICY for torch's OpenMP threads (set before torch and Ray start)")
    args = p.parse_args(argv)
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    if args.tiny:
        args.model_size, args.batch, args.crop, args.steps, args.warmup, args.rounds = "micro", 2, 64, 2, 1, 1
    started = time.perf_counter()
    cap_threads(args.workers)  # the plain loop uses every core the Ray workers get
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bench.training import Trainer, batches, experiment

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=max(4, args.workers), include_dashboard=False, log_to_driver=False)
    images = args.steps * args.batch * args.workers
    extras: dict[str, list[float]] = {"ray_fit_seconds": [], "ray_worker_peak_rss_mib": []}
    storage = tempfile.TemporaryDirectory()

    def plain() -> float:
        cfg = experiment("DR-A", args.model_size, args.batch * args.workers, args.crop,
                         [f"train.steps={args.steps + args.warmup}"])
        trainer = Trainer(cfg)
        return images / _timed_steps(trainer, batches(cfg, 4, 10_000), args.steps, args.warmup)

    def plain_one_thread() -> float:
        import torch

        torch.set_num_threads(1)
        try:
            cfg = experiment("DR-A", args.model_size, args.batch, args.crop,
                             [f"train.steps={args.steps + args.warmup}"])
            trainer = Trainer(cfg)
            seconds = _timed_steps(trainer, batches(cfg, 4, 10_000), args.steps, args.warmup)
        finally:
            torch.set_num_threads(args.workers)
        return args.workers * args.steps * args.batch / seconds

    def with_ray() -> float:
        out = tempfile.mkdtemp(dir=storage.name)
        trainer = TorchTrainer(
            ray_loop, train_loop_config=vars(args) | {"json": None, "out": out},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"bench-{time.time_ns()}", storage_path=storage.name))
        t = time.perf_counter()
        trainer.fit()
        extras["ray_fit_seconds"].append(time.perf_counter() - t)
        ranks = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
        extras["ray_worker_peak_rss_mib"].append(max(r["peak_rss_mib"] for r in ranks))
        return images / max(r["seconds"] for r in ranks)

    try:
        rates = interleaved({"plain": plain, "ray": with_ray, "plain_1thread_x_workers": plain_one_thread},
                            args.rounds)
    finally:
        if own_ray:
            ray.shutdown()
        storage.cleanup()
    result = {
        "benchmark": "ray_vs_plain", "model_size": args.model_size, "batch_per_worker": args.batch,
        "crop": args.crop, "workers": args.workers, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "images_per_s": {name: {"median": median(v), "runs": v} for name, v in rates.items()},
        "ray_over_plain": ratio_summary(rates["ray"], rates["plain"]),
        "ray_over_perfect_scaling": ratio_summary(rates["ray"], rates["plain_1thread_x_workers"]),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "ray_fit_seconds": extras["ray_fit_seconds"],
        "ray_fit_overhead_seconds": [f - images / r for f, r in zip(extras["ray_fit_seconds"], rates["ray"],
                                                                     strict=True)],
        "ray_worker_peak_rss_mib": extras["ray_worker_peak_rss_mib"],
        "plain_process_peak_rss_mib": peak_rss_mib(),
    }
    for name, v in result["images_per_s"].items():
        print(f"{name:6s} {v['median']:.1f} images/s (runs {[round(x, 1) for x in v['runs']]})")
    for key in ("ray_over_plain", "ray_over_perfect_scaling"):
        r = result[key]
        print(f"{key}: {r['median']:.3f} (per-round min {r['min']:.3f}, max {r['max']:.3f})")
    print(f"fit() takes {median(extras['ray_fit_seconds']):.1f} s in all")
    return finish(result, args.json, started)


if __name__ == "__main__":
    main()
