"""The task layer of the training loop (no Ray): config of the detection tasks, COCO data checks,
batches in torchvision's form, a training step with the budget and clustering losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from divdr.config import ConfigError
from divdr.data.cityscapes import DatasetError
from divdr.data.study import study_config
from divdr.data.synthetic import generate
from divdr.flops import budget_ratio
from divdr.losses import total_loss
from pipeline.config import EMBEDDED_STUDY_DETECTION, resolve, with_data_root
from pipeline.tasks import DetectionTask, SegmentationTask, make_task


@pytest.fixture(scope="module")
def det_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det") / "study"
    generate(study_config(n_train=4, n_val=3, height=64, width=128, seed=2), root, "det")
    return root


def detection_config(root: Path, task: str = "detection", *extra: str):
    return resolve("DivDR-A", None, [f"task={task}", "model_size=tiny", "model.final_scales=5",
                                     f"data.root={root}", "detection.anchor_sizes=[8,16,32,64,128]",
                                     "detection.min_size=64", "detection.max_size=128", "detection.fpn_channels=16",
                                     "detection.representation_size=32", "detection.mask_head_layers=[16]", *extra])


def test_task_defaults_and_errors():
    assert resolve().task == "segmentation"
    with pytest.raises(ConfigError, match="task must be one of"):
        resolve(None, None, ["task=panoptic"])
    with pytest.raises(ConfigError, match=r"resource\.weight .* must be 0 for task 'instance'"):
        resolve("DivDRNet-A", None, ["task=instance"])
    with pytest.raises(ConfigError, match=r"detection\.anchor_sizes must be 5"):
        resolve(None, None, ["task=detection", "detection.anchor_sizes=[8]"])


def test_embedded_study_gets_its_own_detection_scale_and_coco_the_papers():
    embedded = resolve(None, None, ["task=detection"]).detection
    assert embedded.min_size == EMBEDDED_STUDY_DETECTION["min_size"] and embedded.anchor_sizes[0] == 8
    coco = resolve(None, None, ["task=detection", "data.root=/data/coco", "data.train_split=train2017"]).detection
    assert coco.min_size == 800 and coco.max_size == 1333 and coco.anchor_sizes == (32, 64, 128, 256, 512)
    mine = resolve(None, None, ["task=detection", "detection.min_size=100"]).detection
    assert mine.min_size == 100 and mine.max_size == EMBEDDED_STUDY_DETECTION["max_size"]


def test_make_task_picks_the_task(det_study: Path):
    assert isinstance(make_task(with_data_root(detection_config(det_study), det_study)), DetectionTask)
    seg = resolve(None, None, [])
    assert isinstance(make_task(with_data_root(seg, det_study)), SegmentationTask)  # Cityscapes folders are read lazily


@pytest.mark.parametrize("task", ["detection", "instance"])
def test_a_training_step_with_budget_and_clustering_losses(det_study: Path, task: str):
    cfg = detection_config(det_study, task)
    job = make_task(with_data_root(cfg, det_study))
    dataset = job.train_dataset()
    batch = job.collate([dataset[0], dataset[1]])
    assert set(batch["targets"][0]) == {"boxes", "labels"} | ({"masks"} if task == "instance" else set())
    assert batch["sample_id"] == [0, 1]
    net = job.build_model()
    out = job.forward(net, batch)
    assert out.table.decoder == 0 and (out.table.height, out.table.width) == (64, 128)
    assert ("loss/loss_mask" in out.parts) == (task == "instance")
    centres = torch.rand(cfg.clustering.k, cfg.model.a_dim)
    terms = total_loss(out.loss, cost_ratio=budget_ratio(out.backbone.gates, out.table), progress=0.9,
                       budget=cfg.budget, clustering=cfg.clustering, activations=out.backbone.activations,
                       centres=centres, sigma2=0.5)
    assert terms.budget > 0 and terms.clustering >= 0
    terms.total.backward()
    gate_grads = [p.grad for n, p in net.named_parameters() if ".gate." in n]
    assert gate_grads and all(g is not None for g in gate_grads)


def test_inference_scores_and_routing(det_study: Path):
    cfg = detection_config(det_study, "instance")
    job = make_task(with_data_root(cfg, det_study))
    net = job.build_model()
    n_val = job.split_size("val")
    merged = job.merge([job.inference(net, "val", list(range(0, n_val, 2))),
                        job.inference(net, "val", list(range(1, n_val, 2)))])
    assert job.routing(merged).sample_ids.tolist() == list(range(n_val))
    metrics = job.val_metrics(merged)
    assert {"val/bbox/AP", "val/bbox/AP50", "val/bbox/AP75", "val/segm/AP", "val/gflops_real"} <= set(metrics)
    assert 0.0 <= metrics["val/bbox/AP"] <= 1.0


def _rewrite(root: Path, split: str, change) -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_mismatched_categories_are_named(det_study: Path, tmp_path: Path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(det_study, root)
    _rewrite(root, "val", lambda d: d["categories"].append({"id": 99, "name": "bus"}))
    with pytest.raises(DatasetError, match=r"instances_train\.json and .*instances_val\.json list different"):
        make_task(with_data_root(detection_config(root), root))


def test_no_usable_training_annotation_is_named(det_study: Path, tmp_path: Path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(det_study, root)

    def all_crowd(data):
        for ann in data["annotations"]:
            ann["iscrowd"] = 1

    _rewrite(root, "train", all_crowd)
    with pytest.raises(DatasetError, match=r"instances_train\.json: no usable training annotation"):
        make_task(with_data_root(detection_config(root), root))


def test_missing_coco_split_is_named(det_study: Path):
    cfg = detection_config(det_study, "detection", "data.train_split=train2017")
    with pytest.raises(DatasetError, match=r"instances_train2017\.json"):
        make_task(with_data_root(cfg, det_study))


def test_the_embedded_study_is_made_again_on_a_node_that_lacks_it(tmp_path, monkeypatch):
    """On a cluster the driver resolves the embedded study to its own cache; a worker node regenerates it
    (deterministically) in its own, and any other missing root is named with the node."""
    from divdr.data.study import StudyConfig
    from divdr.data.synthetic import cache_key
    from pipeline import tasks

    made = []
    monkeypatch.setattr("divdr.data.synthetic.ensure_default_dataset",
                        lambda kind: made.append(kind) or tmp_path / "here")
    driver_copy = Path("/elsewhere/on/the/driver") / f"synthetic-seg-{cache_key(StudyConfig(), 'seg')}"
    assert tasks.data_on_this_node(driver_copy, "seg") == tmp_path / "here" and made == ["seg"]
    assert tasks.data_on_this_node(tmp_path, "seg") == tmp_path  # present: used as it is
    with pytest.raises(DatasetError, match=r"/data/cityscapes does not exist on this node \(.+\): --data must be"):
        tasks.data_on_this_node(Path("/data/cityscapes"), "seg")


def test_a_dataset_uri_is_fetched_once_per_node_into_the_cache(tmp_path, monkeypatch):
    from pipeline import tasks

    monkeypatch.setenv("DIVDR_CACHE", str(tmp_path / "cache"))
    study = tmp_path / "shared" / "study"
    generate(study_config(n_train=4, n_val=2, height=64, width=128, seed=1), study)
    cfg = with_data_root(resolve("DR-A", None, ["model_size=micro"]), study.as_uri())
    assert cfg.data.root == study.as_uri()  # a URI stays a URI, for every node
    task = make_task(cfg)
    assert task.root.parent == tmp_path / "cache" and task.split_size("train") == 4
    assert sorted(p.name for p in (task.root / "leftImg8bit" / "train").rglob("*.png")) == sorted(
        p.name for p in (study / "leftImg8bit" / "train").rglob("*.png"))
    assert make_task(cfg).root == task.root  # fetched once
    with pytest.raises(DatasetError, match="is not a folder"):
        tasks.data_on_this_node((tmp_path / "nothing").as_uri(), "seg")
