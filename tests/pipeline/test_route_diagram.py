"""pipeline/route_diagram.py: the geometry of a route (which paths are drawn, from where to where), not pixels."""

import numpy as np
import pytest
from PIL import Image

from divdr.config import get_model_config
from divdr.routing import DOWN, KEEP, UP, routing_space
from pipeline.route_diagram import (
    column_of,
    open_paths,
    path_segments,
    route_from_activations,
    routes_figure,
)

MICRO = get_model_config("micro")  # 3 layers: cells per layer [2, 3, 4], plus the initial cell


def _index(layer: int, scale: int) -> int:
    return next(i for i, s in enumerate(routing_space(MICRO)) if (s.layer, s.scale) == (layer, scale))


def test_exactly_the_open_paths_are_drawn_from_each_cell_to_the_next_layer():
    gates = np.zeros((len(routing_space(MICRO)), 3))
    gates[_index(-1, 0), DOWN] = 0.9  # initial cell: 1/4 -> layer 0's 1/8
    gates[_index(0, 1), UP] = 0.4  # layer 0 at 1/8 -> layer 1 at 1/4
    gates[_index(0, 1), KEEP] = 1e-5  # under the threshold: closed, as inference skips it
    gates[_index(1, 0), DOWN] = 0.7  # layer 1 at 1/4 -> layer 2 at 1/8
    gates[_index(2, 1), KEEP] = 0.2  # the last layer keeps into the decoder column
    drawn = {(s.cell, s.slot, s.start, s.end, round(s.weight, 6)) for s in open_paths(MICRO, gates)}
    assert drawn == {
        (_index(-1, 0), DOWN, (0, 0), (1, 1), 0.9),
        (_index(0, 1), UP, (1, 1), (2, 0), 0.4),
        (_index(1, 0), DOWN, (2, 0), (3, 1), 0.7),
        (_index(2, 1), KEEP, (3, 1), (4, 1), 0.2),
    }


def test_the_space_has_every_path_a_cell_has_and_no_other():
    segments = path_segments(MICRO, np.zeros((len(routing_space(MICRO)), 3)))
    specs = routing_space(MICRO)
    assert len(segments) == sum(sum(spec.paths) for spec in specs)
    assert not any(s.is_open for s in segments)
    for s in segments:
        spec = specs[s.cell]
        assert s.start == (column_of(spec.layer), spec.scale)
        assert s.end[0] == s.start[0] + 1 and abs(s.end[1] - s.start[1]) <= 1
        assert 0 <= s.end[1] < MICRO.num_scales
    last = [s for s in segments if specs[s.cell].layer == MICRO.layers - 1]
    assert {s.slot for s in last} == {KEEP}  # the last layer only keeps (into the decoder)


def test_a_fixed_route_leaves_its_closed_paths_out_of_the_space():
    from dataclasses import replace

    config = replace(MICRO, route=(0,))  # the 1/4 column only
    segments = path_segments(config, np.zeros((len(routing_space(config)), 3)))
    assert {s.slot for s in segments} == {KEEP} and {s.start[1] for s in segments} == {0}


def test_a_centre_becomes_a_route_with_the_initial_cell_unknown():
    a = np.arange(MICRO.a_dim, dtype=float) / MICRO.a_dim
    gates = route_from_activations(MICRO, a)
    assert gates.shape == (len(routing_space(MICRO)), 3)
    assert np.isnan(gates[0]).all()  # the initial cell is not in A(x) by default
    assert np.array_equal(gates[1:].reshape(-1), a)
    assert not any(s.cell == 0 for s in open_paths(MICRO, gates))  # unknown is never drawn as open
    with pytest.raises(ValueError, match=f"{MICRO.a_dim} values"):
        route_from_activations(MICRO, a[:-1])


def test_gates_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="gates must be"):
        path_segments(MICRO, np.zeros((3, 3)))


def test_a_figure_of_several_routes_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    routes = [(rng.random((len(routing_space(MICRO)), 3)), f"route {i}") for i in range(4)]
    routes.append((route_from_activations(MICRO, np.zeros(MICRO.a_dim)), "all closed"))
    path = tmp_path / "routes.png"
    path.write_bytes(routes_figure(MICRO, routes, "five routes"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height  # 3 panels a row, 2 rows
    with pytest.raises(ValueError, match="no route"):
        routes_figure(MICRO, [])
