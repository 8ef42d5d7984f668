"""pipeline/tune.py without Ray: which trials a re-run of a stopped sweep may reuse."""

import json

import yaml

from pipeline.tune import finished_metrics
from pipeline.tune_space import parse_space, trial_config

SPACE = parse_space({"name": "s", "base": {"model_size": "micro", "train": {"steps": 7}}, "variants": {"a": {}}})


def _finished_trial(out, cfg, metrics):
    run_dir = out / cfg.run_name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "result.json").write_text(json.dumps(metrics))


def test_a_finished_trial_with_the_same_config_is_reused(tmp_path):
    cfg = trial_config(SPACE, {"variant": "a"}, seed=0, name="s[variant=a]-seed0")
    _finished_trial(tmp_path, cfg, {"recovery": 0.5})
    assert finished_metrics(cfg, tmp_path) == {"recovery": 0.5}


def test_a_changed_config_or_an_unfinished_trial_is_trained_again(tmp_path):
    cfg = trial_config(SPACE, {"variant": "a"}, seed=0, name="s[variant=a]-seed0")
    _finished_trial(tmp_path, cfg, {"recovery": 0.5})
    longer = parse_space({"name": "s", "base": {"model_size": "micro", "train": {"steps": 8}}, "variants": {"a": {}}})
    assert finished_metrics(trial_config(longer, {"variant": "a"}, seed=0, name=cfg.run_name), tmp_path) is None
    stopped = trial_config(SPACE, {"variant": "a"}, seed=1, name="s[variant=a]-seed1")
    (tmp_path / stopped.run_name).mkdir()
    (tmp_path / stopped.run_name / "config.yaml").write_text(yaml.safe_dump(stopped.to_dict()))
    assert finished_metrics(stopped, tmp_path) is None  # no result.json: it resumes from its checkpoint


def _result(tmp_path, name, params, seed, error=None):
    from ray.tune import Result

    metrics = {"config": {"params": params, "seed": seed}, **({} if error else {"miou": 0.5})}
    return Result(metrics=metrics, checkpoint=None, error=error, path=str(tmp_path / name))


def test_failed_trials_are_named_with_their_error_and_its_file(tmp_path):
    from pipeline.tune import failed_trials, failure_report

    error = RuntimeError("Traceback (most recent call last):\n  File ...\nValueError: the store died")
    results = [_result(tmp_path, "trial_0", {"clustering.k": 2}, 0),
               _result(tmp_path, "trial_1", {"clustering.k": 3}, 1, error)]
    failed = failed_trials(results)
    assert [(f.trial, f.error) for f in failed] == [("clustering.k=3 seed 1", "ValueError: the store died")]
    assert failed[0].error_file == str(tmp_path / "trial_1" / "error.txt")
    report = failure_report(failed, total=2)
    assert "1 of 2 trial(s) failed" in report and "clustering.k=3 seed 1" in report
    assert str(tmp_path / "trial_1" / "error.txt") in report


def test_a_sweep_with_a_failed_trial_exits_1(tmp_path, monkeypatch, capsys):
    import pipeline.tune as tune_script

    (tmp_path / "s.yaml").write_text("name: s\nbase: {model_size: micro}\nvariants: {a: {}}\n")
    outcome = {"failed": []}
    monkeypatch.setattr(tune_script, "run_sweep", lambda *args, **kwargs: outcome)  # no Ray here
    assert tune_script.cli(["--space", str(tmp_path / "s.yaml")]) == 0
    every_trial_failed = failed_trials_of(tmp_path, n=2)
    outcome = {"failed": every_trial_failed}
    assert tune_script.cli(["--space", str(tmp_path / "s.yaml")]) == 1
    outcome = {"failed": every_trial_failed[:1]}  # one failure is enough: the report is incomplete
    assert tune_script.cli(["--space", str(tmp_path / "s.yaml")]) == 1


def failed_trials_of(tmp_path, n):
    from pipeline.tune import failed_trials

    return failed_trials([_result(tmp_path, f"trial_{i}", {"variant": "a"}, i, ValueError("boom")) for i in range(n)])


