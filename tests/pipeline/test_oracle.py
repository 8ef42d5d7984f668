"""pipeline/oracle.py without training: a bad model file ends the command with its error (the loading itself:
tests/pipeline/test_model_file.py), and experts trained earlier are rescored (training them: test_train_ray.py)."""

from pathlib import Path

import pytest
import torch

from divdr.config import get_model_config
from divdr.data.manifest import subset_names as manifest_subset_names
from divdr.heads import DynamicRoutingSegmenter
from pipeline.analysis import _model_bytes
from pipeline.oracle import load_model
from pipeline.oracle import main as oracle_main
from tests.pipeline.conftest import make_study
from tests.pipeline.test_model_file import Planted


def test_a_planted_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    torch.save({"config": Planted(), "state_dict": {}}, path)
    with pytest.raises(SystemExit, match=str(path)):
        load_model(path)
    assert not Path("planted-marker").exists()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory, n_train=6, n_val=3, seed=2)


def _write_experts(out: Path, names: list[str]) -> dict[str, Path]:
    paths = {}
    for i, name in enumerate(names):
        torch.manual_seed(i)
        path = out / f"oracle-{name}" / "artifacts" / "model.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(_model_bytes(DynamicRoutingSegmenter(get_model_config("micro"))))
        paths[name] = path
    return paths


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("--reuse-experts trained an expert or started Ray")


def test_reused_experts_are_scored_on_the_training_images_and_the_first_table_is_kept(study, tmp_path, monkeypatch):
    """--reuse-experts --split train: the experts under --out scored (nothing trained, no Ray) on the train
    images of their subsets, an expert compared on every subset, into a file of its own."""
    monkeypatch.setattr("pipeline.oracle.run", _must_not_be_called)
    monkeypatch.setattr("pipeline.oracle.init_ray", _must_not_be_called)
    experts = _write_experts(tmp_path, ["large", "thin", "tiny"])
    (tmp_path / "oracle.md").write_text("the table of the call that trained the experts\n")
    rows = oracle_main(["--smoke", "--out", str(tmp_path), "--set", f"data.root={study}", "--reuse-experts",
                        "--split", "train", "--compare", str(experts["thin"])])
    oracle = rows[f"oracle (experts per subset trained earlier under {tmp_path})"]
    thin_everywhere = rows[str(experts["thin"])]
    assert oracle["images"] == thin_everywhere["images"] == 6  # the train split, each image once
    assert set(oracle["per_subset_miou"]) == {0, 1, 2}
    thin = {v: k for k, v in manifest_subset_names(study).items()}["thin"]
    assert oracle["per_subset_miou"][thin] == pytest.approx(thin_everywhere["per_subset_miou"][thin])
    assert (tmp_path / "oracle.md").read_text() == "the table of the call that trained the experts\n"
    rescored = list(tmp_path.glob("rescored-train-*.md"))
    assert len(rescored) == 1 and rescored[0].read_text().startswith("| model | mIoU (all train) |")


def test_reuse_without_trained_experts_names_the_missing_one(study, tmp_path):
    _write_experts(tmp_path, ["large", "tiny"])
    with pytest.raises(SystemExit, match=f"no expert 'oracle-thin' under {tmp_path}"):
        oracle_main(["--smoke", "--out", str(tmp_path), "--set", f"data.root={study}", "--reuse-experts"])
