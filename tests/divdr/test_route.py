"""Fixed routes (ModelConfig.route): the one-route networks of the controlled study's experts."""

import pytest
import torch

from divdr.config import ConfigError, GateConfig, get_model_config
from divdr.flops import budget_ratio, cost_table, real_cost
from divdr.heads import DynamicRoutingSegmenter
from divdr.routing import a_space_labels, route_paths, routing_space

TINY = get_model_config("tiny", num_classes=4)


def open_cells(route: tuple[int, ...]) -> dict[tuple[int, int], tuple[bool, bool, bool]]:
    config = get_model_config("tiny", route=route)
    return {(s.layer, s.scale): p for s, p in zip(routing_space(config), route_paths(config), strict=True) if any(p)}


def test_no_route_leaves_every_path_a_cell_has():
    assert route_paths(TINY) == [spec.paths for spec in routing_space(TINY)]


def test_fine_column_never_leaves_quarter_scale():
    cells = open_cells((0,))
    assert set(cells) == {(layer, 0) for layer in range(-1, TINY.layers)}
    assert all(paths == (False, True, False) for paths in cells.values())


def test_coarse_column_is_reached_by_the_diagonal_and_closes_the_stem_passthrough():
    cells = open_cells((2,))
    # the initial cell (1/4) and layer 0's 1/8 cell only go down; from layer 1 on the 1/16 column keeps
    assert cells[(-1, 0)] == (False, False, True)
    assert cells[(0, 1)] == (False, False, True)
    assert all(cells[(layer, 2)] == (False, True, False) for layer in range(1, TINY.layers))
    assert len(cells) == 2 + TINY.layers - 1


def test_two_scales_move_between_each_other():
    cells = open_cells((2, 3))
    assert cells[(3, 2)] == (False, True, True) and cells[(3, 3)] == (True, True, False)
    assert cells[(TINY.layers - 1, 3)] == (False, True, False)  # the last layer only keeps


def test_route_must_name_distinct_existing_scales():
    with pytest.raises(ConfigError, match=r"model\.route"):
        get_model_config("tiny", route=(4,))
    with pytest.raises(ConfigError, match=r"model\.route"):
        get_model_config("tiny", route=(1, 1))


@pytest.mark.parametrize("route", [(0,), (1,), (2,), (1, 2)])
def test_closed_paths_weigh_zero_and_cost_nothing(route):
    config = get_model_config("tiny", num_classes=4, route=route)
    net = DynamicRoutingSegmenter(config).eval()
    images = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        gates = net(images).backbone.gates
    allowed = torch.tensor(route_paths(config), dtype=torch.bool)
    assert (gates[:, ~allowed] == 0).all()
    table = cost_table(config, 64, 128)
    # what the route leaves open, every open path computed: all a closed path may cost is nothing
    ceiling = table.fixed + float((table.cell * allowed.any(-1)).sum() + (table.paths * allowed).sum())
    assert (real_cost(gates, table) <= ceiling + 1).all()
    assert ceiling < 0.7 * table.all_open


def test_one_route_network_without_gates_trains_and_matches_its_open_route():
    config = get_model_config("tiny", num_classes=4, route=(1,), gate=GateConfig(enabled=False))
    net = DynamicRoutingSegmenter(config)
    out = net(torch.randn(2, 3, 64, 128))
    expected = torch.tensor(route_paths(config), dtype=torch.float32)
    assert torch.equal(out.backbone.gates[0], expected)
    out.logits.mean().backward()
    # budget ratio of a fixed route: its own share of the routing space, the same for every image
    ratio = budget_ratio(out.backbone.gates, cost_table(config, 64, 128))
    assert torch.allclose(ratio[0], ratio[1]) and 0.1 < float(ratio[0]) < 0.4
    closed_cell = next(c for c, p in zip(net.backbone.cells, route_paths(config), strict=True) if not any(p))
    assert all(p.grad is None for p in closed_cell.op.parameters())  # never computed


def test_skipping_inference_equals_the_dense_forward_on_a_route():
    config = get_model_config("tiny", num_classes=4, route=(0, 1))
    net = DynamicRoutingSegmenter(config).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        skipping = net(images).logits
        for cell in net.backbone.cells:  # every path of every cell computed, closed ones weighted 0
            cell.forward = lambda x, cell=cell: cell._forward_all_paths(x, *cell.route(x))
        dense = net(images).logits
    assert torch.allclose(dense, skipping, atol=1e-5)


@pytest.mark.parametrize("init_in_a_space", [True, False])
def test_a_space_labels_name_each_value_of_a_x(init_in_a_space):
    config = get_model_config("tiny", init_cell_in_a_space=init_in_a_space)
    labels = a_space_labels(config)
    assert len(labels) == config.a_dim and len(set(labels)) == config.a_dim
    assert labels[:3] == (["init_scale0.up", "init_scale0.keep", "init_scale0.down"] if init_in_a_space
                          else ["layer0_scale0.up", "layer0_scale0.keep", "layer0_scale0.down"])
    last = routing_space(config)[-1]
    assert labels[-1] == f"layer{last.layer}_scale{last.scale}.down"
