"""A route exported as a static gate-free network gives the dynamic network's outputs on that route."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from divdr.config import ConfigError, GateConfig, get_model_config
from divdr.export import cluster_routes, export_route, forced_route, route_flops
from divdr.flops import cost_table, real_cost
from divdr.heads import DynamicRoutingSegmenter

TINY = get_model_config("tiny", num_classes=5)


def _trained_like(config, seed=0):
    """A network whose BatchNorms hold non-trivial statistics (folding them must matter)."""
    torch.manual_seed(seed)
    net = DynamicRoutingSegmenter(config).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 3, 64, 96))
    return net.eval()


def _random_route(net, closed_rate, seed):
    g = torch.Generator().manual_seed(seed)
    cells = len(net.backbone.cells)
    route = torch.rand(cells, 3, generator=g) * (torch.rand(cells, 3, generator=g) >= closed_rate)
    # only the paths a cell has
    for i, cell in enumerate(net.backbone.cells):
        route[i] *= torch.tensor(cell.spec.paths, dtype=torch.float32)
    return route


@pytest.mark.parametrize("closed_rate", [0.0, 0.5, 0.9, 1.0])
def test_exported_route_gives_the_dynamic_outputs(closed_rate):
    net = _trained_like(TINY)
    route = _random_route(net, closed_rate, seed=int(closed_rate * 10))
    images = torch.randn(3, 3, 70, 100)  # not a multiple of 32: padded and cropped as the segmenter does
    with torch.no_grad(), forced_route(net, route):
        dynamic = net(images)
    assert torch.equal(dynamic.backbone.gates[0], route)
    static = export_route(net, route)
    with torch.no_grad():
        logits = static(images)
    assert logits.shape == dynamic.logits.shape
    assert torch.allclose(logits, dynamic.logits, atol=1e-4, rtol=1e-4)
    # no gate, no closed path, no dropped cell in the exported network; its FLOPs are the route's
    assert not any("gate" in name for name, _ in static.named_parameters())
    table = cost_table(TINY, 70, 100)
    assert route_flops(net, route, 70, 100) == pytest.approx(float(real_cost(route[None], table)[0]) - float(
        table.gate.sum()))
    assert sum(p.numel() for p in static.parameters()) <= sum(p.numel() for p in net.parameters())
    # the gates are untouched after the block
    assert all(cell.forced_weights is None for cell in net.backbone.cells)


def test_exported_route_compiles_to_one_graph():
    net = _trained_like(TINY)
    static = export_route(net, _random_route(net, 0.5, seed=3))
    explained = torch._dynamo.explain(static)(torch.randn(1, 3, 64, 64))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_network_fix_and_gumbel_without_skip_export():
    for gate in (GateConfig(enabled=False), GateConfig(kind="gumbel")):
        net = _trained_like(replace(TINY, gate=gate))
        images = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            gates = net(images).backbone.gates
            route = gates[0]
            with forced_route(net, route):
                expected = net(images[:1]).logits
            assert torch.allclose(export_route(net, route)(images[:1]), expected, atol=1e-4, rtol=1e-4)


def test_cluster_routes_and_bad_routes_named():
    net = _trained_like(TINY)
    gates = torch.rand(6, len(net.backbone.cells), 3)
    routes = cluster_routes(gates, np.array([0, 0, 2, 2, 2, 0]), 3)
    assert sorted(routes) == [0, 2]  # cluster 1 has no image: no route
    assert torch.allclose(routes[2], gates[2:5].mean(0))
    with pytest.raises(ValueError, match=r"clusters 0 \.\. 1"):
        cluster_routes(gates, np.array([0, 0, 2, 2, 2, 0]), 2)
    with pytest.raises(ValueError, match="shape"):
        export_route(net, torch.rand(4, 3))
    with pytest.raises(ValueError, match=">= 0"):
        export_route(net, -torch.ones(len(net.backbone.cells), 3))
    with pytest.raises(ConfigError, match="skip"):
        export_route(_trained_like(replace(TINY, gate=GateConfig(kind="gumbel", skip_branch=True))),
                     torch.ones(len(net.backbone.cells), 3))
    with pytest.raises(RuntimeError, match="for inference"):
        export_route(net, routes[0]).train()
