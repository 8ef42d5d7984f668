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
