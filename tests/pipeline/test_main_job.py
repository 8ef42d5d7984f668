"""pipeline/main_job.py: every preset trained with seeds 0 .. N-1, mean +- std per preset. With ``--local`` (each
run's Ray path is ``pipeline.train.run``'s: tests/pipeline/test_train_ray.py, test_job_submit.py)."""

import sys
from pathlib import Path

import pytest

from tests.pipeline.conftest import make_study

pytestmark = pytest.mark.slow


def test_main_job_shows_each_preset_over_seeds(tmp_path_factory, tmp_path):
    from pipeline.main_job import main as main_job

    study = make_study(tmp_path_factory, n_train=12, n_val=6, seed=3)
    runs = main_job(["--smoke", "--presets", "DR-A", "--seeds", "2", "--out", str(tmp_path), "--data", str(study),
                     "--set", "train.steps=4", "--local"])
    assert list(runs) == ["DR-A"] and len(runs["DR-A"]) == 2
    assert [Path(m["run_dir"]).name for m in runs["DR-A"]] == ["main-DR-A-seed0", "main-DR-A-seed1"]
    assert runs["DR-A"][0]["miou"] != runs["DR-A"][1]["miou"]  # two seeds, two trainings
    summary = (tmp_path / "main_job.md").read_text()
    assert "| DR-A | 2 | " in summary and "| DR-A seed 1 | " in summary
    assert not (tmp_path / "ray_results").exists() and ("ray" not in sys.modules or
                                                         not sys.modules["ray"].is_initialized())
