"""Train a DR / DivDR network with Ray Train: ``python pipeline/train.py [options]``.

With no argument it trains the default preset on the embedded controlled study (generated on first
use into a cache folder) on a local Ray; with RAY_ADDRESS set (``ray job submit``) it joins the
cluster. Everything the run writes goes under ``--out`` (default ``runs/``): checkpoints, centroid
store snapshots, the local MLflow store, and the run's artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from divdr.config import PRESETS, ConfigError
from pipeline import tracking
from pipeline.columns import format_table
from pipeline.config import ExperimentConfig, resolve, with_data_root, with_smoke
from pipeline.faults import faults_from_env
from pipeline.tasks import make_task

MIN_FREE_BYTES = 200 * 2**20  # refuse to start a run with less free disk than this in --out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline/train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="DR-A ... DivDR-Raw (default DivDR-A)")
    parser.add_argument("--config", type=Path, help="YAML experiment file of overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one value, e.g. --set clustering.k=4 (repeatable)")
    parser.add_argument("--data", type=Path, help="dataset root: Cityscapes layout, or COCO layout for task "
                        "detection / instance (default: the embedded study in that layout)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="output folder (default runs/)")
    parser.add_argument("--name", help="run name (default: <preset>-seed<seed>); the same name resumes")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite under --out)")
    parser.add_argument("--smoke", action="store_true", help="tiny everything: the whole path in about a minute")
    parser.add_argument("--fresh", action="store_true", help="delete an existing run of the same name first")
    parser.add_argument("--local", action="store_true",
                        help="train in this process, without Ray: the same loop, the centroid store's logic "
                             "in-process (one worker; scaling.* is ignored)")
    return parser


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    base: dict[str, Any] = with_smoke({}) if args.smoke else {}
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"name={args.name}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.data:
        overrides.append(f"data.root={args.data.resolve()}")
    return resolve(args.preset, args.config, overrides, base=base)


def check_output_folder(out: Path) -> None:
    """Fail before any training if the output folder cannot hold the run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output folder {out} is not writable: {err}") from err
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"output folder {out} has only {free / 2**20:.0f} MiB free; "
                          f"a run needs at least {MIN_FREE_BYTES / 2**20:.0f} MiB")


def with_dataset(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``data.root`` set: its own, or the embedded study, generated on first use (the same
    scenes as Cityscapes-layout segmentation or COCO-format instances)."""
    if cfg.data.root:
        return with_data_root(cfg, cfg.data.root)
    from divdr.data.synthetic import ensure_default_dataset

    return with_data_root(cfg, ensure_default_dataset(kind="seg" if cfg.task == "segmentation" else "det"))


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (ray job submit sets it), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        # the dashboard (on 127.0.0.1) serves the State API that Ray Train's clean-up polls;
        # logical CPUs are oversubscribed so workers, store and tracker never wait on each other
        ray.init(num_cpus=max(4, os.cpu_count() or 1))


def run(cfg: ExperimentConfig, out: Path, parent_run_id: str | None = None, fresh: bool = False,
        faults: str | None = None, local: bool = False) -> dict[str, Any]:
    """One training run of ``cfg`` on its ``data.root`` (the embedded study if unset): tracking, then Ray
    Train (TorchTrainer.fit with its centroid store actor) or, with ``local``, the same loop in this
    process (``pipeline.local``); the final metrics."""
    cfg = with_dataset(cfg)
    out = out.resolve()
    run_dir = out / cfg.run_name
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    check_output_folder(run_dir)
    task = make_task(cfg)  # missing splits, bad annotation files, mismatched categories fail here
    task.train_dataset()
    task.split_size("val")  # a missing or empty val split fails here, before training
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    uri = cfg.tracking.uri or tracking.local_tracking_uri(out)
    run_id = tracking.start_or_resume_run(uri, cfg.tracking.experiment, cfg.run_name, run_dir, out,
                                          tags={"preset": cfg.preset, "runner": "local" if local else "ray"},
                                          parent_run_id=parent_run_id)
    logger = tracking.RunLogger(uri, run_id, run_dir)
    logger.params(cfg.flat())
    logger.artifact(run_dir / "config.yaml")
    started = time.perf_counter()
    if local:
        from pipeline.local import run_local

        status = "FAILED"
        try:
            metrics = run_local(cfg, run_dir, uri, run_id)
            status = "FINISHED"
        finally:
            logger.finish(status)
    else:
        metrics = _run_ray(cfg, out, run_dir, uri, run_id, logger, faults)
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["run_dir"] = str(run_dir)
    metrics["mlflow_run_id"] = run_id
    metrics["tracking_uri"] = uri
    (run_dir / "result.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def _run_ray(cfg: ExperimentConfig, out: Path, run_dir: Path, uri: str, run_id: str,
             logger: tracking.RunLogger, faults: str | None) -> dict[str, Any]:
    """TorchTrainer.fit with the run's tracker and centroid store actors."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.centroid_store import CentroidStore, store_name
    from pipeline.worker import train_loop_per_worker

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tracker = ray.remote(num_cpus=0)(tracking.Tracker).options(scheduling_strategy=here).remote(
        uri, run_id, str(run_dir))
    store = None  # store.enabled=false: DR trained with no centroid store
    if cfg.store.enabled:
        num_samples = len(make_task(cfg).train_dataset())
        store = CentroidStore.options(name=store_name(cfg.run_name), num_cpus=0, get_if_exists=True,
                                      scheduling_strategy=here).remote(
            num_samples, cfg.model.a_dim, cfg.scaling.workers, cfg.train.steps, cfg.clustering, cfg.store,
            str(run_dir / "store"), cfg.train.seed)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg, "store": store, "tracker": tracker,
                           "run_dir": str(run_dir), "faults": faults_from_env() if faults is None else faults},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu,
                                        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run_name, storage_path=cfg.storage.path or str(out / "ray_results"),
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
        # the tracker (on this node) wrote rank 0's final metrics; Result.metrics only holds the
        # last report that carried a checkpoint
        final_file = run_dir / "artifacts" / "final_metrics.json"
        metrics = json.loads(final_file.read_text()) if final_file.exists() else dict(result.metrics or {})
        metrics["store"] = ray.get(store.status.remote()) if store is not None else None
    finally:
        # a failed run keeps its store snapshot and checkpoints: re-running the command resumes
        if store is not None:
            ray.get(store.snapshot.remote())
        logger.finish(status)
        ray.kill(tracker)
        if store is not None:
            ray.kill(store, no_restart=True)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
        check_output_folder(args.out)
    except ConfigError as err:
        print(f"pipeline/train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("Resolved configuration:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    cfg = with_dataset(cfg)
    if not args.local:
        init_ray()
    metrics = run(cfg, args.out, fresh=args.fresh, local=args.local)
    print(format_table({cfg.run_name: metrics}))
    print(f"run folder: {metrics['run_dir']}  (MLflow run {metrics['mlflow_run_id']} at {metrics['tracking_uri']})")
    return metrics


if __name__ == "__main__":
    main()
