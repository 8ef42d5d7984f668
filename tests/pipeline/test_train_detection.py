"""Detection and instance segmentation through the whole training path: TorchTrainer with 2 DDP
workers, the centroid store, MLflow, COCOeval at the end. Ray starts once for this module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from divdr.data.study import study_config
from divdr.data.synthetic import generate
from pipeline.config import resolve, with_data_root, with_smoke
from pipeline.schedule import kmeans_trigger_steps

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# the smoke model (micro, 3 layers) has four scales: its FPN gets the pooled P6; Layer17's shape
# (a fifth scale in the last layer) needs 4 layers
HEADS = ["detection.anchor_sizes=[8,16,32,64,128]", "detection.min_size=64", "detection.max_size=128",
         "detection.fpn_channels=16", "detection.representation_size=32", "detection.mask_head_layers=[16]",
         "detection.rpn_batch_size_per_image=64", "detection.box_batch_size_per_image=64"]


@pytest.fixture(scope="module")
def det_study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("det") / "study"
    generate(study_config(n_train=16, n_val=6, height=64, width=128, seed=4), root, "det")
    return root


@pytest.fixture(scope="module")
def instance_run(ray_session, det_study, tmp_path_factory):
    from pipeline.train import run

    out = tmp_path_factory.mktemp("runs")
    cfg = resolve("DivDR-A", None, ["task=instance", "model.layers=4", "model.final_scales=5",
                                    "train.steps=12", "clustering.update_every=4", "store.switch_lag=1",
                                    "train.eval_every=6", "train.lr=0.01", f"data.root={det_study}", *HEADS],
                  base=with_smoke({}))
    return cfg, run(with_data_root(cfg, det_study), out)


def test_workers_streamed_gate_activations_and_switched_centres(instance_run):
    cfg, metrics = instance_run
    store = metrics["store"]
    assert cfg.model.a_dim == 3 * (2 + 3 + 4 + 5)
    assert store["ingest_calls_by_rank"] == [3, 3]  # before each K-means (steps 4, 8) and at step 12
    assert store["held"] == cfg.data.max_train_images and store["rejected_rows"] == 0
    triggers = kmeans_trigger_steps(cfg.train.steps, cfg.clustering.update_every)
    assert [h["trigger_step"] for h in store["history"]] == triggers
    assert metrics["centre_switch_steps"] == [t + cfg.store.switch_lag for t in triggers]


def test_final_metrics_hold_coco_ap_and_backbone_flops(instance_run):
    _, metrics = instance_run
    for name in ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert "miou" not in metrics
    assert 0 < metrics["gflops_real"] < metrics["gflops_real_800x800"]
    assert sum(metrics["cluster_sizes"]) == metrics["val_images"] == 6
    assert 0.0 <= metrics["recovery"] <= 1.0  # the det study carries its subset manifest too


def test_mlflow_holds_the_detection_run(instance_run):
    _, metrics = instance_run
    client = MlflowClient(metrics["tracking_uri"])
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["task"] == "instance"
    for key in ("loss/task", "loss/loss_mask", "loss/loss_classifier", "loss/budget", "loss/clustering",
                "cost/expected_gflops", "final/bbox/AP", "final/segm/AP75", "final/recovery"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/bbox/AP")] == [6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"final_metrics.json", "detections_val.json", "activations_val.parquet", "model.pt"} <= artifacts
    detections = json.loads((Path(metrics["run_dir"]) / "artifacts" / "detections_val.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= set(d) for d in detections)


def test_detection_in_refresh_mode(ray_session, det_study, tmp_path):
    """Faster R-CNN; before each K-means every worker recomputes A(x) of its share of the training
    images through the detector's own preprocessing (no heads run for it)."""
    from pipeline.train import run

    cfg = resolve("DR-A", None, ["task=detection", "train.steps=8", "clustering.update_every=4",
                                 "store.mode=refresh", "name=refresh", f"data.root={det_study}", *HEADS],
                  base=with_smoke({}))
    metrics = run(with_data_root(cfg, det_study), tmp_path)
    assert metrics["store"]["history"][0]["points"] == cfg.data.max_train_images
    assert "segm/AP" not in metrics and 0.0 <= metrics["bbox/AP"] <= 1.0
