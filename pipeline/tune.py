"""Ablation sweeps with Ray Tune: ``python pipeline/tune.py --space tune_spaces/k.yaml [--out runs/sweeps]``.

Current Ray pattern (Train V2): each Tune trial is a function that builds and fits its own
TorchTrainer (through ``pipeline.train.run``, so each trial has its own centroid store, named after
it). Trials take a sliver of CPU themselves and at most as many run at once as the cluster can give
their workers, so trials and workers never wait on each other. MLflow: one parent run per sweep, one
child run per trial; a report (Markdown, CSV, plots) is written at the end and logged to the parent.
The command exits 1 when any trial failed, naming each failed trial and its error file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray
import yaml
from ray import tune
from ray.air.constants import EXPR_ERROR_FILE
from ray.tune import Result

from divdr.config import ConfigError
from pipeline import tracking
from pipeline.cli_args import add_common, parser_for, persistent_out
from pipeline.config import (
    ExperimentConfig,
    absolute_root,
    deep_merge,
    load_experiment,
    parse_override,
    redact_uri,
    set_dotted,
    with_absolute_paths,
    with_data_root,
    with_smoke,
)
from pipeline.report import write_report
from pipeline.run_folder import LOCKS, Existing, RunState, config_differences, run_state, saved_config
from pipeline.train import check_output_folder, init_ray, run, with_dataset
from pipeline.tune_space import VARIANT_KEY, TuneSpace, load_space, trial_config


def setting_name(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(params.items())) or "base"


@dataclass(frozen=True)
class FailedTrial:
    trial: str  # its setting and seed, as the report names them
    error: str  # the exception, one line (Ray wraps it in a traceback: its last line)
    error_file: str  # the full traceback: Tune's error.txt in the trial's folder


def failed_trials(results: Iterable[Result]) -> list[FailedTrial]:
    """The trials of a sweep that ended in an error, in the order Tune lists them."""
    failed = []
    for result in results:
        if result.error is None:
            continue
        config = result.config or {}  # None when the trial never reported: name it by its folder
        trial = (f"{setting_name(config['params'])} seed {config.get('seed')}" if "params" in config
                 else Path(result.path).name)
        lines = [line.strip() for line in str(result.error).splitlines() if line.strip()]
        failed.append(FailedTrial(trial, lines[-1] if lines else type(result.error).__name__,
                                  str(Path(result.path) / EXPR_ERROR_FILE)))
    return failed


def failure_report(failed: list[FailedTrial], total: int) -> str:
    lines = [f"{len(failed)} of {total} trial(s) failed; the report covers the others only. Full tracebacks:"]
    lines += [f"  {f.trial}: {f.error}\n    {f.error_file}" for f in failed]
    return "\n".join(lines)


def exit_status(outcome: dict[str, Any]) -> int:
    """1 when any trial failed (its setting is missing from the report, or has fewer seeds), else 0."""
    return 1 if outcome["failed"] else 0


def _search_space(space: TuneSpace) -> dict[str, Any]:
    params: dict[str, Any] = {key: tune.grid_search(values) for key, values in space.grid.items()}
    if space.variants:
        params[VARIANT_KEY] = tune.grid_search(list(space.variants))
    for key, spec in space.sample.items():
        kind, args = next(iter(spec.items()))
        params[key] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                       "choice": tune.choice}[kind](args)
    return {"params": params, "seed": tune.grid_search(list(range(space.seeds)))}


def finished_metrics(cfg: ExperimentConfig, out: Path) -> dict[str, Any] | None:
    """The final metrics of a trial that already finished under ``out`` with exactly this
    configuration, else None. ``run`` writes ``result.json`` only once training has finished, so a
    trial stopped midway has none (re-running it resumes it from its checkpoint), and a trial whose
    configuration changed since (the space was edited) is trained again, never reused."""
    run_dir = out / cfg.run_name
    result, saved = run_dir / "result.json", run_dir / "config.yaml"
    if not (result.is_file() and saved.is_file()):
        return None
    if config_differences(saved_config(run_dir), cfg.to_dict()):
        return None
    return json.loads(result.read_text())


def sweep_experiment(space: TuneSpace) -> str:
    """The MLflow experiment of a sweep and its trials: the space's own, else "sweep <name>"."""
    return (space.base.get("tracking") or {}).get("experiment") or f"sweep {space.name}"


def trial_existing(cfg: ExperimentConfig, out: Path) -> Existing:
    """A trial stopped midway resumes; one whose configuration changed since (the space was edited)
    is trained again from scratch."""
    run_dir = out / cfg.run_name
    if run_state(run_dir) is RunState.NEW:
        return "fresh"  # also clears checkpoints a deleted trial folder may have left
    return "continue" if not config_differences(saved_config(run_dir), cfg.to_dict()) else "fresh"


