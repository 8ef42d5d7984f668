"""Layer17, the DR detector (torchvision FPN + Faster/Mask R-CNN heads) and its COCO evaluation path."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from divdr.config import ConfigError, get_model_config
from divdr.data.coco import CocoDetection, collate_fn
from divdr.data.manifest import SUBSET_MANIFEST, read_subset_manifest
from divdr.data.study import LARGE, THIN, TINY, StudyConfig
from divdr.data.synthetic import generate
from divdr.detection import POOL_LEVEL, DetectionConfig, build_detector
from divdr.detection_eval import (
    detections_to_coco,
    run_detection_inference,
    score_detections,
)
from divdr.flops import cost_table
from divdr.gates import SoftGate
from divdr.routing import routing_space
from tests.divdr.data.test_data_coco import hand_written

STUDY = StudyConfig(height=64, width=128, n_train=4, n_val=4, seed=5,
                    regimes=(LARGE, replace(TINY, crowd_probability=1.0), THIN))
SMALL_HEADS = DetectionConfig(fpn_channels=16, anchor_sizes=(8, 16, 32, 64, 128), min_size=64, max_size=128,
                              representation_size=32, mask_head_layers=(16,), rpn_batch_size_per_image=64,
                              box_batch_size_per_image=64)
# Layer17's shape (last layer at 1/4 .. 1/64) at a size that runs in a second
MICRO17 = get_model_config("tiny", channels=8, layers=4, final_scales=5)


@pytest.fixture(scope="module")
def det_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det") / "study"
    generate(STUDY, root, "det")
    return root


def split(root: Path, name: str, train: bool) -> CocoDetection:
    return CocoDetection(root / name, root / "annotations" / f"instances_{name}.json", train=train)


# ------------------------------------------------------------------------------------------ Layer17


def test_layer17_routing_space_gives_the_papers_198_dimensions():
    config = get_model_config("layer17")
    specs = routing_space(config)
    assert config.cells_per_layer == (2, 3) + (4,) * 14 + (5,)
    assert config.routing_cells == 66 and config.a_dim == 198 == 66 * 3
    # layer 15 is no longer the last: its 1/32 cell goes down into the 17th layer's 1/64 cell
    assert [s.allow_down for s in specs if s.layer == 15] == [True, True, True, True]
    assert all(not s.allow_up and not s.allow_down for s in specs if s.layer == 16)
    assert [s.channels for s in specs if s.layer == 16] == [64, 128, 256, 512, 1024]
    # the other reading of "Layer17" that gives 198: 17 four-scale layers plus the initial cell
    other = replace(config, final_scales=4, init_cell_in_a_space=True)
    assert other.routing_cells == 65 and other.a_dim == 198


def test_layer16_is_unchanged_by_the_fifth_scale_option():
    assert get_model_config("layer16").cells_per_layer == (2, 3) + (4,) * 14


def test_five_scales_need_four_layers():
    with pytest.raises(ConfigError, match=r"final_scales=5 needs model\.layers >= 4"):
        get_model_config("micro", final_scales=5)
    with pytest.raises(ConfigError, match=r"model\.final_scales must be 4"):
        get_model_config("micro", final_scales=6)


def test_layer17_backbone_gflops_at_800():
    table = cost_table(get_model_config("layer17"), 800, 800, with_decoder=False)
    assert table.decoder == 0
    # 800 is a multiple of 32: the 1/64 maps are ceil(25 / 2) = 13 wide, counted as such
    assert table.backbone_all_open / 1e9 == pytest.approx(33.23, abs=0.01)
    layer16 = cost_table(get_model_config("layer16"), 800, 800, with_decoder=False)
    assert table.backbone_all_open > layer16.backbone_all_open


def test_summary_reports_layer17_at_800(capsys):
    from divdr.cli import main

    assert main(["summary", "--model", "layer17", "--size", "800x800", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["a_dim"] == 198 and info["cells"] == 66 and info["final_scales"] == 5
    assert info["task"] == "detection" and info["params_detector"] > info["params_backbone"]
    assert info["gflops_backbone_all_open"] == pytest.approx(33.23, abs=0.01)
    assert info["paper"]["a_dim"] == 198


# ------------------------------------------------------------------------------------------ detector


@pytest.mark.parametrize("task", ["detection", "instance"])
def test_forward_backward_of_both_heads_on_the_dr_backbone(det_study: Path, task: str):
    dataset = split(det_study, "train", train=True)
    model = build_detector(MICRO17, SMALL_HEADS, dataset.num_categories, task)
    assert model.backbone.level_names == ["scale0", "scale1", "scale2", "scale3", "scale4"]
    empty = next(i for i in range(len(dataset)) if len(dataset.target(i)["boxes"]) == 0)
    images, targets = collate_fn([dataset[0], dataset[empty]])
    out = model(images, targets)
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert set(out.losses) == expected | ({"loss_mask"} if task == "instance" else set())
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.backbone.activations.shape == (2, MICRO17.a_dim)
    assert out.image_size == (64, 128)
    sum(out.losses.values()).backward()
    # the detection losses reach every gate: the routes are trained by the task, as in segmentation
    gates = [m for m in model.modules() if isinstance(m, SoftGate)]
    assert gates and all(g.project.weight.grad is not None and g.project.weight.grad.abs().sum() > 0 for g in gates)
    model.eval()
    with torch.no_grad():
        evaluated = model(images)
    assert evaluated.losses == {} and len(evaluated.detections) == 2
    keys = {"boxes", "labels", "scores"} | ({"masks"} if task == "instance" else set())
    assert set(evaluated.detections[0]) == keys


def test_four_scale_backbone_gets_a_pooled_fifth_level():
    model = build_detector(get_model_config("micro"), SMALL_HEADS, 2, "detection")
    assert model.backbone.level_names[-1] == POOL_LEVEL and len(model.backbone.level_names) == 5


def test_bad_detection_config_is_named():
    with pytest.raises(ConfigError, match=r"detection\.anchor_sizes must be 5"):
        DetectionConfig(anchor_sizes=(8, 16))
    with pytest.raises(ConfigError, match="task must be one of"):
        build_detector(MICRO17, SMALL_HEADS, 2, "segmentation")


# ------------------------------------------------------------------------------------------ evaluation


def ground_truth_as_detections(dataset: CocoDetection) -> tuple[list[dict], list[int]]:
    """Every non-crowd ground-truth instance as a detection of score 1 (crowds stay ignore regions)."""
    detections, ids = [], []
    for index in range(len(dataset)):
        target = dataset.target(index)
        keep = target["iscrowd"] == 0
        detections.append({"boxes": target["boxes"][keep], "labels": target["labels"][keep],
                           "scores": torch.ones(int(keep.sum())),
                           "masks": target["masks"][keep][:, None].float()})
        ids.append(target["image_id"])
    return detections, ids


def test_ground_truth_against_itself_scores_ap_1(det_study: Path):
    dataset = split(det_study, "val", train=False)
    detections, ids = ground_truth_as_detections(dataset)
    results = detections_to_coco(detections, ids, dataset.label_to_category, masks=True)
    assert {r["category_id"] for r in results} <= set(dataset.category_to_label)  # COCO ids, not labels
    scores = score_detections(dataset.coco.dataset, results, ids, ("bbox", "segm"))
    for name in ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75"):
        assert scores[name] == pytest.approx(1.0), name


def test_bad_input_self_evaluates_to_ap_1(tmp_path: Path):
    """Sparse category ids, annotation ids from 500, a crowd RLE, polygons, an image without
    annotations: ground truth against itself scores 1.0, crowds being ignore regions."""
    path, data = hand_written(tmp_path)
    data["annotations"] = [a for a in data["annotations"] if a["bbox"][2] > 0]  # the degenerate one: below
    path.write_text(json.dumps(data))
    dataset = CocoDetection(tmp_path / "images", path, train=False)
    detections, ids = ground_truth_as_detections(dataset)
    results = detections_to_coco(detections, ids, dataset.label_to_category, masks=True)
    assert [r["category_id"] for r in results] == [90]
    scores = score_detections(dataset.coco.dataset, results, ids, ("bbox", "segm"))
    assert scores["bbox/AP"] == pytest.approx(1.0) and scores["segm/AP"] == pytest.approx(1.0)


def test_a_degenerate_ground_truth_box_counts_as_missed(tmp_path: Path):
    """A zero-width box is no training target (torchvision rejects it) but stays in the ground
    truth COCOeval scores (pycocotools' rule): its category (3) scores 0, the other (90) 1."""
    path, _ = hand_written(tmp_path)
    dataset = CocoDetection(tmp_path / "images", path, train=False)
    assert dataset.dropped_degenerate == 1
    detections, ids = ground_truth_as_detections(dataset)
    results = detections_to_coco(detections, ids, dataset.label_to_category, masks=True)
    scores = score_detections(dataset.coco.dataset, results, ids, ("bbox", "segm"))
    assert scores["bbox/AP"] == pytest.approx(0.5) and scores["segm/AP"] == pytest.approx(0.5)


def test_scoring_only_the_images_inferred(det_study: Path):
    dataset = split(det_study, "val", train=False)
    detections, ids = ground_truth_as_detections(dataset)
    first = detections_to_coco(detections[:1], ids[:1], dataset.label_to_category, masks=False)
    assert score_detections(dataset.coco.dataset, first, ids[:1], ("bbox",))["bbox/AP"] == pytest.approx(1.0)
    assert score_detections(dataset.coco.dataset, [], ids, ("bbox",))["bbox/AP"] == 0.0


def test_inference_gives_results_routes_and_flops(det_study: Path):
    dataset = split(det_study, "val", train=False)
    model = build_detector(MICRO17, SMALL_HEADS, dataset.num_categories, "instance")
    manifest = read_subset_manifest(det_study / SUBSET_MANIFEST)
    result = run_detection_inference(model, dataset, batch_size=2, indices=[0, 1, 2], manifest=manifest)
    routing = result.routing
    assert routing.sample_ids.tolist() == [0, 1, 2] and routing.files[0].startswith("val/")
    assert set(routing.subsets.tolist()) <= {0, 1, 2} and routing.activations.shape == (3, MICRO17.a_dim)
    assert (routing.real_gflops > 0).all() and (routing.real_gflops_reference > routing.real_gflops).all()
    assert all({"image_id", "category_id", "score", "bbox", "segmentation"} <= set(r) for r in result.results)
    routes_only = run_detection_inference(model, dataset, batch_size=2, indices=[0, 1, 2], predict=False)
    assert routes_only.results == []
    assert routes_only.routing.activations == pytest.approx(routing.activations, abs=1e-6)
