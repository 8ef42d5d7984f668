"""Shared test set-up: few torch threads (2-core machines), deterministic seeds."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)



def pytest_sessionfinish(session, exitstatus):
    session.config._divdr_exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own status once everything is reported: in one CI run the interpreter's
    teardown (native threads of Ray / FAISS / torch) segfaulted *after* "318 passed", turning a green
    run into exit 139. Skipping that teardown keeps the status pytest decided (5 = no tests, too)."""
    import sys

    status = getattr(config, "_divdr_exit_status", None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