def trial_name(space: TuneSpace, params: dict[str, Any], seed: int) -> str:
    return f"{space.name}[{setting_name(params)}]-seed{seed}".replace("/", "_")


def _trial(config: dict[str, Any], space: TuneSpace, root: str, out: str, uri: str, parent_run_id: str,
           cwd: str) -> None:
    params, seed = config["params"], config["seed"]
    cfg = with_data_root(trial_config(space, {**params, "tracking.uri": uri,
                                              "tracking.experiment": sweep_experiment(space)}, seed,
                                      trial_name(space, params, seed)), root)
    cfg = with_absolute_paths(cfg, Path(cwd))  # a trial runs in its own folder; paths are the sweep's
    # re-running a stopped sweep keeps what finished: a sweep of the study is hours of CPU
    metrics = finished_metrics(cfg, Path(out))
    if metrics is None:
        progress = ProgressReports(Path(out) / cfg.run_name / tracking.PROGRESS_FILE, space.metric)
        progress.start()
        try:
            metrics = run(cfg, Path(out), parent_run_id=parent_run_id, existing=trial_existing(cfg, Path(out)))
        finally:
            progress.stop()
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tune.report({**scalars, "step": cfg.train.steps, "setting": setting_name(params), "seed": seed,
                 "preset": cfg.preset, "cluster_sizes": str(metrics.get("cluster_sizes"))})


