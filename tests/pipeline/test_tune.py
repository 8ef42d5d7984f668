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
