"""``pipeline/train.py --local``: the training loop in one process, no Ray."""

import json
import sys
from pathlib import Path

import pytest
import torch

from divdr.config import ConfigError
from pipeline.config import resolve, with_data_root, with_smoke
from pipeline.local import CHECKPOINT
from pipeline.model_file import load_model
from pipeline.schedule import kmeans_trigger_steps, switch_step
from pipeline.train import run
from tests.pipeline.conftest import make_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory, n_train=12, n_val=6, seed=4)


@pytest.fixture(scope="module")
def local_run(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    cfg = resolve("DivDR-A", None, ["train.steps=10", "clustering.update_every=4", "store.switch_lag=1",
                                    "train.eval_every=6", "train.checkpoint_every=5"], base=with_smoke({}))
    return cfg, out, run(with_data_root(cfg, study), out, local=True)


def test_no_ray_is_imported(local_run):
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_centres_switch_on_the_same_schedule_as_the_ray_workers(local_run):
    cfg, _, metrics = local_run
    triggers = kmeans_trigger_steps(cfg.train.steps, cfg.clustering.update_every)
    assert triggers == [4, 8]
    assert metrics["centre_switch_steps"] == [switch_step(t, cfg.store.switch_lag) for t in triggers]
    history = metrics["store"]["history"]
    assert [h["trigger_step"] for h in history] == triggers
    # streaming: A(x) sent before each K-means (steps 4, 8) and at the last step (store.send_every 10 > 4)
    assert cfg.store.send_every == 10 and metrics["store"]["ingest_calls_by_rank"] == [3]


def test_outputs_are_those_of_a_ray_run(local_run):
    cfg, out, metrics = local_run
    run_dir = Path(metrics["run_dir"])
    assert run_dir == out / cfg.run_name
    assert json.loads((run_dir / "result.json").read_text())["miou"] == metrics["miou"]
    assert {"final_metrics.json", "activations_val.parquet", "a_space.png", "model.pt"} <= {
        p.name for p in (run_dir / "artifacts").iterdir()}
    assert (run_dir / "store" / "state.json").is_file()
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert state["step"] == cfg.train.steps and state["centre_version"] == 2
    assert 0.0 <= metrics["recovery"] <= 1.0 and metrics["gflops_real"] > 0


def test_mlflow_holds_the_local_run(local_run):
    from mlflow.tracking import MlflowClient

    _, _, metrics = local_run
    client = MlflowClient(metrics["tracking_uri"])
    found = client.get_run(metrics["mlflow_run_id"])
    assert found.info.status == "FINISHED" and found.data.tags["runner"] == "local"
    for key in ("loss/task", "kmeans/inter", "val/miou", "final/miou"):
        assert key in found.data.metrics, key
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val/miou")] == [6]
    # the study's learning curves at each evaluation: share, recovery by the current centres, GFLOPs and mIoU
    # by subset
    for key in ("val/subset_variance_share", "val/subset_probe", "val/recovery", "val/gflops_subset0",
                "val/miou_subset0"):
        assert [m.step for m in client.get_metric_history(found.info.run_id, key)] == [6], key
    assert 0.0 <= found.data.metrics["val/recovery"] <= 1.0 and 0.0 <= found.data.metrics["val/subset_probe"] <= 1.0


def test_mlflow_has_the_model_the_per_class_iou_and_the_code(local_run):
    """What MLflow's users look for: a loadable model, per-class scores, the commit, the training view."""
    import json

    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    _, _, metrics = local_run
    client = MlflowClient(metrics["tracking_uri"])
    found = client.get_run(metrics["mlflow_run_id"])
    per_class = json.loads((Path(metrics["run_dir"]) / "artifacts" / "per_class_iou.json").read_text())
    scored = {name: value for name, value in per_class.items() if value == value}  # NaN: a class never seen
    assert scored and all(found.data.metrics[f"final/iou/{name}"] == pytest.approx(v) for name, v in scored.items())
    assert len(found.data.tags["mlflow.source.git.commit"]) == 40
    experiment = client.get_experiment(found.info.experiment_id)
    assert experiment.name == "single runs"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    mlflow.set_tracking_uri(metrics["tracking_uri"])
    [logged] = mlflow.search_logged_models(experiment_ids=[found.info.experiment_id], output_format="list")
    assert logged.source_run_id == found.info.run_id
    net = mlflow.pytorch.load_model(logged.model_uri)
    saved = torch.load(Path(metrics["run_dir"]) / "artifacts" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())


def test_a_stopped_local_run_resumes_from_its_checkpoint(study, tmp_path):
    cfg = resolve("DR-A", None, ["train.steps=6", "train.checkpoint_every=3", "name=resume"], base=with_smoke({}))
    first = run(with_data_root(cfg, study), tmp_path, local=True)
    state = torch.load(Path(first["run_dir"]) / CHECKPOINT, weights_only=True)
    state["step"] = 3  # as if stopped after the checkpoint of step 3 (so before writing its result)
    torch.save(state, Path(first["run_dir"]) / CHECKPOINT)
    (Path(first["run_dir"]) / "result.json").unlink()
    second = run(with_data_root(cfg, study), tmp_path, local=True)
    assert second["start_step"] == 3 and second["step"] == 6


def test_train_init_from_starts_the_run_from_a_models_weights(study, local_run, tmp_path):
    """Fine-tuning (the oracle's experts): the run starts from the file's weights, not a random draw; a
    missing file is named before anything is written."""
    source = Path(local_run[2]["run_dir"]) / "artifacts" / "model.pt"
    cfg = resolve("DR-A", None, ["train.steps=2", "train.lr=1e-12", f"train.init_from={source}", "name=tuned"],
                  base=with_smoke({}))
    tuned_dir = Path(run(with_data_root(cfg, study), tmp_path, local=True)["run_dir"])
    tuned = load_model(tuned_dir / "artifacts" / "model.pt")
    start = dict(load_model(source).named_parameters())
    assert all(torch.allclose(p, start[name], atol=1e-6) for name, p in tuned.named_parameters())
    missing = resolve("DR-A", None, [f"train.init_from={tmp_path / 'none.pt'}", "name=none"], base=with_smoke({}))
    with pytest.raises(ConfigError, match=f"model file {tmp_path / 'none.pt'} does not exist"):
        run(with_data_root(missing, study), tmp_path / "out", local=True)
    assert not (tmp_path / "out" / "none").exists()


def test_a_relative_init_from_reaches_the_workers_as_an_absolute_path(study, local_run, tmp_path, monkeypatch):
    """A Ray worker does not run in the launch directory (the oracle's experts failed there with a relative
    path): the configuration handed to training names the file absolutely."""
    source = Path(local_run[2]["run_dir"]) / "artifacts" / "model.pt"
    monkeypatch.chdir(source.parent.parent)
    cfg = resolve("DR-A", None, ["train.init_from=artifacts/model.pt", "name=relative"], base=with_smoke({}))
    handed: list = []
    monkeypatch.setattr("pipeline.train._train", lambda cfg, *args: handed.append(cfg) or {})
    run(with_data_root(cfg, study), tmp_path)
    assert handed[0].train.init_from == str(source.resolve())
