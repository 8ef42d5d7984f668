"""pipeline/train.py's own decisions, without Ray: how it joins or starts Ray."""

import os

import pytest


@pytest.mark.parametrize("address, cluster, expected", [
    ("", None, {"num_cpus": max(4, os.cpu_count() or 1)}),  # standalone: a local Ray, oversubscribed
    ("", "127.0.0.1:6379", {}),                              # `ray start` registered a head here: join it
    ("http://127.0.0.1:8265", None, {}),                     # ray job submit: join, ask for nothing
])
def test_joining_a_cluster_never_asks_for_resources(monkeypatch, address, cluster, expected):
    import ray

    from pipeline import train

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(train, "registered_cluster", lambda: cluster)
    monkeypatch.setenv("RAY_ADDRESS", address)
    train.init_ray()
    assert calls == [expected]


def test_a_relative_out_inside_a_ray_job_is_refused(tmp_path):
    """A Ray job runs in a temporary copy of its working directory: relative outputs would die with it."""
    from pathlib import Path

    from divdr.config import ConfigError
    from pipeline.cli_args import persistent_out

    job_copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    with pytest.raises(ConfigError, match="Ray's temporary copy"):
        persistent_out(Path("runs"), cwd=job_copy)
    assert persistent_out(tmp_path / "runs", cwd=job_copy) == tmp_path / "runs"
    assert persistent_out(Path("runs"), cwd=tmp_path) == tmp_path / "runs"  # elsewhere: resolved


@pytest.mark.parametrize(("use_gpu", "backend"), [(False, "gloo"), (True, "nccl")])
def test_gpu_workers_train_over_nccl_with_one_gpu_each(use_gpu, backend):
    from pipeline.config import resolve
    from pipeline.train import ray_train_scaling

    cfg = resolve(None, None, [f"scaling.use_gpu={str(use_gpu).lower()}", "scaling.workers=3",
                               "scaling.cpus_per_worker=2"])
    torch_config, scaling = ray_train_scaling(cfg)
    assert torch_config.backend == backend
    assert scaling.num_workers == 3 and scaling.use_gpu is use_gpu
    assert scaling._resources_per_worker_not_none == {"CPU": 2.0, **({"GPU": 1} if use_gpu else {})}


def _history(*changes):
    """A store history: the first version has nothing to compare with (None)."""
    return [{"matched_change": change, "eq2_on": int(change is not None and change <= 0.05)} for change in changes]


@pytest.mark.parametrize("overrides, changes, warned", [
    (["clustering.stable_max_change=0.05"], (None, 0.6, 0.55, 0.62), True),  # churn: eq. 2 never used
    (["clustering.stable_max_change=0.05"], (None, 0.6, 0.03, 0.62), False),  # one version persisted
    ([], (None, 0.6, 0.55, 0.62), False),  # the paper's: every version used, whatever the churn
    (["clustering.stable_max_change=0.05", "clustering.weight=0"], (None, 0.6, 0.55), False),  # DR: no eq. 2
])
def test_a_divdr_run_that_never_applied_eq2_says_so(overrides, changes, warned):
    """On the default study the clusters churn (45-65% change per update): with stable_max_change every version
    was refused, and the 'DivDR' run trained as DR without a word (2026-11-26, docs/pipeline.md)."""
    from pipeline.config import resolve
    from pipeline.train import unused_clustering_warning

    cfg = resolve("DivDR-A", None, overrides)
    history = _history(*changes)
    metrics = {"kmeans_updates": len(history), "kmeans_updates_eq2": sum(h["eq2_on"] for h in history),
               "store": {"history": history}}
    warning = unused_clustering_warning(cfg, metrics)
    assert (warning is not None) == warned
    if warned:
        assert "never applied" in warning and "stable_max_change = 0.05" in warning
        assert "median change 0.60" in warning and f"'{cfg.run_name}'" in warning
