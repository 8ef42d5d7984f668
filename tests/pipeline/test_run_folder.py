"""Run folders: names that are names, --fresh that deletes only the run, finished runs that stay finished,
one process per run, resumes that refuse another configuration, unreadable checkpoints and snapshots.
The training cases use ``run(..., local=True)`` (the same preparation as a Ray run, no Ray)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from divdr.config import ConfigError
from pipeline.config import redact_uri, resolve, with_data_root, with_smoke
from pipeline.local import CHECKPOINT, PREVIOUS_CHECKPOINT
from pipeline.run_folder import (
    RunFolderError,
    checkpoint_folder,
    config_differences,
    delete_run,
    run_lock,
)
from tests.pipeline.conftest import make_study

REPO = Path(__file__).resolve().parents[2]


def smoke(*overrides: str):
    return resolve("DivDR-A", None, ["train.steps=4", "train.checkpoint_every=2", "clustering.update_every=2",
                                     "store.switch_lag=1", *overrides], base=with_smoke({}))


# ---- names --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".", "..", "/tmp/elsewhere", "a/b", "..\\up", "ray_results", "mlflow.db",
                                  ".locks", "-rf", " padded", "x" * 201, "tab\there"])
def test_a_run_name_that_is_a_path_or_reserved_is_refused(name):
    with pytest.raises(ConfigError, match="is not a valid name"):
        dataclasses.replace(smoke(), name=name)
    if name.strip() == name:
        with pytest.raises(ConfigError):
            smoke(f"name={name}")  # as --name gives it


def test_names_of_sweep_trials_are_valid():
    assert smoke("name=premise-sigma2[variant=sigma2-floor]-seed0").run_name.endswith("seed0")


@pytest.mark.parametrize("name", [".", ".."])
def test_fresh_with_a_dot_name_deletes_nothing(tmp_path, name):
    """The adversarial case: `--name . --fresh` emptied the whole --out (mlflow.db and every run)."""
    out = tmp_path / "out"
    (out / "other-run").mkdir(parents=True)
    (out / "mlflow.db").write_text("keep")
    result = subprocess.run([sys.executable, "pipeline/train.py", "--smoke", "--local", "--out", str(out),
                             "--name", name, "--fresh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not a valid name" in result.stderr
    assert (out / "mlflow.db").read_text() == "keep" and (out / "other-run").is_dir()


# ---- deleting a run ------------------------------------------------------------------------------

def test_fresh_deletes_the_run_and_its_ray_checkpoints_and_nothing_else(tmp_path):
    cfg = smoke("name=victim")
    for path in ("victim/config.yaml", "ray_results/victim/checkpoint_0/state.pt", "ray_results/other/x",
                 "other/config.yaml", "mlflow.db"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    deleted = delete_run(cfg, tmp_path)
    assert deleted == [str(tmp_path / "victim"), str(tmp_path / "ray_results" / "victim")]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "mlflow.db", "other/config.yaml", "ray_results/other/x"]


def test_fresh_deletes_checkpoints_on_storage_given_as_a_uri(tmp_path):
    storage = tmp_path / "shared"
    (storage / "victim" / "checkpoint_0").mkdir(parents=True)
    cfg = smoke("name=victim", f"storage.path={storage.as_uri()}")
    assert checkpoint_folder(cfg, tmp_path) == f"{storage.as_uri()}/victim"
    delete_run(cfg, tmp_path)
    assert not (storage / "victim").exists() and storage.is_dir()


def test_fresh_refuses_a_folder_that_no_run_wrote(tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("years of work")
    with pytest.raises(RunFolderError, match="none a run writes"):
        delete_run(smoke("name=thesis"), tmp_path)
    assert (tmp_path / "thesis" / "chapter1.tex").exists()


# ---- one process per run -------------------------------------------------------------------------

def test_a_second_process_on_the_same_run_is_refused_with_the_holder_named(tmp_path):
    with run_lock(tmp_path, "busy"):
        with pytest.raises(RunFolderError, match=f"in use by pid {os.getpid()}"):
            with run_lock(tmp_path, "busy"):
                pass
    with run_lock(tmp_path, "busy"):  # released at the end
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".locks" / "crashed.lock"
    lock.parent.mkdir()
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "earlier"}))
    with run_lock(tmp_path, "crashed"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


# ---- configurations ------------------------------------------------------------------------------

def test_config_differences_name_what_changed_but_not_where_things_are():
    a, b = smoke("name=r").to_dict(), resolve("DivDR-A", None, ["name=r", "model_size=tiny", "data.root=/x",
                                                                 "tracking.uri=sqlite:///y.db"]).to_dict()
    differences = config_differences(a, b)
    assert "model_size: 'micro' -> 'tiny'" in differences
    assert not any(d.startswith(("data.root", "tracking.uri", "name")) for d in differences)


def test_how_batches_are_loaded_may_change_on_resume():
    """The loader's settings change how fast batches come, never which (pipeline.train_data)."""
    a = smoke("name=r").to_dict()
    b = smoke("name=r", "data.loader_workers=0", "data.pin_memory=true", "data.persistent_workers=false",
              "data.prefetch_factor=4").to_dict()
    assert config_differences(a, b) == []
    del a["data"]["loader_workers"]  # a run started before the loader had settings
    assert config_differences(a, b) == []


