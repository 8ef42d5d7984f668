"""DRNets' gate family on the DR routing space: RouterNet + Gumbel-Softmax, two-stage temperature,
top-k above a threshold at inference, the resource regulariser (eq. 8), FLOPs and skipping."""

import itertools
import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from divdr.backbone import DynamicBackbone
from divdr.cells import Cell
from divdr.config import (
    PRESETS,
    BudgetConfig,
    ClusteringConfig,
    ConfigError,
    GateConfig,
    ResourceConfig,
    TemperatureConfig,
    config_from_dict,
    get_model_config,
)
from divdr.flops import CONVS_ONLY, budget_ratio, cost_table, expected_cost, real_cost
from divdr.gates import SoftGate, anneal_temperature, set_temperature, temperature_schedule
from divdr.gumbel import GumbelGate, RouterNet, gumbel_softmax, router_cost, select_branches
from divdr.heads import DynamicRoutingSegmenter
from divdr.losses import correctness, resource_loss, resource_schedule, total_loss
from divdr.routing import DOWN, KEEP, UP, routing_space
from tests.divdr.doubles import Fixed, record_batch_sizes

GUMBEL = GateConfig(kind="gumbel")
MICRO = get_model_config("micro", num_classes=4, gate=GUMBEL)
MICRO_SKIP = replace(MICRO, gate=replace(GUMBEL, skip_branch=True))


def _gumbel_gates(model: nn.Module) -> list[GumbelGate]:
    return [m for m in model.modules() if isinstance(m, GumbelGate)]






# ---- temperature -------------------------------------------------------------------------------

def test_two_stage_temperature_schedule_paper_defaults():
    cfg = TemperatureConfig()  # tau 3 in pre-training, then 1.0 annealed exponentially to 0.5
    assert (cfg.pretrain, cfg.start, cfg.final, cfg.pretrain_fraction) == (3.0, 1.0, 0.5, 0.5)
    assert temperature_schedule(0.0, cfg) == 3.0
    assert temperature_schedule(0.499, cfg) == 3.0
    assert temperature_schedule(0.5, cfg) == 1.0  # reset at the start of fine-tuning
    assert temperature_schedule(0.75, cfg) == pytest.approx(math.sqrt(0.5))  # half-way: 1.0 * 0.5^(1/2)
    assert temperature_schedule(1.0, cfg) == pytest.approx(0.5)
    assert temperature_schedule(1.5, cfg) == pytest.approx(0.5)  # never below final
    # a constant factor per step, as the paper's exp(-0.0006) per epoch
    taus = [temperature_schedule(0.5 + i / 20, cfg) for i in range(11)]
    ratios = [b / a for a, b in itertools.pairwise(taus)]
    assert ratios == pytest.approx([0.5 ** (1 / 10)] * 10)
    # ImageNet-like single stage: 5 annealed to 0.8 over all of training
    imagenet = TemperatureConfig(pretrain=5.0, start=5.0, final=0.8, pretrain_fraction=0.0)
    assert temperature_schedule(0.0, imagenet) == 5.0 and temperature_schedule(1.0, imagenet) == pytest.approx(0.8)
    assert temperature_schedule(0.3, TemperatureConfig(pretrain_fraction=1.0)) == 3.0


def test_set_temperature_reaches_every_gumbel_gate_and_is_checkpointed():
    model = DynamicRoutingSegmenter(MICRO)
    gates = _gumbel_gates(model)
    assert len(gates) == MICRO.routing_cells + 1
    assert all(float(g.tau) == 3.0 for g in gates)  # starts at the pre-training temperature
    assert set_temperature(model, 0.7) == len(gates)
    assert all(float(g.tau) == pytest.approx(0.7) for g in gates)
    assert anneal_temperature(model, 1.0, MICRO.gate.temperature) == pytest.approx(0.5)
    assert all(float(g.tau) == pytest.approx(0.5) for g in gates)
    # a buffer: a restored checkpoint selects branches at the temperature it was trained at
    restored = DynamicRoutingSegmenter(MICRO)
    restored.load_state_dict(model.state_dict())
    assert all(float(g.tau) == pytest.approx(0.5) for g in _gumbel_gates(restored))
    # soft-gate models: a no-op the training loop may call unconditionally
    assert set_temperature(DynamicRoutingSegmenter(get_model_config("micro")), 0.5) == 0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        set_temperature(model, 0.0)


