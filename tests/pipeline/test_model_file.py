"""Model files (``<run>/artifacts/model.pt``): the pipeline's own load back, segmenter or detector; anything
else is refused, unrun, with the file named."""

import os
from pathlib import Path

import pytest
import torch

from divdr.config import get_model_config
from divdr.detection import DynamicRoutingDetector, build_detector
from divdr.heads import DynamicRoutingSegmenter
from pipeline.analysis import _model_bytes
from pipeline.model_file import ModelFileError, load_model
from tests.divdr.test_detection import MICRO17, SMALL_HEADS


def _round_trip(net: torch.nn.Module, tmp_path: Path) -> torch.nn.Module:
    path = tmp_path / "model.pt"
    path.write_bytes(_model_bytes(net))
    loaded = load_model(path)
    assert loaded.config == net.config and not loaded.training
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    return loaded


def test_a_segmenter_loads_with_its_config(tmp_path):
    assert isinstance(_round_trip(DynamicRoutingSegmenter(get_model_config("micro")), tmp_path),
                      DynamicRoutingSegmenter)


@pytest.mark.parametrize("task", ["detection", "instance"])
def test_a_detector_loads_with_its_heads(tmp_path, task):
    loaded = _round_trip(build_detector(MICRO17, SMALL_HEADS, 3, task), tmp_path)
    assert isinstance(loaded, DynamicRoutingDetector)
    assert loaded.num_categories == 3 and loaded.masks == (task == "instance") and loaded.detection == SMALL_HEADS


class Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-marker",))


def test_a_planted_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    torch.save({"config": Planted(), "state_dict": {}}, path)
    with pytest.raises(ModelFileError, match=str(path)):
        load_model(path)
    assert not Path("planted-marker").exists()


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ModelFileError, match=f"model file {tmp_path / 'nope.pt'} does not exist"):
        load_model(tmp_path / "nope.pt")
