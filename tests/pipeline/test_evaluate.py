"""pipeline/evaluate.py: a finished run's model scored without training gives the run's own figures, and
its labelIds PNGs score the same under ``divdr eval-seg``. One smoke segmentation run (and one detection
run) trained in this process, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from divdr.cli import main as divdr_main
from divdr.data.labels import TRAIN_ID_NAMES
from divdr.data.study import study_config
from divdr.data.synthetic import generate
from pipeline.config import resolve, with_data_root, with_smoke
from pipeline.evaluate import main
from pipeline.train import run
from tests.pipeline.conftest import make_study

pytestmark = pytest.mark.slow

# the smoke model's detection heads, small (tests/pipeline/test_train_detection.py)
HEADS = ["detection.anchor_sizes=[8,16,32,64,128]", "detection.min_size=64", "detection.max_size=128",
         "detection.fpn_channels=16", "detection.representation_size=32", "detection.mask_head_layers=[16]",
         "detection.rpn_batch_size_per_image=64", "detection.box_batch_size_per_image=64"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory, n_train=12, n_val=6, seed=4)


@pytest.fixture(scope="module")
def seg_run(study, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs")
    cfg = resolve("DivDR-A", None, ["train.steps=8", "clustering.update_every=4", "store.switch_lag=1", "name=seg"],
                  base=with_smoke({}))
    metrics = run(with_data_root(cfg, study), out, local=True)
    return Path(metrics["run_dir"]), json.loads((Path(metrics["run_dir"]) / "result.json").read_text())


def _evaluate_json(capsys, *argv: str) -> dict:
    main([*map(str, argv), "--json"])
    return json.loads(capsys.readouterr().out)


def test_the_model_scores_what_the_run_reported(seg_run, capsys):
    run_dir, reported = seg_run
    report = _evaluate_json(capsys, run_dir)
    assert report["images"] == reported["val_images"] == 6
    assert report["miou"] == pytest.approx(reported["miou"], abs=1e-12)
    assert report["gflops_real"] == pytest.approx(reported["gflops_real"], rel=1e-9)
    assert report["gflops_real_1024x2048"] == pytest.approx(reported["gflops_real_1024x2048"], rel=1e-9)
    assert list(report["per_class_iou"]) == list(TRAIN_ID_NAMES)
    # the run's reported centres: every val image in the cluster the run gave it
    assert report["centres"] == str(run_dir / "artifacts" / "centres.npy")
    assert report["clusters_as_reported"] == [6, 6]
    assert report["cluster_sizes"] == reported["cluster_sizes"]
    table = pq.read_table(run_dir / "evaluation" / "images.parquet").to_pydict()
    assert set(table) == {"image", "subset", "cluster", "distance", "gflops", "gflops_1024x2048"}
    assert len(table["image"]) == 6 and min(table["distance"]) >= 0
    assert (run_dir / "evaluation" / "routes.png").stat().st_size > 0
    assert json.loads((run_dir / "evaluation" / "evaluation.json").read_text())["miou"] == report["miou"]


def test_divdr_eval_seg_scores_the_written_labelids_pngs_the_same(seg_run, study, capsys):
    run_dir, _ = seg_run
    report = _evaluate_json(capsys, run_dir)
    predictions = run_dir / "evaluation" / "labelIds"
    for image in sorted((study / "leftImg8bit" / "val").rglob("*_leftImg8bit.png")):  # the val images' own paths
        city, name = image.parent.name, image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        assert (predictions / "val" / city / name).is_file()
    assert divdr_main(["eval-seg", "--pred", str(predictions), "--gt", str(study / "gtFine" / "val"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["num_images"] == 6
    assert scored["miou"] == pytest.approx(report["miou"], abs=1e-12)


def test_the_text_report_names_the_figures_and_the_eval_seg_command(seg_run, capsys):
    run_dir, reported = seg_run
    main([str(run_dir)])
    text = capsys.readouterr().out
    miou = f"{100 * reported['miou']:.2f}"
    assert f"mIoU {miou}" in text and f"(the run reported mIoU {miou})" in text
    assert "road" in text and "at 1024x2048" in text and "6 of the 6 images the run clustered as it did" in text
    assert f"divdr eval-seg --pred {run_dir / 'evaluation' / 'labelIds'}" in text


def test_each_clusters_route_exported_as_a_static_network(seg_run, tmp_path, capsys):
    """--export-routes: one torch.export program per cluster with images, loadable without divdr, that gives
    the static network's predictions; its FLOPs and mIoU on its cluster's images next to the dynamic net's."""
    run_dir, _ = seg_run
    report = _evaluate_json(capsys, run_dir, "--out", tmp_path / "ev", "--export-routes")
    rows = [row for row in report["routes"] if row["images"]]
    assert sum(row["images"] for row in report["routes"]) == report["images"] and rows
    images = {row["cluster"]: row["images"] for row in report["routes"]}
    assert [images[c] for c in range(len(report["cluster_sizes"]))] == report["cluster_sizes"]
    for row in rows:
        assert 0 <= row["miou_static"] <= 1 and 0 <= row["miou_dynamic"] <= 1
        assert 0 < row["gflops"] < report["gflops_real"] * 2
        program = torch.export.load(row["file"])
        assert not any("gate" in name for name, _ in program.named_parameters())
    assert (tmp_path / "ev" / "routes").is_dir()