class ProgressReports(threading.Thread):
    """While a trial trains, report each periodic evaluation to Tune (``val/<metric>`` as ``<metric>``, with
    its ``step``), so a scheduler can stop bad trials early. It follows the run's local metrics file, which
    the run's tracker appends to on this node."""

    POLL_S = 2.0

    def __init__(self, path: Path, metric: str) -> None:
        super().__init__(daemon=True, name="tune-progress")
        self.path, self.metric, self.offset = path, metric, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.POLL_S):
            self.report_new()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)

    def report_new(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            lines = f.readlines()
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # a line being written: read it next time
            self.offset += sum(len(line) for line in lines)
        for line in lines:
            record = json.loads(line)
            value = record["metrics"].get(f"val/{self.metric}")
            if value is not None:
                tune.report({self.metric: value, "step": record["step"], "intermediate": True})


def metric_mode(metric: str) -> str:
    """Whether a scheduler should keep the trials with the most or the least of ``metric``."""
    return "min" if metric.startswith("gflops") or metric == "intra" else "max"


def build_scheduler(space: TuneSpace) -> Any:
    """The space's early-stopping scheduler (None: every trial runs to its end)."""
    if not space.scheduler:
        return None
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    kind, settings = next(iter(space.scheduler.items()))
    steps = trial_config(space, {}, seed=0).train.steps
    if kind == "asha":
        return ASHAScheduler(time_attr="step", max_t=steps, **(settings or {}))
    return MedianStoppingRule(time_attr="step", **(settings or {}))


def close_stopped_trials(grid: Iterable[Result], space: TuneSpace, out: Path, uri: str) -> list[str]:
    """Trials a scheduler stopped were killed mid-run: their MLflow runs are marked KILLED (tagged
    ``stopped_by: scheduler``, not left RUNNING) and their locks released. Their run folders stay, so a
    later sweep without the scheduler resumes them. Returns their names."""
    stopped = []
    for result in grid:
        params = (result.config or {}).get("params")
        if result.error is not None or params is None:
            continue
        run_dir = out / trial_name(space, params, result.config["seed"])
        if (run_dir / "result.json").exists() or not (run_dir / tracking.RUN_ID_FILE).exists():
            continue
        run_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
        logger = tracking.RunLogger(uri, run_id, run_dir)
        logger.tag("stopped_by", "scheduler")
        logger.finish("KILLED")
        (out / LOCKS / f"{run_dir.name}.lock").unlink(missing_ok=True)
        stopped.append(run_dir.name)
    return stopped


# A trial only drives its TorchTrainer: it asks for a sliver of CPU (Tune refuses an empty request),
# and concurrency is capped so every running trial's workers fit: no trial waits on workers that
# can never be scheduled.
TRIAL_CPU = 0.01


def max_concurrent(space: TuneSpace) -> int:
    if space.max_concurrent:
        return space.max_concurrent
    probe = trial_config(space, {}, seed=0)
    per_trial = probe.scaling.workers * probe.scaling.cpus_per_worker + TRIAL_CPU
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def run_sweep(space: TuneSpace, out: Path, data: str | Path | None = None, tracking_uri: str | None = None) -> dict:
    out = out.resolve()
    sweep_dir = out / space.name
    check_output_folder(sweep_dir)
    root = absolute_root(data) if data else with_dataset(trial_config(space, {}, seed=0)).data.root
    init_ray()
    uri = tracking_uri or tracking.local_tracking_uri(out)
    experiment = sweep_experiment(space)
    parent = tracking.start_or_resume_run(uri, experiment, f"sweep:{space.name}", sweep_dir, out,
                                          tags={"sweep": space.name, "description": space.description})
    logger = tracking.RunLogger(uri, parent, sweep_dir)
    logger.params({"space.name": space.name, "space.preset": space.preset, "space.seeds": space.seeds,
                   "space.grid": space.grid, "space.sample": space.sample, "space.variants": space.variants,
                   "space.metric": space.metric})
    trainable = tune.with_parameters(_trial, space=space, root=str(root), out=str(out), uri=uri,
                                     parent_run_id=parent, cwd=str(Path.cwd()))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": TRIAL_CPU}),
        param_space=_search_space(space),
        tune_config=tune.TuneConfig(num_samples=space.num_samples, max_concurrent_trials=max_concurrent(space),
                                    scheduler=build_scheduler(space), metric=space.metric if space.scheduler else None,
                                    mode=metric_mode(space.metric) if space.scheduler else None),
        run_config=tune.RunConfig(name=space.name, storage_path=str(out / "tune"), verbose=1),
    )
    grid = tuner.fit()
    stopped = close_stopped_trials(grid, space, out, uri)
    # a trial's last result is its final metrics, or, for one a scheduler stopped, an intermediate report
    rows = [{**r.metrics, **{f"param:{k}": v for k, v in (r.config or {}).get("params", {}).items()}}
            for r in grid if r.metrics and not r.metrics.get("intermediate")]
    errors = [str(r.error) for r in grid if r.error]
    failed = failed_trials(grid)
    report = write_report(space, rows, sweep_dir / "report")
    logger.artifact(sweep_dir / "report", "report")
    logger.finish("FINISHED" if not errors else "FAILED")
    print(report["markdown"])
    print(f"\nOutputs:\n  {'report':<15} {sweep_dir / 'report'} (report.md, report.csv, trials.csv, plots)\n"
          f"  {'trials':<15} run folders {space.name}[...]-seed* under {out}\n"
          f"  {'MLflow':<15} {redact_uri(uri)}, experiment '{experiment}' (the sweep's run and its trials)\n"
          f"  {'MLflow UI':<15} {tracking.ui_command(redact_uri(uri), tracking.experiment_of(uri, parent))}",
          flush=True)
    if failed:
        print(failure_report(failed, len(grid)), file=sys.stderr)
    if stopped:
        print(f"stopped early by the scheduler ({len(stopped)}): {', '.join(stopped)}", flush=True)
    return {**report, "parent_run_id": parent, "tracking_uri": uri, "errors": errors, "failed": failed,
            "rows": rows, "stopped": stopped,
            "reports_per_trial": {trial_name(space, r.config["params"], r.config["seed"]): len(r.metrics_dataframe)
                                  for r in grid if r.config and r.metrics_dataframe is not None}}


def main(argv: list[str] | None = None) -> dict:
    parser = parser_for("pipeline/tune.py", __doc__)
    parser.add_argument("--space", type=Path, required=True, help="a YAML file of tune_spaces/")
    add_common(parser, "every trial (over the space's base)")
    args = parser.parse_args(argv)
    try:
        space = with_cli_overrides(load_space(args.space), args)
        probe = trial_config(space, {"tracking.experiment": sweep_experiment(space)}, seed=0)
        out = persistent_out(args.out)
    except ConfigError as err:
        print(f"pipeline/tune.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(yaml.safe_dump(probe.to_dict(), sort_keys=False))
        return {"failed": []}
    return run_sweep(space, out, args.data, args.tracking_uri)


def with_cli_overrides(space: TuneSpace, args: argparse.Namespace) -> TuneSpace:
    """``--smoke``, ``--config`` and ``--set`` applied to every trial, over the space's own base; the swept
    keys still win. ``--smoke`` also keeps one seed."""
    base = with_smoke(space.base) if args.smoke else dict(space.base)
    if args.config:
        base = deep_merge(base, load_experiment(args.config))
    for text in args.overrides:
        set_dotted(base, *parse_override(text))
    return dataclasses.replace(space, base=base, seeds=1 if args.smoke else space.seeds)


def cli(argv: list[str] | None = None) -> int:
    return exit_status(main(argv))


if __name__ == "__main__":
    sys.exit(cli())
