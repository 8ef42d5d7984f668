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
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from divdr.config import PRESETS, ConfigError
from divdr.data.errors import DatasetError
from pipeline import tracking
from pipeline.cli_args import add_common, add_local, data_overrides, parser_for, persistent_out, preset_help
from pipeline.columns import format_table
from pipeline.config import ExperimentConfig, redact_uri, resolve, with_absolute_paths, with_data_root, with_smoke
from pipeline.faults import faults_from_env
from pipeline.model_file import ModelFileError
from pipeline.run_folder import (
    Existing,
    RunFolderError,
    RunState,
    check_resumable,
    checkpoint_folder,
    delete_run,
    finished_message,
    run_lock,
    run_state,
    stored_result,
)
from pipeline.tasks import limit, make_task

MIN_FREE_BYTES = 200 * 2**20  # refuse to start a run with less free disk than this in --out


def build_parser() -> argparse.ArgumentParser:
    parser = parser_for("pipeline/train.py", __doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), metavar="PRESET", help=preset_help("DivDR-A"))
    add_common(parser)
    parser.add_argument("--name", help="run name, a folder under --out (default: <preset>-seed<seed>)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--fresh", action="store_true",
                       help="train from scratch: delete the run of the same name (its folder and checkpoints) first")
    again.add_argument("--resume", action="store_true",
                       help="resume the run of the same name; if it already finished, print its stored result")
    add_local(parser)
    return parser


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    base: dict[str, Any] = with_smoke({}) if args.smoke else {}
    overrides = [*data_overrides(args), *args.overrides, *([f"name={args.name}"] if args.name else [])]
    return resolve(args.preset, args.config, overrides, base=base)