def test_credentials_in_the_tracking_uri_are_never_saved_or_printed():
    cfg = smoke("tracking.uri=http://alice:s3cret@127.0.0.1:5000")
    assert cfg.tracking.uri == "http://alice:s3cret@127.0.0.1:5000"  # the runtime keeps it
    assert "s3cret" not in json.dumps(cfg.to_dict()) + json.dumps(cfg.flat())
    assert redact_uri(cfg.tracking.uri) == "http://alice:***@127.0.0.1:5000"


# ---- whole runs (local runner) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory, n_train=8, n_val=4, seed=5)


@pytest.fixture(scope="module")
def finished(study, tmp_path_factory):
    from pipeline.train import run

    out = tmp_path_factory.mktemp("finished")
    cfg = with_data_root(smoke("name=done"), study)
    return cfg, out, run(cfg, out, local=True)


@pytest.mark.slow
def test_a_finished_run_is_neither_retrained_nor_overwritten(finished):
    from pipeline.train import run

    cfg, out, first = finished
    result = out / "done" / "result.json"
    before = result.read_bytes()
    with pytest.raises(RunFolderError, match="already finished"):
        run(cfg, out, local=True)
    assert run(cfg, out, existing="resume", local=True) == json.loads(before)
    assert result.read_bytes() == before
    history = MlflowClient(first["tracking_uri"]).get_metric_history(first["mlflow_run_id"], "final/miou")
    assert len(history) == 1


@pytest.mark.slow
def test_fresh_trains_again_from_scratch_in_a_new_mlflow_run(finished, tmp_path):
    import shutil

    from pipeline.train import run

    cfg, out, first = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    again = run(cfg, copy, existing="fresh", local=True)
    assert again["start_step"] == 0 and again["step"] == cfg.train.steps
    assert again["mlflow_run_id"] != first["mlflow_run_id"]


@pytest.mark.slow
def test_a_resume_with_another_configuration_is_refused_and_says_what_differs(finished, tmp_path):
    import shutil

    from pipeline.train import run

    cfg, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "done" / "result.json").unlink()  # as if stopped before the end
    saved = (copy / "done" / "config.yaml").read_text()
    changed = with_data_root(smoke("name=done", "model_size=tiny", "clustering.k=3"), cfg.data.root)
    with pytest.raises(RunFolderError, match=r"(?s)clustering\.k: 2 -> 3.*model_size: 'micro' -> 'tiny'"):
        run(changed, copy, local=True)
    assert (copy / "done" / "config.yaml").read_text() == saved  # not overwritten


@pytest.mark.slow
def test_a_truncated_checkpoint_is_named_and_the_previous_one_used(finished, tmp_path, capsys):
    import shutil

    from pipeline.train import run

    cfg, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run_dir = copy / "done"
    (run_dir / "result.json").unlink()
    assert torch.load(run_dir / PREVIOUS_CHECKPOINT, weights_only=True)["step"] == 2
    latest = run_dir / CHECKPOINT
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    resumed = run(cfg, copy, local=True)
    assert resumed["start_step"] == 2 and resumed["step"] == cfg.train.steps
    assert f"checkpoint {latest} is unreadable" in capsys.readouterr().out
    (run_dir / "result.json").unlink()
    for path in (latest, run_dir / PREVIOUS_CHECKPOINT):
        path.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=f"(?s)no readable checkpoint.*{latest}"):
        run(cfg, copy, local=True)


@pytest.mark.slow
def test_an_unreadable_store_snapshot_fails_before_training_and_the_mlflow_run_is_failed(finished, tmp_path):
    import shutil

    from pipeline.train import run

    cfg, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run_dir = copy / "done"
    (run_dir / "result.json").unlink()
    (run_dir / "store" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"centroid store snapshot {run_dir / 'store'} is unreadable"):
        run(cfg, copy, local=True)
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "FAILED"


def test_k_larger_than_the_training_set_is_refused_before_anything_is_written(study, tmp_path):
    from pipeline.train import run

    cfg = with_data_root(smoke("name=big-k", "clustering.k=7", "data.max_train_images=6"), study)
    with pytest.raises(ConfigError, match=r"clustering\.k = 7 needs at least 7 training images; the run trains on 6"):
        run(cfg, tmp_path, local=True)
    assert not (tmp_path / "big-k").exists()


def test_resume_without_a_run_and_orphan_checkpoints_are_refused(study, tmp_path):
    from pipeline.train import run

    cfg = with_data_root(smoke("name=ghost"), study)
    with pytest.raises(RunFolderError, match="no run 'ghost'"):
        run(cfg, tmp_path, existing="resume", local=True)
    (tmp_path / "ray_results" / "ghost" / "checkpoint_2026").mkdir(parents=True)
    with pytest.raises(RunFolderError, match="--fresh deletes them"):
        run(cfg, tmp_path, local=True)
