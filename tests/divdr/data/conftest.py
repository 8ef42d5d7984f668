"""Small generated studies shared by the data tests (generated once per session, in seconds)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from divdr.data.study import LARGE, THIN, TINY, StudyConfig
from divdr.data.synthetic import generate

# every tiny-regime image gets a crowd, so the COCO export surely has iscrowd records
SMALL = StudyConfig(height=64, width=128, n_train=6, n_val=4, seed=11,
                    regimes=(LARGE, replace(TINY, crowd_probability=1.0), THIN))


@pytest.fixture(scope="session")
def small_seg_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg") / "study"
    generate(SMALL, root, "seg")
    return root


@pytest.fixture(scope="session")
def small_det_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det") / "study"
    generate(SMALL, root, "det")
    return root
