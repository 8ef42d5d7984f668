"""A small sweep on 2 CPU cores (2 trials of the smoke configuration), its MLflow parent/child runs,
its report, and the MLflow compare view of two of its runs in headless Chromium.

Ray starts once for this module.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from divdr.data.study import study_config
from divdr.data.synthetic import generate
from pipeline.config import SMOKE_OVERRIDES
from pipeline.tune_space import parse_space

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import ray

    from pipeline.tune import run_sweep

    data = tmp_path_factory.mktemp("study")
    generate(study_config(n_train=16, n_val=6, height=64, width=128, seed=4), data)
    out = tmp_path_factory.mktemp("sweeps")
    base = {**SMOKE_OVERRIDES, "train": {**SMOKE_OVERRIDES["train"], "eval_every": 4}}
    space = parse_space({"name": "tiny", "description": "DR-A against DivDR-A, smoke size", "seeds": 1,
                         "base": base, "grid": {"preset": ["DR-A", "DivDR-A"]}})
    ray.init(num_cpus=5)  # 2 trials x (2 workers + a sliver) fit: both run at once
    try:
        started = time.perf_counter()
        result = run_sweep(space, out, data=data)
        result["seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        result["rerun"] = run_sweep(space, out, data=data)  # the same command again: nothing to train
        result["rerun"]["seconds"] = time.perf_counter() - started
    finally:
        ray.shutdown()
    return space, out, result


def test_two_trials_finish_with_parent_and_child_runs(sweep):
    _, _, result = sweep
    assert result["errors"] == []
    assert sorted(r["preset"] for r in result["rows"]) == ["DR-A", "DivDR-A"]
    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all("final/miou" in c.data.metrics for c in children)
    assert {c.data.params["preset"] for c in children} == {"DR-A", "DivDR-A"}
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.csv", "report/miou_vs_gflops.png"} <= logged


def test_trials_report_to_tune_as_they_train(sweep):
    """A scheduler can only act on what a trial reports before its end: the periodic evaluations at steps
    4 and 8 (of 12) reach Tune, then the final metrics."""
    _, _, result = sweep
    assert sorted(result["reports_per_trial"].values()) == [3, 3]


def test_rerunning_a_finished_sweep_reuses_its_trials(sweep):
    _, _, result = sweep
    rerun = result["rerun"]
    assert rerun["errors"] == [] and rerun["parent_run_id"] == result["parent_run_id"]
    recovered = {r["preset"]: (r["miou"], r["wall_seconds"]) for r in rerun["rows"]}
    assert recovered == {r["preset"]: (r["miou"], r["wall_seconds"]) for r in result["rows"]}
    assert rerun["seconds"] < min(r["wall_seconds"] for r in result["rows"])  # no trial trained again


def test_report_has_a_row_per_setting(sweep):
    _, _, result = sweep
    settings = {row["setting"] for row in result["table"]}
    assert settings == {"preset=DR-A", "preset=DivDR-A"}
    assert all(0 <= row["miou_mean"] <= 1 for row in result["table"])
    assert "| preset=DivDR-A | 1 |" in result["markdown"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# CI installs Debian's chromium (.ci/run) and sets CI=true: there a missing browser fails the test
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_mlflow_compare_view_and_a_run_page_in_headless_chromium(sweep):
    _, _, result = sweep
    client = MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", result["tracking_uri"],
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not answer within 120 s")
        ids = json.dumps([c.info.run_id for c in children])
        url = (f"{base}/#/compare-runs?runs={urllib.request.quote(ids)}"
               f"&experiments={urllib.request.quote(json.dumps([parent.info.experiment_id]))}")
        shot, dom = _render(url, "mlflow_compare_view")
        # one trial's own page: its logged model, and its route pictures among the artifacts
        shown = children[0]
        run_page = f"{base}/#/experiments/{parent.info.experiment_id}/runs/{shown.info.run_id}"
        # the experiment as the printed MLflow UI link opens it: the model-training view, its runs listed
        _, experiment = _render(f"{base}/#/experiments/{parent.info.experiment_id}?workflowType=machine_learning",
                                "mlflow_experiment_training_view")
        _, overview = _render(run_page, "mlflow_run_page")
        _, artifacts = _render(f"{run_page}/artifacts/routes.png", "mlflow_run_routes")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert shot.stat().st_size > 10_000
    for child in children:
        assert child.info.run_name in dom  # both runs are in the compare view
    # and their metrics (the compare table is a scroll box: the first rows, alphabetically, render)
    # (the first rows alphabetically: the per-class IoU, final/iou/<class>, come before final/miou)
    for metric in ("cost/ratio", "final/inter", "final/intra", "final/iou/road"):
        assert f">{metric}<" in dom, metric
    import mlflow

    mlflow.set_tracking_uri(result["tracking_uri"])
    [model] = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list",
                                          filter_string=f"source_run_id = '{shown.info.run_id}'")
    assert model.model_id in overview and "Logged models (1)" in overview  # the run page lists its model
    assert "matching runs" in experiment and parent.info.run_name in experiment  # the training view's run list
    for name in ("routes.png", "nearest_images.png", "a_space.png", "model.pt"):
        assert name in artifacts, name  # the artifact tree, routes.png open in the viewer


def _render(url: str, name: str) -> tuple[Path, str]:
    """A screenshot (kept in test-artifacts/) and the DOM of ``url`` in headless Chromium."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--virtual-time-budget=25000"]
    subprocess.run([*common, "--window-size=1600,1400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=180, check=True)
    # a very tall window renders the whole page, metrics table included (it is virtualised)
    dom = subprocess.run([*common, "--window-size=1600,12000", "--dump-dom", url], capture_output=True,
                         text=True, timeout=180).stdout
    (ARTIFACTS / f"{name}.html").write_text(dom)
    return shot, dom
