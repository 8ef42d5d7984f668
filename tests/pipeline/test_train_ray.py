"""The whole training path through Ray Train: 2 DDP workers, the centroid store, MLflow.

Ray starts once for this module (slow: ~1 minute in all on 2 cores).
"""

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import resolve, with_data_root, with_smoke
from pipeline.schedule import kmeans_trigger_steps
from tests.pipeline.conftest import make_study

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory, n_train=24, n_val=9, seed=3)


@pytest.fixture(scope="module")
def smoke_run(ray_session, tiny_study, tmp_path_factory):
    from pipeline.train import run

    out = tmp_path_factory.mktemp("runs")
    cfg = resolve("DivDR-A", None, ["train.steps=12", "clustering.update_every=4", "store.switch_lag=1",
                                    "train.eval_every=6"], base=with_smoke({}))
    return cfg, out, run(with_data_root(cfg, tiny_study), out)


def test_centres_updated_at_the_scheduled_steps(smoke_run):
    cfg, _, metrics = smoke_run
    triggers = kmeans_trigger_steps(cfg.train.steps, cfg.clustering.update_every)
    assert triggers == [4, 8]
    history = metrics["store"]["history"]
    assert [h["trigger_step"] for h in history] == triggers
    assert [h["version"] for h in history] == [1, 2]
    # every rank switched to version v at trigger[v] + switch_lag
    assert metrics["centre_switch_steps"] == [t + cfg.store.switch_lag for t in triggers]
    assert metrics["centre_version"] == 2


def test_every_worker_streamed_to_the_store(smoke_run):
    cfg, _, metrics = smoke_run
    store = metrics["store"]
    calls = store["ingest_calls_by_rank"]
    # per rank: A(x) sent before each K-means (steps 4, 8) and at the last step (store.send_every 10 > 4)
    assert cfg.train.steps == 12 and cfg.store.send_every == 10 and calls == [3, 3]
    assert store["held"] == cfg.data.max_train_images  # the 16 images of the shards, all seen
    assert store["rejected_rows"] == 0
    assert all(h["points"] == store["held"] or h["points"] <= store["held"] for h in store["history"])


def test_final_metrics_are_real(smoke_run):
    _, _, metrics = smoke_run
    assert 0.0 <= metrics["miou"] <= 1.0
    assert metrics["gflops_real"] > 0 and metrics["gflops_real_1024x2048"] > metrics["gflops_real"]
    assert 0.0 <= metrics["recovery"] <= 1.0  # the study has a subset manifest
    assert 0.0 <= metrics["subset_probe"] <= 1.0 and 0.0 <= metrics["subset_variance_share"] <= 1.0
    assert 0 < len(metrics["gflops_by_subset_1024x2048"]) <= 3 and min(metrics["gflops_by_subset_1024x2048"]) > 0
    # each subset's mIoU, from the two workers' shards merged, in the order of the GFLOPs
    assert len(metrics["miou_by_subset"]) == len(metrics["gflops_by_subset_1024x2048"])
    assert all(0.0 <= m <= 1.0 for m in metrics["miou_by_subset"])
    assert sum(metrics["cluster_sizes"]) == metrics["val_images"] == 6


def test_mlflow_holds_the_run_with_metrics_and_artifacts(smoke_run):
    cfg, _, metrics = smoke_run
    client = MlflowClient(metrics["tracking_uri"])
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.run_name
    assert run.data.params["clustering.k"] == str(cfg.clustering.k)
    for key in ("loss/task", "loss/total", "lr", "images_per_s", "kmeans/inter", "final/miou", "final/recovery"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [6]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/task")]
    assert steps == list(range(cfg.train.log_every, cfg.train.steps + 1, cfg.train.log_every))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_metrics.json", "activations_val.parquet", "activations_train.parquet",
            "a_space.png", "nearest_images.png", "model.pt"} <= artifacts
    import pyarrow.parquet as pq

    table = pq.read_table(Path(metrics["run_dir"]) / "artifacts" / "activations_val.parquet")
    assert {"image", "split", "cluster", "a"} <= set(table.column_names)
    assert table.num_rows == 6 and all(p.startswith("leftImg8bit/val/") for p in table.column("image").to_pylist())
    a = np.stack(table.column("a").to_numpy(zero_copy_only=False))
    assert a.shape == (6, cfg.model.a_dim)


