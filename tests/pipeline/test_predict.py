"""pipeline/predict.py: any image a user has through a finished run's model. The slow tests share one smoke
run trained in this process (no Ray); the others need no model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from divdr.config import get_model_config
from divdr.detection import DetectionConfig, build_detector
from pipeline.analysis import _model_bytes
from pipeline.config import resolve, with_data_root, with_smoke
from pipeline.predict import ImageJob, collect_images, main, network_size
from tests.pipeline.conftest import make_study


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> Path:
    from pipeline.train import run

    study = make_study(tmp_path_factory, n_train=8, n_val=2, seed=3)
    cfg = resolve("DR-A", None, ["train.steps=4", "clustering.update_every=2", "store.switch_lag=1", "name=p"],
                  base=with_smoke({}))
    return Path(run(with_data_root(cfg, study), tmp_path_factory.mktemp("runs"), local=True)["run_dir"])


def _scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2] = (70, 130, 180)  # a sky over a road, and some noise
    image[height // 2:] = (128, 64, 128)
    return np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    paths = {"jpeg": folder / "odd.jpg", "grey": folder / "grey.png", "rgba": folder / "nested" / "rgba.png",
             "grey16": folder / "grey16.png", "grey8": folder / "grey8.png", "corrupt": folder / "corrupt.png",
             "text": folder / "notes.png"}
    Image.fromarray(_scene(45, 77)).save(paths["jpeg"], quality=90)  # not a multiple of the network's 32
    Image.fromarray(_scene(64, 96, 1)).convert("L").save(paths["grey"])
    rgba = Image.fromarray(_scene(50, 70, 2)).convert("RGBA")
    rgba.putalpha(100)
    rgba.save(paths["rgba"])
    grey = np.asarray(Image.fromarray(_scene(40, 60, 3)).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(paths["grey16"])  # 16-bit: the same picture, scaled
    Image.fromarray(grey).save(paths["grey8"])
    paths["corrupt"].write_bytes(paths["grey"].read_bytes()[:200])  # a PNG cut short
    paths["text"].write_text("not an image, whatever its name says")
    return paths


@pytest.mark.slow
def test_every_kind_of_image_is_predicted_and_a_bad_file_is_named(seg_run, images, tmp_path, capsys):
    out = tmp_path / "out"
    status = main([str(seg_run), "--images", *map(str, images.values()), "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1  # one file failed, the others were predicted
    assert f"cannot read image {images['corrupt']}" in captured.err
    assert f"cannot read image {images['text']}" in captured.err
    assert "2 path(s) failed" in captured.err
    table = pq.read_table(out / "predictions.parquet").to_pylist()
    rows = {Path(r["image"]).name: r for r in table}
    assert set(rows) == {"odd.jpg", "grey.png", "rgba.png", "grey16.png", "grey8.png"}
    expected_sizes = {"odd.jpg": (45, 77), "grey.png": (64, 96), "rgba.png": (50, 70), "grey16.png": (40, 60)}
    k = resolve("DR-A", None, [], base=with_smoke({})).clustering.k
    for name, (height, width) in expected_sizes.items():
        row = rows[name]
        assert (row["height"], row["width"]) == (height, width)
        assert 0 <= row["cluster"] < k and row["distance"] >= 0
        assert 0 < row["gflops"] < row["gflops_1024x2048"]
        for column in ("prediction", "label_ids"):  # mapped back to the image's own size
            with Image.open(row[column]) as written:
                assert written.size == (width, height)
        assert Path(row["route"]).stat().st_size > 0
    # a 16-bit image is scaled to 8 bits, not clipped to white: it is predicted as its 8-bit twin
    sixteen, eight = (np.asarray(Image.open(rows[n]["label_ids"])) for n in ("grey16.png", "grey8.png"))
    assert np.array_equal(sixteen, eight)
    assert rows["grey16.png"]["cluster"] == rows["grey8.png"]["cluster"]
    assert "5 image(s) predicted" in captured.out


@pytest.mark.slow
def test_a_folder_is_searched_and_large_images_are_scaled_for_the_network(seg_run, images, tmp_path):
    big = images["jpeg"].parent / "big.png"
    Image.fromarray(_scene(100, 300)).save(big)
    images["corrupt"].unlink()
    images["text"].unlink()
    out = tmp_path / "out"
    assert main([str(seg_run), "--images", str(images["jpeg"].parent), "--out", str(out), "--max-side", "64"]) == 0
    rows = {r["image"]: r for r in pq.read_table(out / "predictions.parquet").to_pylist()}
    assert str(images["rgba"]) in rows  # found in a subfolder
    assert (out / "in" / "nested" / "rgba_prediction.png").is_file()  # named by its path in the folder
    row = rows[str(big)]
    assert (row["height"], row["width"], row["network_height"], row["network_width"]) == (100, 300, 21, 64)
    with Image.open(row["prediction"]) as prediction:
        assert prediction.size == (300, 100)


@pytest.mark.slow
def test_a_detection_run_is_refused(seg_run, tmp_path, capsys):
    run_dir = tmp_path / "det"
    shutil.copytree(seg_run, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["task"] = "detection"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    heads = DetectionConfig(fpn_channels=16, anchor_sizes=(8, 16, 32, 64, 128), min_size=64, max_size=128,
                            representation_size=32, mask_head_layers=(16,))
    (run_dir / "artifacts" / "model.pt").write_bytes(_model_bytes(build_detector(get_model_config("micro"), heads, 2,
                                                                                 "detection")))
    assert main([str(run_dir), "--images", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is a detection run; pipeline/predict.py draws segmentation" in capsys.readouterr().err


def test_images_are_collected_from_files_and_folders_and_missing_paths_named(tmp_path):
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for name in ("a/x.PNG", "b/x.jpg", "notes.txt", "c.jpeg"):
        (folder / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    given = tmp_path / "x.tif"
    given.write_bytes(b"")
    jobs, errors = collect_images([folder, given, tmp_path / "gone.png", tmp_path / "empty"])
    assert [j.path.relative_to(tmp_path).as_posix() for j in jobs] == [
        "photos/a/x.PNG", "photos/b/x.jpg", "photos/c.jpeg", "x.tif"]  # case-insensitive, no .txt
    assert [j.name for j in jobs] == ["photos/a/x", "photos/b/x", "photos/c", "x"]
    assert errors == [f"{tmp_path / 'gone.png'} does not exist",
                      f"folder {tmp_path / 'empty'} holds no image (.png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp)"]


def test_two_images_with_one_output_name_get_distinct_names(tmp_path):
    for name in ("a.png", "a.jpg"):
        (tmp_path / name).write_bytes(b"")
    jobs, _ = collect_images([tmp_path / "a.png", tmp_path / "a.jpg"])
    assert jobs == [ImageJob(tmp_path / "a.png", "a"), ImageJob(tmp_path / "a.jpg", "a-2")]


def test_only_images_over_the_limit_are_scaled_down():
    assert network_size(45, 77, 2048) == (45, 77)
    assert network_size(1500, 3000, 2048) == (1024, 2048)
    assert network_size(3000, 10, 300) == (300, 1)
    assert network_size(5000, 5000, 0) == (5000, 5000)  # 0: never


def test_bad_options_are_refused(tmp_path, capsys):
    assert main([str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--alpha", "2"]) == 2
    assert "--alpha must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert main([str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path} is not a run folder" in capsys.readouterr().err
