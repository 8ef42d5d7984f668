"""pipeline/model_file.py: a run's model.pt loads as the network it was (segmenter or detector), and
anything else is refused with the file named, never unpickled."""

import os

import pytest
import torch

from divdr.config import get_model_config
from divdr.detection import DetectionConfig, DynamicRoutingDetector, build_detector
from divdr.heads import DynamicRoutingSegmenter
from pipeline.analysis import _model_bytes
from pipeline.model_file import ModelFileError, load_model, load_weights

SMALL_HEADS = DetectionConfig(fpn_channels=16, anchor_sizes=(8, 16, 32, 64, 128), min_size=64, max_size=128,
                              representation_size=32, mask_head_layers=(16,))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(b.state_dict()[name], tensor) for name, tensor in a.state_dict().items())


def test_a_detector_file_loads_as_the_detector_with_its_heads(tmp_path):
    net = build_detector(get_model_config("micro"), SMALL_HEADS, 3, "instance")
    path = tmp_path / "model.pt"
    path.write_bytes(_model_bytes(net))
    loaded = load_model(path)
    assert isinstance(loaded, DynamicRoutingDetector) and not loaded.training
    assert loaded.masks and loaded.num_categories == 3 and loaded.detection == SMALL_HEADS
    assert _same_weights(net, loaded)


def test_a_segmenter_file_loads_in_eval_mode(tmp_path):
    net = DynamicRoutingSegmenter(get_model_config("micro"))
    path = tmp_path / "model.pt"
    path.write_bytes(_model_bytes(net))
    loaded = load_model(path)
    assert isinstance(loaded, DynamicRoutingSegmenter) and not loaded.training and _same_weights(net, loaded)


def test_missing_foreign_and_mismatched_files_are_named(tmp_path):
    with pytest.raises(ModelFileError, match=f"model file {tmp_path / 'none.pt'} does not exist"):
        load_model(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match=f"{junk} is not a model file"):
        load_model(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(ModelFileError, match=f"{plain} is not a model file written by this pipeline: expected"):
        load_model(plain)
    other = tmp_path / "other.pt"
    torch.save({"config": get_model_config("tiny"),
                "state_dict": DynamicRoutingSegmenter(get_model_config("micro")).state_dict()}, other)
    with pytest.raises(ModelFileError, match=f"{other}: its weights do not fit"):
        load_model(other)


def test_load_weights_starts_a_network_from_a_file_and_names_one_that_does_not_fit(tmp_path):
    """train.init_from: the file's weights into a fresh network; another size or kind is refused by name."""
    trained = DynamicRoutingSegmenter(get_model_config("micro"))
    path = tmp_path / "model.pt"
    path.write_bytes(_model_bytes(trained))
    fresh = DynamicRoutingSegmenter(get_model_config("micro"))
    assert not _same_weights(trained, fresh)
    assert load_weights(fresh, path) is fresh and _same_weights(trained, fresh)
    with pytest.raises(ModelFileError, match=f"the weights of {path} do not fit this run's network .*Missing key"):
        load_weights(DynamicRoutingSegmenter(get_model_config("tiny")), path)
    with pytest.raises(ModelFileError, match=f"{path} holds a DynamicRoutingSegmenter, this run trains a "
                                             "DynamicRoutingDetector"):
        load_weights(build_detector(get_model_config("micro"), SMALL_HEADS, 3, "detection"), path)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_weights(fresh, tmp_path / "none.pt")


class Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-marker",))


def test_a_planted_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    torch.save({"config": Planted(), "state_dict": {}}, path)
    with pytest.raises(ModelFileError, match=str(path)):
        load_model(path)
    assert not (tmp_path / "planted-marker").exists()