# ---- Gumbel-Softmax and selection ----------------------------------------------------------------

def test_gumbel_softmax_samples_the_categorical_distribution_at_low_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0]).repeat(20000, 1)
    weights = gumbel_softmax(logits, 0.05)
    assert torch.allclose(weights.sum(-1), torch.ones(20000))
    freq = torch.bincount(weights.argmax(-1), minlength=3).float() / 20000
    # DRNets eq. 6: P(argmax = b) = softmax(w)_b
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)
    # high temperature: close to uniform (eq. 6's property (1))
    assert (gumbel_softmax(logits[:100], 1e4) - 1 / 3).abs().max() < 1e-3


def test_select_branches_by_hand():
    w = torch.tensor([[0.5, 0.3, 0.2],  # 0.5 < 0.8: keep the next; 0.5 + 0.3 reaches 0.8: stop
                      [0.2, 0.5, 0.3],  # same, in another order
                      [0.9, 0.05, 0.05],  # the first alone exceeds T
                      [0.4, 0.35, 0.25]])  # needs all three
    got = select_branches(w, threshold=0.8)
    expected = torch.tensor([[0.625, 0.375, 0.0], [0.0, 0.625, 0.375], [1.0, 0.0, 0.0], [0.4, 0.35, 0.25]])
    assert torch.allclose(got, expected)
    assert (got[expected == 0] == 0).all()  # exact zeros: the cell skips them
    # max_branches caps k; T = 1 keeps every branch
    assert torch.equal(select_branches(w[3:], 0.8, max_branches=1), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(select_branches(w, 1.0), w)
    # a lower threshold keeps fewer
    assert torch.equal(select_branches(w[:1], 0.5), torch.tensor([[1.0, 0.0, 0.0]]))


def test_select_branches_keeps_at_least_one_and_sums_to_one():
    w = torch.softmax(torch.randn(500, 4) * 3, dim=-1)
    for threshold in (1e-6, 0.3, 0.8, 0.99):
        got = select_branches(w, threshold)
        assert ((got > 0).sum(-1) >= 1).all()
        assert torch.allclose(got.sum(-1), torch.ones(500))
        # the kept branches are the largest ones
        kept_min = torch.where(got > 0, w, torch.ones_like(w)).amin(-1)
        dropped_max = torch.where(got == 0, w, torch.zeros_like(w)).amax(-1)
        assert (kept_min >= dropped_max).all()


def test_gumbel_gate_training_dense_and_stochastic_inference_sparse_and_deterministic():
    torch.manual_seed(1)
    gate = GumbelGate(16, 3, GUMBEL)
    x = torch.randn(4, 16, 16, 16)
    a, b = gate(x), gate(x)
    assert (a > 0).all() and torch.allclose(a.sum(-1), torch.ones(4))
    assert not torch.equal(a, b)  # Gumbel noise in training
    gate.router = Fixed(torch.tensor([[2.0, 0.0, -1.0]]).repeat(4, 1))
    set_temperature(gate, 0.5)
    gate.eval()
    out = gate(x)
    assert torch.equal(out, gate(x))  # no noise at inference
    # softmax([2, 0, -1] / 0.5) = [0.980, 0.018, 0.002]: only the first branch reaches T = 0.8
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1))
    set_temperature(gate, 3.0)  # softmax([2, 0, -1] / 3) = [0.52, 0.27, 0.21]: two branches needed
    assert ((gate(x) > 0).sum(-1) == 2).all()