def check_output_folder(out: Path) -> None:
    """Fail before any training if the output folder cannot hold the run."""
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConfigError(f"output folder {out}: {blocking} is a file, not a folder")
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
    """Join a running cluster: the one RAY_ADDRESS names (``ray job submit`` sets it) or the one ``ray start``
    registered on this machine, asking for no resources (a cluster has its own: Ray refuses num_cpus
    there). Else start a local Ray with logical CPUs oversubscribed, so workers, store and tracker never
    wait on each other; its dashboard (on 127.0.0.1) serves the State API Ray Train's clean-up polls."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") or registered_cluster():
        ray.init()
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1))


def registered_cluster() -> str | None:
    """The address of the cluster ``ray start`` last registered on this machine, if any."""
    try:
        from ray._private.services import find_bootstrap_address  # where ray.init() itself looks
    except ImportError:
        return None
    return find_bootstrap_address(None) or None


def check_store_fits(cfg: ExperimentConfig, train_images: int) -> None:
    """K-means needs at least K training images: refuse before training, not after (a store that cannot
    cluster leaves every step waiting for centres that never come)."""
    if cfg.store.enabled and cfg.clustering.k > train_images:
        raise ConfigError(f"clustering.k = {cfg.clustering.k} needs at least {cfg.clustering.k} training images; "
                          f"the run trains on {train_images} (data.max_train_images = {cfg.data.max_train_images}, "
                          f"data {cfg.data.root})")


def run(cfg: ExperimentConfig, out: Path, parent_run_id: str | None = None, existing: Existing = "continue",
        faults: str | None = None, local: bool = False) -> dict[str, Any]:
    """One training run of ``cfg`` on its ``data.root`` (the embedded study if unset): tracking, then Ray
    Train (TorchTrainer.fit with its centroid store actor) or, with ``local``, the same loop in this
    process (``pipeline.local``); the final metrics.

    ``existing`` says what to do with a run of the same name under ``out`` (``pipeline.run_folder``):
    "continue" trains a new run and resumes an interrupted one (same configuration only) but refuses a
    finished one; "resume" also returns a finished run's stored result; "fresh" deletes the run (its
    folder and checkpoints) and trains from scratch. Nothing is deleted before the data is checked."""
    cfg = with_absolute_paths(with_dataset(cfg))
    out = out.resolve()
    run_dir = out / cfg.run_name
    check_output_folder(out)
    task = make_task(cfg)  # missing splits, bad annotation files, mismatched categories fail here
    if cfg.train.init_from:  # a missing or unfitting train.init_from fails here, not in a worker
        try:
            task.build_model()
        except ModelFileError as error:
            raise ConfigError(str(error)) from None
    check_store_fits(cfg, len(limit(task.train_dataset(), cfg.data.max_train_images)))
    task.split_size("val")  # a missing or empty val split fails here, before training
    with run_lock(out, cfg.run_name):
        if not _prepare_folder(cfg, out, run_dir, existing):
            return stored_result(run_dir)
        return _train(cfg, out, run_dir, parent_run_id, faults, local)


def _prepare_folder(cfg: ExperimentConfig, out: Path, run_dir: Path, existing: Existing) -> bool:
    """Apply ``existing`` to the run folder; False if the run is finished and only its result is wanted."""
    state = run_state(run_dir)
    if existing == "fresh":
        for path in delete_run(cfg, out):
            print(f"--fresh: deleted {path}", flush=True)
    elif state is RunState.FINISHED:
        if existing == "resume":
            print(f"run '{cfg.run_name}' already finished: its stored result ({run_dir / 'result.json'})", flush=True)
            return False
        raise RunFolderError(finished_message(cfg, run_dir))
    elif state is RunState.INTERRUPTED:
        check_resumable(cfg, run_dir)
        print(f"resuming run '{cfg.run_name}' ({run_dir})", flush=True)
    else:
        if existing == "resume":
            raise RunFolderError(f"--resume: there is no run '{cfg.run_name}' in {out} to resume")
        _refuse_orphan_checkpoints(cfg, out)
    check_output_folder(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return True


def _refuse_orphan_checkpoints(cfg: ExperimentConfig, out: Path) -> None:
    """A new run must not silently start from the checkpoints of a deleted one of the same name."""
    folder = checkpoint_folder(cfg, out)
    if "://" not in folder and Path(folder).is_dir() and any(Path(folder).glob("checkpoint_*")):
        raise RunFolderError(f"run '{cfg.run_name}' has no run folder in {out}, but Ray Train checkpoints of an "
                             f"earlier run of that name are in {folder}; --fresh deletes them and starts over")


def _train(cfg: ExperimentConfig, out: Path, run_dir: Path, parent_run_id: str | None, faults: str | None,
           local: bool) -> dict[str, Any]:
    """Track and train (the run folder is ready); the MLflow run ends FINISHED, FAILED or KILLED."""
    uri = cfg.tracking.uri or tracking.local_tracking_uri(out)
    run_id = tracking.start_or_resume_run(uri, cfg.tracking.experiment, cfg.run_name, run_dir, out,
                                          tags={"preset": cfg.preset, "runner": "local" if local else "ray"},
                                          parent_run_id=parent_run_id)
    logger = tracking.RunLogger(uri, run_id, run_dir)
    print(banner(cfg, run_dir, local), flush=True)
    status = "FAILED"
    try:
        logger.params(cfg.flat())
        logger.artifact(run_dir / "config.yaml")
        started = time.perf_counter()
        if local:
            from pipeline.local import run_local

            metrics = run_local(cfg, run_dir, uri, run_id)
        else:
            metrics = _run_ray(cfg, out, run_dir, uri, run_id, faults)
        metrics["wall_seconds"] = time.perf_counter() - started
        metrics["run_dir"] = str(run_dir)
        metrics["mlflow_run_id"] = run_id
        metrics["tracking_uri"] = redact_uri(uri)
        metrics["mlflow_experiment"] = cfg.tracking.experiment
        metrics["mlflow_experiment_id"] = tracking.experiment_of(uri, run_id)
        metrics["checkpoints"] = str(run_dir / "checkpoint") if local else checkpoint_folder(cfg, out)
        if warning := unused_clustering_warning(cfg, metrics):
            metrics["warnings"] = [warning]
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        (run_dir / "result.json").write_text(json.dumps(metrics, indent=2, default=str))
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (``ray job stop``, a scheduler): see main
        status = "KILLED"
        raise
    except Exception:
        print(f"run '{cfg.run_name}' failed. Kept: the run folder {run_dir} (config, store snapshot, metrics), "
              f"its checkpoints ({run_dir / 'checkpoint' if local else checkpoint_folder(cfg, out)}); MLflow run "
              f"{run_id} marked FAILED. Re-running the same command resumes from the last checkpoint.",
              file=sys.stderr, flush=True)
        raise
    finally:
        logger.finish(status)
    return metrics


def unused_clustering_warning(cfg: ExperimentConfig, metrics: dict[str, Any]) -> str | None:
    """Why a run with the clustering loss on trained as DR, or None: with ``clustering.stable_max_change``
    eq. 2 pauses on every K-means version whose partition changed more than that, and where the clusters
    churn (the default study: 45-65% of the images change cluster between updates) no version ever
    qualifies. The run looks like DivDR in every table; this says it was not."""
    updates, used = metrics.get("kmeans_updates", 0), metrics.get("kmeans_updates_eq2")
    if not cfg.clustering.weight or not cfg.clustering.stable_max_change or not updates or used:
        return None
    changes = [h["matched_change"] for h in (metrics.get("store") or {}).get("history", [])
               if h.get("matched_change") is not None]
    churn = f" (median change {statistics.median(changes):.2f})" if changes else ""
    return (f"run '{cfg.run_name}': the clustering loss (eq. 2) was never applied: every one of its {updates} "
            f"K-means versions changed its partition by more than clustering.stable_max_change = "
            f"{cfg.clustering.stable_max_change}{churn}, so it trained as DR. Raise stable_max_change, or set it "
            f"to 0 (the paper: every version used)")


def banner(cfg: ExperimentConfig, run_dir: Path, local: bool) -> str:
    """One line naming the run, what it trains and where it goes."""
    device = " on GPU" if cfg.scaling.use_gpu else ""
    where = "in this process" if local else f"{cfg.scaling.workers} Ray worker(s){device}"
    return (f"=== run '{cfg.run_name}': {cfg.preset}, {cfg.model_size} net, {cfg.train.steps} steps, {where}; "
            f"data {cfg.data.root}; into {run_dir} ===")


def ray_train_scaling(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """Ray Train's ``TorchConfig`` and ``ScalingConfig`` for ``cfg.scaling``: DDP over NCCL between GPU
    workers (one GPU each; Ray Train sets each worker's CUDA device), over gloo between CPU workers."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    scaling = cfg.scaling
    return (TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
            ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                          resources_per_worker={"CPU": scaling.cpus_per_worker}))


