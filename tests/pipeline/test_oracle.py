"""pipeline/oracle.py's model loading: the pipeline's own model files load, anything else is refused unrun."""

import os
from pathlib import Path

import pytest
import torch

from divdr.config import get_model_config
from divdr.heads import DynamicRoutingSegmenter
from pipeline.analysis import _model_bytes
from pipeline.oracle import load_model


def test_a_model_file_of_the_pipeline_loads_with_its_config(tmp_path):
    net = DynamicRoutingSegmenter(get_model_config("micro"))
    path = tmp_path / "model.pt"
    path.write_bytes(_model_bytes(net))
    loaded = load_model(path)
    assert loaded.config == net.config
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


class Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-marker",))


def test_a_planted_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    torch.save({"config": Planted(), "state_dict": {}}, path)
    with pytest.raises(SystemExit, match=str(path)):
        load_model(path)
    assert not Path("planted-marker").exists()
