import json
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from divdr.config import GateConfig, get_model_config
from divdr.flops import (
    CONVS_ONLY,
    OFFICIAL,
    budget_ratio,
    conv,
    conv_bn_relu,
    cost_table,
    expected_cost,
    real_cost,
    sepconv3x3x2_cost,
)
from divdr.heads import DynamicRoutingSegmenter

MICRO = get_model_config("micro", num_classes=4)


def test_formulas_by_hand():
    # 3x3 conv 8 -> 16 on 10x10, stride 1: 9*8*16*100 multiply-adds
    assert conv(10, 10, 8, 16, 3) == 115_200
    # depthwise 3x3 on 8 channels, stride 2: 9*1*8*5*5
    assert conv(10, 10, 8, 8, 3, stride=2, groups=8) == 1_800
    # + BN (2 per element) + ReLU (1 per element) on the 5x5x16 output
    assert conv_bn_relu(10, 10, 8, 16, 1, OFFICIAL, stride=2) == 8 * 16 * 25 + 3 * 25 * 16
    # SepConv3x3x2 on 4x4x2: dw 9*2*16 + (pw 2*2*16 + bn 64 + relu 32) + dw 288 + pw 64 + bn 64
    assert sepconv3x3x2_cost(4, 4, 2, OFFICIAL) == 288 + (64 + 64 + 32) + 288 + 64 + 64


def test_layer16_matches_paper_within_two_percent():
    table = cost_table(get_model_config("layer16"), 1024, 2048)
    assert table.all_open / 1e9 == pytest.approx(103.1, rel=0.02)


def test_cost_table_is_for_the_size_asked():
    config = get_model_config("small")
    small, large = cost_table(config, 256, 512), cost_table(config, 512, 1024)
    # every layer is convolutional: 4x the pixels, 4x the FLOPs (up to the 1x1 gate projection)
    assert large.all_open == pytest.approx(4 * small.all_open, rel=1e-9)
    assert float(large.gate.sum()) == pytest.approx(4 * float(small.gate.sum()), rel=0.01)
    # sizes are padded to a multiple of 32 like the network input
    assert cost_table(config, 250, 500).all_open == small.all_open


def test_analytic_count_equals_flop_counter_on_the_all_open_network():
    """FlopCounterMode counts 2 FLOPs per multiply-add of convolutions and nothing for BN, ReLU,
    pooling and interpolation; the CONVS_ONLY convention counts exactly the multiply-adds, so
    the two agree to the FLOP. The official figure adds BN (2/element) and ReLU (1/element)."""
    config = replace(MICRO, gate=GateConfig(enabled=False))
    model = DynamicRoutingSegmenter(config).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    assert counter.get_total_flops() == 2 * cost_table(config, 64, 96, CONVS_ONLY).all_open
    official = cost_table(config, 64, 96).all_open
    assert official > cost_table(config, 64, 96, CONVS_ONLY).all_open


def test_gate_cost_counted_by_flop_counter_too():
    model = DynamicRoutingSegmenter(MICRO).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    table = cost_table(MICRO, 64, 64, CONVS_ONLY)
    # the gates never close every path of a fresh network here: real cost = conv MACs executed
    assert float(real_cost(out.backbone.gates, table)[0]) * 2 == counter.get_total_flops()


def test_expected_and_real_cost_bounds_and_gradient():
    table = cost_table(MICRO, 64, 64)
    n = MICRO.routing_cells + 1
    open_gates = torch.tensor([[0.0, 1.0, 1.0]]).repeat(n, 1)[None]
    closed = torch.zeros(1, n, 3)
    assert float(real_cost(closed, table)[0]) == pytest.approx(table.fixed)
    assert float(expected_cost(closed, table)[0]) == pytest.approx(table.fixed)
    assert float(budget_ratio(closed, table)[0]) == 0.0
    half = torch.full((1, n, 3), 0.5, requires_grad=True)
    ratio = budget_ratio(half, table)
    assert 0 < float(ratio.detach()) < 1
    ratio.sum().backward()
    assert (half.grad >= 0).all() and half.grad.sum() > 0
    # a gate that opens any amount pays the full real cost of its path
    tiny_open = torch.full((1, n, 3), 1e-3)
    assert float(real_cost(tiny_open, table)[0]) == pytest.approx(table.fixed + table.routing_all_open)
    assert float(real_cost(open_gates, table)[0]) <= table.fixed + table.routing_all_open


def test_summary_json_for_layer16(capsys):
    from divdr.cli import main

    assert main(["summary", "--model", "layer16", "--size", "1024x2048", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["a_dim"] == 183 and info["cells"] == 61
    assert info["gflops_all_open"] == pytest.approx(103.1, rel=0.02)
    assert info["params_without_gates"] / 1e6 == pytest.approx(15.3, rel=0.02)
    assert info["params"] / 1e6 == pytest.approx(17.8, rel=0.02)


def test_summary_bad_size_is_a_clear_error(capsys):
    from divdr.cli import main

    assert main(["summary", "--model", "micro", "--size", "big"]) == 2
    assert "--size must look like HEIGHTxWIDTH" in capsys.readouterr().err


def test_summary_from_config_file(tmp_path, capsys):
    from divdr.cli import main

    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  layers: 4\n  channels: 8\n")
    assert main(["summary", "--config", str(path), "--size", "64x64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cells"] == 2 + 3 + 4 + 4
    path.write_text("model:\n  layers: 4\n  channelz: 8\n")
    assert main(["summary", "--config", str(path)]) == 2
    assert "channelz" in capsys.readouterr().err