def _run_ray(cfg: ExperimentConfig, out: Path, run_dir: Path, uri: str, run_id: str,
             faults: str | None) -> dict[str, Any]:
    """TorchTrainer.fit with the run's tracker and centroid store actors."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.centroid_store import CentroidStore, store_name
    from pipeline.worker import train_loop_per_worker

    init_ray()  # a no-op where Ray is already up (tests, Tune trials)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tracker = ray.remote(num_cpus=0)(tracking.Tracker).options(scheduling_strategy=here).remote(
        uri, run_id, str(run_dir))
    store = None  # store.enabled=false: DR trained with no centroid store
    try:
        if cfg.store.enabled:
            num_samples = len(make_task(cfg).train_dataset())
            store = CentroidStore.options(name=store_name(cfg.run_name), num_cpus=0, get_if_exists=True,
                                          scheduling_strategy=here).remote(
                num_samples, cfg.model.a_dim, cfg.scaling.workers, cfg.train.steps, cfg.clustering, cfg.store,
                str(run_dir / "store"), cfg.train.seed)
            _check_store(store, run_dir)
        torch_config, scaling_config = ray_train_scaling(cfg)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"experiment": cfg, "store": store, "tracker": tracker, "run_dir": str(run_dir),
                               "faults": faults_from_env() if faults is None else faults},
            torch_config=torch_config, scaling_config=scaling_config,
            run_config=RunConfig(name=cfg.run_name, storage_path=cfg.storage.path or str(out / "ray_results"),
                                 failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
        # the tracker (on this node) wrote rank 0's final metrics; Result.metrics only holds the
        # last report that carried a checkpoint
        final_file = run_dir / "artifacts" / "final_metrics.json"
        metrics = json.loads(final_file.read_text()) if final_file.exists() else dict(result.metrics or {})
        metrics["store"] = ray.get(store.status.remote()) if store is not None else None
        return metrics
    finally:
        # a failed run keeps its store snapshot and checkpoints: re-running the command resumes. Each
        # clean-up step is on its own: a dead store must not keep the tracker alive or hide the error.
        if store is not None:
            _quietly(lambda: ray.get(store.snapshot.remote(), timeout=120), "writing the store's last snapshot")
            _quietly(lambda: ray.kill(store, no_restart=True), "stopping the store")
        _quietly(lambda: ray.kill(tracker), "stopping the tracker")


def _check_store(store: Any, run_dir: Path) -> None:
    """The store answers before the first step, or the run fails now with the store's own error (a
    snapshot that cannot be read or belongs to another configuration)."""
    import ray

    try:
        ray.get(store.status.remote(), timeout=300)
    except ray.exceptions.RayActorError as err:
        cause = getattr(err, "error_msg", None) or str(err)
        reason = next((line.strip() for line in reversed(cause.splitlines()) if "Error:" in line), cause.strip())
        raise RuntimeError(f"the centroid store could not start ({reason}); nothing was trained. Its snapshot "
                           f"is in {run_dir / 'store'}") from None


def _quietly(action: Callable[[], Any], what: str) -> None:
    try:
        action()
    except Exception as err:
        summary = (str(err).strip().splitlines() or [""])[0]
        print(f"warning: {what} failed ({type(err).__name__}: {summary})", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
        args.out = persistent_out(args.out)
        check_output_folder(args.out)
    except ConfigError as err:
        print(f"pipeline/train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("Resolved configuration:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if args.print_config:
        return {}
    cfg = with_dataset(cfg)
    # SIGTERM ends the run like Ctrl-C: the lock is released and the MLflow run marked KILLED, not RUNNING
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    existing = "fresh" if args.fresh else "resume" if args.resume else "continue"
    try:
        metrics = run(cfg, args.out, existing=existing, local=args.local)
    except (ConfigError, DatasetError) as err:  # a finished or locked run, a data problem: nothing was touched
        print(f"pipeline/train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table({cfg.run_name: metrics}))
    print_outputs({cfg.run_name: metrics})
    return metrics


RUN_FILES = ("config.yaml", "result.json", "artifacts/model.pt", "artifacts/activations_train.parquet",
             "artifacts/activations_val.parquet", "artifacts/a_space.png", "artifacts/nearest_images.png")


def print_outputs(results: dict[str, dict[str, Any]], tables: Sequence[Path] = ()) -> None:
    """Where everything is, at the end of every entry point: the run folders and what they hold, the
    tables written, the MLflow store and the command that opens its UI on it."""
    first = next(iter(results.values()))
    lines = ["", "Outputs:"]
    if len(results) == 1:
        run_dir = Path(first["run_dir"])
        lines += [f"  {'run folder':<15} {run_dir}",
                  *(f"  {name:<15} {run_dir / file}" for name, file in zip(
                      ("config", "result", "model", "A(x) train", "A(x) val", "A-space plot", "nearest images"),
                      RUN_FILES, strict=True) if (run_dir / file).exists()),
                  f"  {'checkpoints':<15} {first.get('checkpoints', '-')}"]
    else:
        lines += [f"  {'run folders':<15} {', '.join(str(Path(m['run_dir'])) for m in results.values())}",
                  f"  {'':<15} each: {', '.join(RUN_FILES)}; checkpoints in {Path(first['checkpoints']).parent}"]
    lines += [f"  {'table':<15} {path}" for path in tables]
    uri = first["tracking_uri"]
    lines += [f"  {'MLflow':<15} {uri}, experiment '{first.get('mlflow_experiment', '')}' "
              f"(run {first['mlflow_run_id']}{' and the others' if len(results) > 1 else ''})",
              f"  {'MLflow UI':<15} {tracking.ui_command(uri, first.get('mlflow_experiment_id', ''))}"]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
