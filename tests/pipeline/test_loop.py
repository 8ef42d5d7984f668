"""The plain-PyTorch pieces of the training loop: the optimizer's parameter groups."""

import pytest

from divdr.gates import gate_parameters
from divdr.heads import DynamicRoutingSegmenter
from pipeline.config import resolve
from pipeline.loop import build_optimizer


@pytest.mark.parametrize("kind", ["soft", "gumbel"])
def test_gates_get_their_own_learning_rate(kind):
    cfg = resolve("DR-A", None, ["model_size=micro", f"model.gate.kind={kind}", "train.lr=0.02",
                                 "train.gate_lr_scale=10"])
    net = DynamicRoutingSegmenter(cfg.model)
    optimizer = build_optimizer(net, cfg.train)
    rest, gates = optimizer.param_groups
    assert rest["lr"] == pytest.approx(0.02) and gates["lr"] == pytest.approx(0.2)
    assert {id(p) for p in gates["params"]} == {id(p) for p in gate_parameters(net)}
    assert len(rest["params"]) + len(gates["params"]) == len(list(net.parameters()))
    assert gates["momentum"] == rest["momentum"] == cfg.train.momentum


def test_network_fix_has_one_group():
    cfg = resolve("DR-Raw", None, ["model_size=micro", "model.gate.enabled=false"])
    assert len(build_optimizer(DynamicRoutingSegmenter(cfg.model), cfg.train).param_groups) == 1