def test_router_net_structure_and_cost_counted_exactly():
    router = RouterNet(16, 3)
    kinds = [type(m).__name__ for m in router.modules() if not isinstance(m, (nn.Sequential, RouterNet))]
    # 2 blocks of (1x1 conv, BN, ReLU, depth-wise 5x5 stride-2 conv, BN, ReLU), then the affine map
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 4 + ["Linear"]
    depthwise = [m for m in router.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [(m.kernel_size, m.stride, m.groups) for m in depthwise] == [((5, 5), (2, 2), 8)] * 2
    for h, w in ((16, 16), (5, 7), (1, 1)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            router.eval()(torch.randn(1, 16, h, w))
        assert counter.get_total_flops() == 2 * router_cost(h, w, 16, 3, small_gate=False, cv=CONVS_ONLY)


# ---- the network with Gumbel gates ---------------------------------------------------------------

@pytest.mark.parametrize("config", [MICRO, MICRO_SKIP], ids=["paths", "paths+skip"])
def test_a_space_layout_unchanged(config):
    model = DynamicRoutingSegmenter(config)
    specs = routing_space(config)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            out = model(torch.randn(3, 3, 64, 64)).backbone
        assert out.gates.shape == (3, config.routing_cells + 1, 3)
        assert out.activations.shape == (3, config.a_dim) and config.a_dim == 3 * config.routing_cells
        assert torch.equal(out.activations, out.gates[:, 1:].flatten(1))
        for i, spec in enumerate(specs):
            assert (out.gates[:, i, UP] == 0).all() or spec.allow_up
            assert (out.gates[:, i, DOWN] == 0).all() or spec.allow_down
        assert out.gates.min() >= 0 and out.gates.max() <= 1
        sums = out.gates.sum(-1)
        if config.gate.skip_branch:  # the skip weight is what the paths leave: 1 - sum
            assert (sums <= 1 + 1e-6).all()
        else:  # a distribution over the cell's paths: the cell always runs
            assert torch.allclose(sums, torch.ones_like(sums))


@pytest.mark.parametrize("config", [MICRO, MICRO_SKIP], ids=["paths", "paths+skip"])
def test_gradients_reach_every_router_in_training(config):
    model = DynamicRoutingSegmenter(config).train()
    set_temperature(model, 1.0)
    out = model(torch.randn(2, 3, 64, 64))
    labels = torch.randint(0, 4, (2, 64, 64))
    task = nn.functional.cross_entropy(out.logits, labels)
    ratio = budget_ratio(out.backbone.gates, cost_table(config, 64, 64))
    terms = total_loss(task, cost_ratio=ratio, progress=0.9, budget=BudgetConfig(), clustering=ClusteringConfig(),
                       resource=ResourceConfig(weight=0.1), correct=correctness(out.logits, labels, ResourceConfig()))
    terms.total.backward()
    gates = _gumbel_gates(model)
    routers_with_choice = [g for g, s in zip(gates, routing_space(config), strict=True)
                           if sum(s.paths) + config.gate.skip_branch > 1]
    assert routers_with_choice
    for gate in routers_with_choice:  # a single-branch cell (last layer, no skip) has nothing to learn
        assert gate.router.affine.weight.grad.abs().sum() > 0
        assert gate.router.blocks[0][0].weight.grad.abs().sum() > 0
    assert not any(isinstance(m, SoftGate) for m in model.modules())


def test_inference_skips_unselected_branches_per_image():
    backbone = DynamicBackbone(MICRO_SKIP).eval()
    # cell 1 = layer 0, scale 0: branches [keep, down, skip]. tau = 1, T = 0.8.
    # Image 0: skip alone (cell dropped); image 1: keep alone; image 2: keep + down (0.45 / 0.55).
    cell: Cell = backbone.cells[1]
    assert cell.skip_branch
    cell.gate.router = Fixed(torch.tensor([[0.0, 0.0, 12.0], [12.0, 0.0, 0.0], [0.0, 0.2, -12.0]]))
    set_temperature(cell, 1.0)
    op_calls, down_calls = [], []
    record_batch_sizes(cell.op, op_calls)
    record_batch_sizes(cell.down, down_calls)
    x = torch.randn(3, MICRO.channels, 16, 16)
    out = cell(x)
    assert op_calls == [2]  # image 0 is not computed at all
    assert down_calls == [1]  # only image 2 goes down
    assert torch.equal(out.keep[0], x[0])  # skip alone: the input passes through unchanged
    assert (out.weights[0] == 0).all() and (out.weights[1] == torch.tensor([0.0, 1.0, 0.0])).all()
    assert (out.down[:2] == 0).all() and out.down[2].abs().sum() > 0
    # skipping changes nothing numerically: the same as computing every branch with these weights
    weights, skip = cell.route(x)
    assert torch.equal(skip, torch.tensor([1.0, 0.0, 0.0]))
    with torch.no_grad():
        full = cell._forward_all_paths(x, weights, skip)
    assert torch.allclose(out.keep, full.keep, atol=1e-6)
    assert torch.allclose(out.down, full.down, atol=1e-6)


def test_inference_skip_and_keep_both_selected_adds_the_input():
    cell: Cell = DynamicBackbone(MICRO_SKIP).eval().cells[1]
    cell.gate.router = Fixed(torch.tensor([[0.0, -12.0, 0.1]]))  # keep 0.475, skip 0.525
    set_temperature(cell, 1.0)
    x = torch.randn(1, MICRO.channels, 16, 16)
    weights, skip = cell.route(x)
    assert float(weights[0, KEEP]) + float(skip[0]) == pytest.approx(1.0) and float(skip[0]) > 0.5
    with torch.no_grad():
        out = cell(x)
        expected = weights[0, KEEP] * torch.relu(cell.op(x) + x) + skip[0] * x
    assert torch.allclose(out.keep, expected, atol=1e-6)


def test_unselected_paths_not_called_and_real_flops_drop():
    model = DynamicRoutingSegmenter(MICRO).eval()
    set_temperature(model, 0.5)
    images = torch.randn(2, 3, 64, 64)
    table = cost_table(MICRO, 64, 64)
    with torch.no_grad():
        before = model(images).backbone.gates
    # layer 1's routers: keep far ahead of up and down -> keep alone is selected
    cells = [i for i, s in enumerate(model.backbone.specs) if s.layer == 1]
    calls: list[int] = []
    for i in cells:
        cell = model.backbone.cells[i]
        affine = cell.gate.router.affine
        affine.weight.data.zero_()
        affine.bias.data.copy_(torch.tensor([20.0 if slot == KEEP else 0.0 for slot in cell.slots]))
        for transform in (cell.up, cell.down):
            if transform is not None:
                record_batch_sizes(transform, calls)
    with torch.no_grad():
        after = model(images).backbone.gates
    assert calls == []  # no up or down path of layer 1 ran
    assert torch.equal(after[:, cells], torch.tensor([0.0, 1.0, 0.0]).expand(2, len(cells), 3))
    # at least one branch per cell, so no cell is dropped: the cell operations always run
    assert (after.sum(-1) > 0).all()
    # the real cost falls by the cost of the up/down paths of layer 1 that were selected before
    was_open = (before[:, cells] > 1e-4) & (torch.arange(3) != KEEP)
    assert was_open.any()
    saved = real_cost(before, table) - real_cost(after, table)
    assert torch.allclose(saved, (was_open * table.paths[cells]).sum(dim=(-2, -1)))
    assert float(real_cost(after, table).max()) < table.fixed + table.routing_all_open


def test_flops_gumbel_gates_counted_exactly_and_cell_weighed_by_path_sum():
    for config in (MICRO, MICRO_SKIP):
        model = DynamicRoutingSegmenter(config).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            out = model(torch.randn(1, 3, 64, 96))
        table = cost_table(config, 64, 96, CONVS_ONLY)
        assert float(real_cost(out.backbone.gates, table)[0]) * 2 == counter.get_total_flops()
    table = cost_table(MICRO_SKIP, 64, 64)
    assert table.cell_usage == "sum" and cost_table(get_model_config("micro"), 64, 64).cell_usage == "max"
    assert cost_table(replace(MICRO, gate=replace(GUMBEL, enabled=False)), 64, 64).cell_usage == "max"
    n = MICRO.routing_cells + 1
    # keep 0.3 + down 0.3 (+ skip 0.4): the cell runs with probability 0.6, not max = 0.3
    gates = torch.tensor([0.0, 0.3, 0.3]).repeat(1, n, 1)
    by_hand = 0.6 * table.cell.sum() + 0.3 * (table.paths[:, KEEP] + table.paths[:, DOWN]).sum() + table.fixed
    assert float(expected_cost(gates, table)[0]) == pytest.approx(float(by_hand))
    # skip alone everywhere: nothing routed, expected = real = fixed
    closed = torch.zeros(1, n, 3)
    assert float(expected_cost(closed, table)[0]) == pytest.approx(table.fixed)
    assert float(real_cost(closed, table)[0]) == pytest.approx(table.fixed)
    # the router is pricier than the soft gate, and the skip output adds its affine row
    soft = cost_table(get_model_config("micro", num_classes=4), 64, 64)
    assert float(table.gate.sum()) > float(cost_table(MICRO, 64, 64).gate.sum()) > float(soft.gate.sum())


# ---- the resource regulariser (DRNets eq. 8) -----------------------------------------------------

def test_resource_loss_by_hand():
    ratio = torch.tensor([0.5, 0.25], requires_grad=True)
    correct = torch.tensor([1.0, 0.5])
    # per image: 1 * log 0.5 = -0.6931 and 0.5 * log 0.25 = -0.6931
    per_image = resource_loss(ratio, correct)
    assert per_image.detach().tolist() == pytest.approx([math.log(0.5), 0.5 * math.log(0.25)])
    per_image.sum().backward()
    assert ratio.grad.tolist() == pytest.approx([1 / 0.5, 0.5 / 0.25])  # 1[correct] / E[R]
    task = torch.tensor(2.0)
    cfg = ResourceConfig(weight=0.1)  # on from the fine-tuning stage (50%)
    common = {"cost_ratio": ratio.detach(), "budget": BudgetConfig(), "clustering": ClusteringConfig(),
              "resource": cfg, "correct": correct}
    on = total_loss(task, progress=0.6, **common)
    assert float(on.resource) == pytest.approx(math.log(0.5))  # mean of the two equal terms
    assert float(on.total) == pytest.approx(2.0 + 0.1 * math.log(0.5))
    off = total_loss(task, progress=0.4, **common)
    assert float(off.resource) == 0.0 and float(off.total) == 2.0
    assert resource_schedule(0.5, cfg) == 1.0 and resource_schedule(0.499, cfg) == 0.0
    # the DR presets' loss is unchanged: no resource argument, resource term 0
    dr = total_loss(task, cost_ratio=ratio.detach(), progress=0.6, budget=BudgetConfig(), clustering=ClusteringConfig())
    assert float(dr.total) == 2.0 and float(dr.resource) == 0.0
    with pytest.raises(ValueError, match="correct="):
        total_loss(task, progress=0.6, **{**common, "correct": None})
    # a route computing nothing (possible with soft gates) stays finite
    assert torch.isfinite(resource_loss(torch.zeros(1), torch.ones(1))).all()


def test_correctness_for_segmentation_by_hand():
    # three images of 2x2 pixels, 2 classes; image 0: 3 of 3 labelled pixels right (one ignored),
    # image 1 (all class 0): 1 of 4 right; image 2 has no labelled pixel
    logits = torch.zeros(3, 2, 2, 2)
    logits[:, 1] = torch.tensor([[1.0, -1.0], [1.0, 1.0]])  # predicts [[1, 0], [1, 1]] everywhere
    labels = torch.tensor([[[1, 255], [1, 1]], [[0, 0], [0, 0]], [[255, 255], [255, 255]]])
    assert correctness(logits, labels, ResourceConfig()).tolist() == pytest.approx([1.0, 0.25, 0.0])
    image = ResourceConfig(correct="image", image_accuracy=0.9)
    assert correctness(logits, labels, image).tolist() == [1.0, 0.0, 0.0]
    assert not correctness(logits.requires_grad_(), labels, image).requires_grad


# ---- configuration -------------------------------------------------------------------------------

def test_gate_and_resource_config_validation_names_the_field():
    assert GateConfig(kind="gumbel").kind == "gumbel"  # no longer refused
    for bad, message in [({"kind": "magic"}, "gate.kind"), ({"threshold": 0.0}, "gate.threshold"),
                         ({"threshold": 1.5}, "gate.threshold"), ({"max_branches": -1}, "gate.max_branches"),
                         ({"temperature": {"final": 0.0}}, "gate.temperature.final"),
                         ({"temperature": {"start": 0.4}}, "gate.temperature.final must be <="),
                         ({"temperature": {"pretrain_fraction": 2}}, "gate.temperature.pretrain_fraction")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(GateConfig, bad)
    for bad, message in [({"weight": -1}, "resource.weight"), ({"correct": "boxes"}, "resource.correct"),
                         ({"start_fraction": 1.5}, "resource.start_fraction"),
                         ({"image_accuracy": 0}, "resource.image_accuracy")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(ResourceConfig, bad)


def test_presets_gumbel_family_and_dr_presets_unchanged():
    drnet, divdrnet = PRESETS["DRNet-A"], PRESETS["DivDRNet-A"]
    assert drnet.gate == "gumbel" and drnet.resource.weight == 0.1 and drnet.budget.weight == 0
    assert drnet.clustering.weight == 0
    assert divdrnet.gate == "gumbel" and divdrnet.resource.weight == 0.1 and divdrnet.clustering.weight > 0
    expected = {"DR-A": (0.8, 0.1, 0.0), "DR-B": (0.5, 0.1, 0.0), "DR-C": (0.5, 0.2, 0.0), "DR-Raw": (0.0, 0.1, 0.0),
                "DivDR-A": (0.8, 0.1, 0.5), "DivDR-Raw": (0.0, 0.1, 0.5)}
    for name, (lambda1, mu, lambda2) in expected.items():
        p = PRESETS[name]
        assert (p.budget.weight, p.budget.mu, p.clustering.weight) == (lambda1, mu, lambda2)
        assert p.gate == "soft" and p.resource.weight == 0.0


def test_one_training_step_with_every_term():
    """DivDRNet-A on a micro net: task + resource + clustering, one SGD step, all finite."""
    config = MICRO_SKIP
    model = DynamicRoutingSegmenter(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    table = cost_table(config, 64, 64)
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    preset = PRESETS["DivDRNet-A"]
    tau = anneal_temperature(model, 0.8, config.gate.temperature)
    out = model(images)
    terms = total_loss(nn.functional.cross_entropy(out.logits, labels),
                       cost_ratio=budget_ratio(out.backbone.gates, table), progress=0.8, budget=preset.budget,
                       clustering=preset.clustering, activations=out.backbone.activations,
                       centres=torch.rand(3, config.a_dim), sigma2=0.5, resource=preset.resource,
                       correct=correctness(out.logits, labels, preset.resource))
    assert tau < 1.0 and terms.resource.item() < 0 and terms.clustering.item() >= 0
    optimizer.zero_grad()
    terms.total.backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