def test_periodic_evaluations_are_reported_to_tune_as_the_trial_trains(tmp_path, monkeypatch):
    import pipeline.tune as tune_script

    reported = []
    monkeypatch.setattr(tune_script.tune, "report", reported.append)
    progress_file = tmp_path / "metrics.jsonl"
    progress = tune_script.ProgressReports(progress_file, "miou")
    progress.report_new()  # nothing written yet
    with progress_file.open("w") as f:
        f.write(json.dumps({"step": 10, "metrics": {"loss/task": 1.0}}) + "\n")
        f.write(json.dumps({"step": 30, "metrics": {"val/miou": 0.2, "val/recovery": 0.5}}) + "\n")
        f.write('{"step": 60, "metr')  # being written
    progress.report_new()
    assert reported == [{"miou": 0.2, "step": 30, "intermediate": True}]
    with progress_file.open("a") as f:
        f.write('ics": {"val/miou": 0.3}}\n')
    progress.report_new()
    assert reported[-1] == {"miou": 0.3, "step": 60, "intermediate": True} and len(reported) == 2


def test_schedulers_are_built_from_the_space_and_need_periodic_evaluation():
    import pytest
    from ray.tune.schedulers import AsyncHyperBandScheduler, MedianStoppingRule

    from divdr.config import ConfigError
    from pipeline.tune import build_scheduler, metric_mode

    base = {"model_size": "micro", "train": {"steps": 90, "eval_every": 30}}
    asha = parse_space({"name": "a", "base": base, "variants": {"x": {}},
                        "scheduler": {"asha": {"grace_period": 30, "reduction_factor": 2}}})
    scheduler = build_scheduler(asha)
    assert isinstance(scheduler, AsyncHyperBandScheduler) and scheduler._max_t == 90
    median = parse_space({"name": "m", "base": base, "variants": {"x": {}}, "scheduler": {"median": {}}})
    assert isinstance(build_scheduler(median), MedianStoppingRule)
    assert build_scheduler(SPACE) is None
    assert (metric_mode("miou"), metric_mode("gflops_real")) == ("max", "min")
    for bad, message in (({"pbt": {}}, "one of"), ({"asha": {"grace": 3}}, "unknown setting"),
                         ({"asha": {"grace_period": -1}}, "must be a number > 0")):
        with pytest.raises(ConfigError, match=message):
            parse_space({"name": "b", "base": base, "variants": {"x": {}}, "scheduler": bad})
    with pytest.raises(ConfigError, match=r"set train\.eval_every"):
        parse_space({"name": "c", "base": {"model_size": "micro"}, "variants": {"x": {}},
                     "scheduler": {"asha": {}}})


def test_trials_a_scheduler_stopped_end_killed_in_mlflow_not_running(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.tune import close_stopped_trials, trial_name

    uri = tracking.local_tracking_uri(tmp_path)
    results = []
    for seed, finished in ((0, True), (1, False)):
        name = trial_name(SPACE, {"variant": "a"}, seed)
        tracking.start_or_resume_run(uri, "sweep s", name, tmp_path / name, tmp_path)
        if finished:
            (tmp_path / name / "result.json").write_text("{}")
        (tmp_path / ".locks").mkdir(exist_ok=True)
        (tmp_path / ".locks" / f"{name}.lock").write_text("{}")
        results.append(_result(tmp_path, f"trial_{seed}", {"variant": "a"}, seed))
    assert close_stopped_trials(results, SPACE, tmp_path, uri) == [trial_name(SPACE, {"variant": "a"}, 1)]
    client = MlflowClient(uri)
    stopped = client.get_run((tmp_path / trial_name(SPACE, {"variant": "a"}, 1) / "mlflow_run_id").read_text())
    assert stopped.info.status == "KILLED" and stopped.data.tags["stopped_by"] == "scheduler"
    assert not (tmp_path / ".locks" / f"{trial_name(SPACE, {'variant': 'a'}, 1)}.lock").exists()
    finished = client.get_run((tmp_path / trial_name(SPACE, {"variant": "a"}, 0) / "mlflow_run_id").read_text())
    assert finished.info.status == "RUNNING"  # not ours to close: the run itself does