def test_the_saved_model_scores_what_the_run_reported(smoke_run, tiny_study):
    """Two ranks keep their own BatchNorm statistics; the run's scores must be those of the model it saves."""
    from pipeline.oracle import load_model
    from pipeline.tasks import make_task

    cfg, _, metrics = smoke_run
    net = load_model(Path(metrics["run_dir"]) / "artifacts" / "model.pt")
    task = make_task(with_data_root(cfg, tiny_study))
    scores = task.val_metrics(task.inference(net, "val", range(task.split_size("val"))))
    assert scores["val/miou"] == pytest.approx(metrics["miou"], abs=1e-9)


def test_refresh_mode_clusters_every_training_image_with_current_weights(ray_session, tiny_study, tmp_path):
    """The paper's exact semantics: before each K-means every worker recomputes A(x) of its share
    of the training set; training steps send nothing. Run with DRNets' Gumbel gates and resource
    regulariser (DivDRNet-A), so that gate family goes through TorchTrainer too."""
    from pipeline.train import run

    cfg = resolve("DivDRNet-A", None, ["train.steps=8", "clustering.update_every=4", "store.mode=refresh",
                                       "name=refresh"], base=with_smoke({}))
    assert cfg.model.gate.kind == "gumbel" and cfg.resource.weight > 0
    metrics = run(with_data_root(cfg, tiny_study), tmp_path)
    store = metrics["store"]
    assert [h["trigger_step"] for h in store["history"]] == [4]
    assert store["history"][0]["points"] == cfg.data.max_train_images  # every image, not just a batch
    assert metrics["centre_switch_steps"] == [4 + cfg.store.switch_lag]
    # one refresh pass per rank, sent in one chunk each (8 images per rank < REFRESH_CHUNK)
    assert store["ingest_calls_by_rank"] == [1, 1]
    assert 0 <= metrics["miou"] <= 1 and metrics["gflops_real"] > 0


def test_oracle_trains_one_expert_per_subset_and_compares(smoke_run, tiny_study, tmp_path):
    """pipeline/oracle.py: one DR expert per known subset, each evaluated on its own val images;
    the smoke DivDR model evaluated on the same images per subset, in the same table. The experts train
    with --local (each run's Ray path is pipeline.train.run's, tested above; three Ray Train starts would
    add ~50 s)."""
    from pipeline.oracle import main as oracle_main

    _, _, metrics = smoke_run
    model = Path(metrics["run_dir"]) / "artifacts" / "model.pt"
    rows = oracle_main(["--smoke", "--out", str(tmp_path), "--set", f"data.root={tiny_study}", "--local",
                        "--set", "train.steps=4", "--compare", str(model)])
    oracle, compared = rows["oracle (DR-A expert per subset)"], rows[str(model)]
    n_val = 9  # the whole val split of tiny_study: every image goes to the expert of its subset
    assert oracle["images"] == compared["images"] == n_val
    assert set(oracle["per_subset_miou"]) == set(compared["per_subset_miou"]) == {0, 1, 2}
    for row in (oracle, compared):
        assert 0.0 <= row["miou"] <= 1.0 and row["gflops_real"] > 0
    experts = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("oracle-"))
    assert experts == ["oracle-large", "oracle-thin", "oracle-tiny"]
    assert not (tmp_path / "ray_results").exists()  # --local: no Ray Train run
    assert (tmp_path / "oracle.md").read_text().startswith("| model | mIoU (all val) |")
