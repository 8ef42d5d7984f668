"""The training step made for speed (issue #20): no host synchronisation or graph break in forward and
losses, regional compilation, no per-step copy of the cost table, no BatchNorm counters."""

import pickle

import pytest
import torch

from divdr.cells import Cell, compile_cells
from divdr.config import BudgetConfig, ClusteringConfig, get_model_config
from divdr.flops import budget_ratio, cost_table, routing_expected_cost, table_for
from divdr.heads import DynamicRoutingSegmenter
from divdr.losses import clustering_loss, total_loss

MICRO = get_model_config("micro", num_classes=5)


def _loss(net, images, labels, table, centres):
    out = net(images)
    task = torch.nn.functional.cross_entropy(out.logits, labels)
    return total_loss(task, cost_ratio=budget_ratio(out.backbone.gates, table), progress=0.5,
                      budget=BudgetConfig(weight=1.0, mu=0.3), clustering=ClusteringConfig(weight=0.5, k=3, alpha=1.0),
                      activations=out.backbone.activations, centres=centres, sigma2=0.1).total


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 5, (2, 64, 64), generator=g),
            torch.rand(3, MICRO.a_dim, generator=g))


def test_forward_and_losses_trace_to_one_graph_without_breaks():
    """Forward, budget (eq. 9) and eq. 2 in one graph: nothing reads a tensor's value on the host
    (no .item(), no index list copied to the device, no branch on a tensor)."""
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(MICRO).train()
    images, labels, centres = _inputs()
    table = table_for({}, cost_table(MICRO, 64, 64), images)
    explained = torch._dynamo.explain(lambda *a: _loss(net, *a, table, centres))(images, labels)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_cells_train_as_the_eager_ones():
    # float64: in float32 the compiled graph's other reduction order moved gradients by up to 3e-5 on
    # some CPUs (this project's machine of 2026-11-27), more than the tolerance meant for real differences
    torch.manual_seed(0)
    eager = DynamicRoutingSegmenter(MICRO).train().double()
    compiled = DynamicRoutingSegmenter(MICRO).train().double()
    compiled.load_state_dict(eager.state_dict())
    assert compile_cells(compiled, backend="aot_eager") == MICRO.routing_cells + 1
    images, labels, centres = (t.double() if t.is_floating_point() else t for t in _inputs())
    table = cost_table(MICRO, 64, 64)
    losses = [_loss(net, images, labels, table, centres) for net in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    # evaluation skips paths per image: eager, and the same as the eager network's
    eager.eval(), compiled.eval()
    with torch.no_grad():
        assert torch.allclose(eager(images).logits, compiled(images).logits, atol=1e-5)
    # the compiled functions stay out of a pickled model (torch.save / mlflow of the whole model)
    copy = pickle.loads(pickle.dumps(compiled))
    assert all(m._compiled_training is None for m in copy.modules() if isinstance(m, Cell))


def test_cost_table_moved_once_and_costs_in_float32():
    table = cost_table(MICRO, 64, 64)
    gates = torch.rand(2, len(table.cell), 3, dtype=torch.bfloat16)
    tables: dict = {}
    moved = table_for(tables, table, gates)
    assert moved.cell.dtype == torch.float32 and table_for(tables, table, gates) is moved
    assert moved.routing_all_open == table.routing_all_open  # the float64 sum, not re-summed in float32
    assert routing_expected_cost(gates, moved).dtype == torch.float32
    assert torch.allclose(routing_expected_cost(gates, moved), routing_expected_cost(gates.double(), table).float())
    acts = torch.rand(4, 6, dtype=torch.bfloat16)
    assert clustering_loss(acts, torch.rand(2, 6), 0.1, 1.0).dtype == torch.float32


def test_no_batchnorm_counters_and_old_checkpoints_still_load():
    net = DynamicRoutingSegmenter(MICRO)
    assert not any("num_batches_tracked" in k for k in net.state_dict())
    old = dict(net.state_dict())
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            old[f"{name}.num_batches_tracked"] = torch.tensor(7)
    DynamicRoutingSegmenter(MICRO).load_state_dict(old)  # strict: the counters of old checkpoints are dropped


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(MICRO).train()
    nhwc = DynamicRoutingSegmenter(MICRO).train()
    nhwc.load_state_dict(net.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64)
    logits = nhwc(images.contiguous(memory_format=torch.channels_last)).logits
    assert torch.allclose(net(images).logits, logits, atol=1e-5)
    # the full-size logits come out contiguous: the cross-entropy's log-softmax copied a channels_last map whole
    assert logits.is_contiguous()


# One cell compiled with inductor, its compile cache written; run in a child process with its own, empty, inductor
# cache directory (a fresh machine). Prints what the parent checks.
_COMPILE_ONE_CELL = """
import json, sys, torch
from pathlib import Path
from divdr.cells import Cell, compile_cells, graphs_compiled_afresh, load_compile_cache, save_compile_cache
from divdr.config import get_model_config
from divdr.routing import routing_space

torch.set_num_threads(1)
cache, action = Path(sys.argv[1]), sys.argv[2]
loaded = load_compile_cache(cache) if action == "load" else None
torch.manual_seed(0)
config = get_model_config("micro", num_classes=5)
spec = next(s for s in routing_space(config) if s.allow_up and s.allow_down)  # every path: up, keep, down
cell = Cell(spec, config.gate).train()
compile_cells(cell)
out = cell(torch.randn(2, spec.channels, 8, 8))
(out.keep.sum() + out.weights.sum()).backward()
saved = save_compile_cache(cache) if action == "save" else None
print(json.dumps({"loaded": loaded, "saved": saved, "afresh": graphs_compiled_afresh(),
                  "keep": out.keep.sum().item()}))
"""


def _compile_one_cell(tmp_path, inductor_dir: str, action: str) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / inductor_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", _COMPILE_ONE_CELL, str(tmp_path / "cells.cache"), action],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_compile_cache_spares_a_fresh_machine_the_compilation(tmp_path):
    """train.compile_cache: what one process compiled (forward and backward of a cell) is written to a file; a
    process with an empty inductor cache (another machine) loads it and compiles no graph afresh."""
    first = _compile_one_cell(tmp_path, "inductor-a", "save")
    assert first["afresh"] >= 2 and first["saved"] > 0  # the cell's forward and backward graphs, compiled
    second = _compile_one_cell(tmp_path, "inductor-b", "load")
    assert second["loaded"] is True and second["afresh"] == 0
    assert second["keep"] == pytest.approx(first["keep"], rel=1e-6)  # the same computation


def test_an_unreadable_compile_cache_warns_and_compiles_from_scratch(tmp_path):
    from divdr.cells import load_compile_cache

    assert load_compile_cache(tmp_path / "none-yet.cache") is False  # the first run: nothing to load, no warning
    garbage = tmp_path / "cells.cache"
    garbage.write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="cells.cache is unreadable"):
        assert load_compile_cache(garbage) is False


def test_a_compile_cache_that_cannot_be_written_warns_and_training_goes_on(tmp_path, monkeypatch):
    from divdr.cells import save_compile_cache

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled graphs", None))
    (tmp_path / "not-a-folder").write_text("a file where the folder should be")
    with pytest.warns(UserWarning, match="not-a-folder/cells.cache could not be written"):
        assert save_compile_cache(tmp_path / "not-a-folder" / "cells.cache") == 0
    assert save_compile_cache(tmp_path / "compiled" / "cells.cache") == len(b"compiled graphs")
    assert (tmp_path / "compiled" / "cells.cache").read_bytes() == b"compiled graphs"
    assert [p.name for p in (tmp_path / "compiled").iterdir()] == ["cells.cache"]  # no partial file left
