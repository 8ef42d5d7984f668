"""pipeline/oracle.py's model loading: a bad model file ends the command with its error (the loading itself:
tests/pipeline/test_model_file.py)."""

from pathlib import Path

import pytest
import torch

from pipeline.oracle import load_model
from tests.pipeline.test_model_file import Planted


def test_a_planted_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    torch.save({"config": Planted(), "state_dict": {}}, path)
    with pytest.raises(SystemExit, match=str(path)):
        load_model(path)
    assert not Path("planted-marker").exists()