def test_another_dataset_of_the_same_layout_is_scored_whole(seg_run, tmp_path, capsys):
    run_dir, _ = seg_run
    other = tmp_path / "other"
    generate(study_config(n_train=2, n_val=4, height=64, width=96, seed=9), other)
    image = sorted((other / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[0]
    label = other / "gtFine" / "val" / image.parent.name / image.name.replace("_leftImg8bit", "_gtFine_labelIds")
    # one more val image of another size: a dataset need not be of one size
    Image.open(image).resize((80, 48)).save(image.with_name("zz_000000_000000_leftImg8bit.png"))
    Image.open(label).resize((80, 48), Image.NEAREST).save(label.with_name("zz_000000_000000_gtFine_labelIds.png"))
    report = _evaluate_json(capsys, run_dir, "--data", other)
    assert report["images"] == 5 and not report["own_data"] and report["clusters_as_reported"] is None
    assert report["out"] == str(run_dir / "evaluation-other") and report["image_sizes"] == [[48, 80], [64, 96]]
    assert 0.0 <= report["miou"] <= 1.0


def test_bad_input_is_named(seg_run, tmp_path, capsys):
    run_dir, _ = seg_run
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert f"{tmp_path} is not a run folder" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        main([str(run_dir), "--out", str(foreign)])
    assert "holds files this command did not write" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit):
        main([str(run_dir), "--data", str(tmp_path / "nowhere")])
    assert f"data root {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def det_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("det") / "study"
    generate(study_config(n_train=12, n_val=4, height=64, width=128, seed=4), root, "det")
    out = tmp_path_factory.mktemp("det-runs")
    cfg = resolve("DR-A", None, ["task=detection", "train.steps=6", "clustering.update_every=3", "store.switch_lag=1",
                                 "train.lr=0.01", "name=det", *HEADS], base=with_smoke({}))
    metrics = run(with_data_root(cfg, root), out, local=True)
    return Path(metrics["run_dir"]), json.loads((Path(metrics["run_dir"]) / "result.json").read_text())


def test_a_detection_run_is_scored_with_coco_ap(det_run, capsys):
    run_dir, reported = det_run
    report = _evaluate_json(capsys, run_dir)
    assert report["task"] == "detection" and report["images"] == reported["val_images"]
    assert report["bbox/AP"] == pytest.approx(reported["bbox/AP"], abs=1e-12)
    assert report["gflops_real_800x800"] == pytest.approx(reported["gflops_real_800x800"], rel=1e-9)
    assert report["clusters_as_reported"] == [report["images"]] * 2
    assert isinstance(json.loads((run_dir / "evaluation" / "detections_val.json").read_text()), list)
