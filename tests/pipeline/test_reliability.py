"""Faults injected into real runs: a worker dies, the centroid store dies, NaNs appear, MLflow is
unreachable, the driver stops. Ray starts once for this module (the driver test uses its own).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from divdr.config import ConfigError
from pipeline.config import resolve, with_data_root, with_smoke
from pipeline.schedule import kmeans_trigger_steps
from tests.pipeline.conftest import make_study, stop_processes_naming

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory, n_train=16, n_val=6, seed=7)


def smoke(name: str, *overrides: str):
    return resolve("DivDR-A", None, ["train.steps=12", "train.checkpoint_every=4", "clustering.update_every=4",
                                     "store.switch_lag=1", f"name={name}", *overrides], base=with_smoke({}))


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_session, study, tmp_path):
    from pipeline.train import run

    cfg = smoke("kill-worker", "scaling.max_failures=1")
    metrics = run(with_data_root(cfg, study), tmp_path, faults="kill_worker:rank=1,step=10")
    assert list((tmp_path / "kill-worker").glob(".fault-*"))  # the fault fired
    assert metrics["step"] == cfg.train.steps
    # the restarted group began at a checkpoint (step 4 or 8: the controller registers a reported
    # checkpoint asynchronously, so the newest one may not be registered yet when the worker dies)
    assert metrics["start_step"] in (4, 8)
    assert metrics["centre_version"] == len(kmeans_trigger_steps(12, 4)) == 2
    # switches happen only at scheduled steps; a restarted group may jump straight to the newest
    # version the store computed before the crash (all ranks together)
    assert set(metrics["centre_switch_steps"]) <= {5, 9}


def test_a_killed_store_restarts_from_its_snapshot(ray_session, study, tmp_path):
    from pipeline.train import run

    cfg = smoke("kill-store")
    metrics = run(with_data_root(cfg, study), tmp_path, faults="kill_store:step=6")
    store = metrics["store"]
    assert store["restored"] is True  # Ray restarted it and it read its snapshot
    assert [h["version"] for h in store["history"]] == [1, 2]  # version 1 survived, 2 came after
    assert metrics["centre_version"] == 2 and metrics["step"] == 12


def test_non_finite_steps_are_refused_and_never_reach_the_centres(ray_session, study, tmp_path):
    from pipeline.train import run

    cfg = smoke("nan")
    metrics = run(with_data_root(cfg, study), tmp_path, faults="nan_loss:step=2;nan_activations:step=5")
    assert metrics["skipped_steps"] == 2 and metrics["step"] == 12
    assert metrics["store"]["rejected_rows"] == 0  # the refused steps sent nothing
    assert 0 <= metrics["miou"] <= 1


def test_persistent_nan_stops_the_run_with_a_clear_message(ray_session, study, tmp_path):
    from pipeline.train import run

    cfg = smoke("nan-forever", "train.lr=1e30")
    with pytest.raises(Exception, match="non-finite for 6 consecutive steps"):
        run(with_data_root(cfg, study), tmp_path)


def test_a_truncated_latest_checkpoint_is_named_and_the_one_before_used(ray_session, study, tmp_path):
    from pipeline.train import run

    cfg = with_data_root(smoke("truncated"), study)
    run(cfg, tmp_path)
    (tmp_path / "truncated" / "result.json").unlink()  # as if the driver stopped before writing it
    checkpoints = sorted(p for p in (tmp_path / "ray_results" / "truncated").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # steps 8 and 12 (num_to_keep=2)
    latest = checkpoints[-1] / "state.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    metrics = run(cfg, tmp_path)
    assert metrics["start_step"] == 8 and metrics["step"] == 12  # the older checkpoint, 4 steps trained again


def test_a_store_lost_for_good_ends_the_run_at_once_and_a_corrupt_snapshot_before_training(
        ray_session, study, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.train import run

    cfg = with_data_root(smoke("store-gone", "train.steps=40"), study)
    with pytest.raises(Exception, match="centroid store died and could not be restarted"):
        run(cfg, tmp_path, faults="kill_store_forever:step=6")
    run_dir = tmp_path / "store-gone"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "FAILED"
    logged = [m.step for m in client.get_metric_history(run_id, "loss/task")]
    assert max(logged) <= 12  # it stopped within a few steps, not at step 40
    assert list((tmp_path / "ray_results" / "store-gone").glob("checkpoint_*"))  # kept for the resume
    # the snapshot the store left, corrupted: the re-run fails before its first step and names it
    (run_dir / "store" / "state.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=f"centroid store could not start .*{run_dir / 'store'} is unreadable"):
        run(cfg, tmp_path)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "loss/task")] == logged  # nothing trained


def test_unreachable_mlflow_server_training_goes_on_and_metrics_are_kept(ray_session, study, tmp_path):
    from pipeline.train import run

    cfg = smoke("offline", "tracking.uri=http://127.0.0.1:9")  # port 9: nothing listens
    with pytest.warns(UserWarning, match="unreachable"):
        metrics = run(with_data_root(cfg, study), tmp_path)
    assert metrics["mlflow_run_id"].startswith("offline-")
    lines = (tmp_path / "offline" / "metrics_fallback.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "metrics" in json.loads(line)]
    assert set(range(2, 13, 2)) <= set(steps)  # every logged step is kept locally
    assert (tmp_path / "offline" / "artifacts" / "final_metrics.json").exists()


def test_unwritable_or_full_output_folder_refused_before_training(tmp_path, monkeypatch):
    from pipeline import train

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"{blocker} is a file, not a folder"):
        train.check_output_folder(blocker / "runs")

    class Usage:
        free = 10 * 2**20

    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(ConfigError, match="only 10 MiB free"):
        train.check_output_folder(tmp_path / "runs")


def test_stopped_driver_rerun_resumes_with_the_same_mlflow_run(study, tmp_path, ray_session):
    import ray

    ray.shutdown()  # the driver below starts its own local Ray, in a temporary folder of its own
    ray_dir = tempfile.mkdtemp(prefix="ray-driver-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_dir}
    command = [sys.executable, str(REPO / "pipeline" / "train.py"), "--smoke", "--data", str(study), "--out",
               str(tmp_path), "--name", "driver", "--set", "train.steps=40", "--set", "train.checkpoint_every=4"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 240
    ckpt_root = tmp_path / "ray_results" / "driver"
    # two checkpoint folders (not Ray's checkpoint_manager_snapshot.json, which the pattern also matches):
    # the first is then registered, so the re-run has it to resume from
    while time.time() < deadline and len([p for p in ckpt_root.glob("checkpoint_*") if p.is_dir()]) < 2:
        time.sleep(1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    stop_processes_naming(ray_dir)  # the killed driver's Ray, and nothing else on the machine
    run_id = (tmp_path / "driver" / "mlflow_run_id").read_text()
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    result = json.loads((tmp_path / "driver" / "result.json").read_text())
    assert result["mlflow_run_id"] == run_id
    assert result["start_step"] >= 4 and result["step"] == 40
    ray.init(num_cpus=4)  # leave the module fixture's promise intact

