"""Shared fixtures of the pipeline tests: one local Ray per test module, small generated studies."""

import contextlib
import os
import shutil
import signal
import subprocess
import time
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


def stop_processes_naming(temp_dir: str, *more_patterns: str) -> None:
    """End the Ray processes a test started with their own temporary folder (``ray start --temp-dir``,
    ``RAY_TMPDIR``), and only those: the ones that name that folder (or one of ``more_patterns``) on their
    command line, and their descendants (Ray renames some children, e.g. ``ray::DashboardAgent``, whose
    command line then names nothing; left running, one kept the agent's port and broke the next head).
    ``ray stop`` would end every Ray on the machine, other users' training included."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 2.0)):
        pids = [pid for pid in _process_tree(temp_dir, *more_patterns) if pid != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
            time.sleep(0.2)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _process_tree(*patterns: str) -> list[int]:
    """The processes whose command line matches one of ``patterns``, and all their descendants."""
    found: set[int] = set()
    for pattern in patterns:
        found.update(_pgrep("-f", "--", pattern))  # "--": a pattern may start with a dash
    frontier = set(found)
    while frontier:
        children = {child for pid in frontier for child in _pgrep("-P", str(pid))} - found
        found |= children
        frontier = children
    return sorted(found)


def _pgrep(*args: str) -> list[int]:
    return [int(pid) for pid in subprocess.run(["pgrep", *args], capture_output=True, text=True).stdout.split()]
