"""Shared fixtures of the pipeline tests: one local Ray per test module, small generated studies."""

from pathlib import Path

import pytest

from divdr.data.study import study_config
from divdr.data.synthetic import generate


@pytest.fixture(scope="module")
def ray_session():
    """Ray starts once per module; 4 logical CPUs on 2 cores so workers, store and tracker fit."""
    import ray

    ray.init(num_cpus=4)
    yield
    ray.shutdown()


def make_study(tmp_path_factory, n_train: int, n_val: int, seed: int) -> Path:
    root = tmp_path_factory.mktemp("study")
    generate(study_config(n_train=n_train, n_val=n_val, height=64, width=128, seed=seed), root)
    return root
