import copy
import pickle
from dataclasses import replace

import pytest
import torch
from torch import nn

from divdr.backbone import DynamicBackbone, set_scale_streams
from divdr.cells import Cell
from divdr.config import GateConfig, ModelConfig, get_model_config
from divdr.flops import cost_table, real_cost
from divdr.gates import SoftGate
from divdr.heads import DynamicRoutingSegmenter
from divdr.routing import DOWN, KEEP, UP, routing_space
from tests.divdr.doubles import Fixed, record_batch_sizes

TINY = get_model_config("micro", num_classes=5)


def test_forward_backward_shapes_and_a_space():
    model = DynamicRoutingSegmenter(TINY)
    images = torch.randn(2, 3, 70, 130)  # not a multiple of 32: padded, then cropped back
    out = model(images)
    assert out.logits.shape == (2, 5, 70, 130)
    assert out.backbone.gates.shape == (2, TINY.routing_cells + 1, 3)
    assert out.backbone.activations.shape == (2, TINY.a_dim)
    assert TINY.a_dim == 3 * (2 + 3 + 4)
    out.logits.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_layer16_routing_space_matches_paper():
    config = get_model_config("layer16")
    specs = routing_space(config)
    assert config.routing_cells == 61 and len(specs) == 62 and config.a_dim == 183
    # layer 0 has 1/4 and 1/8, layer 1 adds 1/16, layer 2 on has all four scales
    assert config.cells_per_layer[:4] == (2, 3, 4, 4)
    last_layer = [s for s in specs if s.layer == 15]
    assert all(not s.allow_up and not s.allow_down for s in last_layer)
    assert not any(s.allow_up for s in specs if s.scale == 0)
    assert not any(s.allow_down for s in specs if s.scale == 3)
    assert replace(config, init_cell_in_a_space=True).a_dim == 186


def test_gate_layout_zero_for_missing_slots_and_in_range():
    model = DynamicRoutingSegmenter(TINY).eval()
    gates = model(torch.randn(3, 3, 64, 64)).backbone.gates
    specs = routing_space(TINY)
    for i, spec in enumerate(specs):
        assert (gates[:, i, UP] == 0).all() or spec.allow_up
        assert (gates[:, i, DOWN] == 0).all() or spec.allow_down
    assert gates.min() >= 0 and gates.max() <= 1  # max(0, tanh): [0, 1), float32 may round to 1
    # bias 1.5 at init: paths start open (tanh(1.5) = 0.905 before the learned part)
    assert gates[:, :, KEEP].mean() > 0.5


def test_gradients_reach_every_gate_from_the_task_loss():
    model = DynamicRoutingSegmenter(TINY)
    out = model(torch.randn(2, 3, 64, 64))
    nn.functional.cross_entropy(out.logits, torch.randint(0, 5, (2, 64, 64))).backward()
    gates = [m for m in model.modules() if isinstance(m, SoftGate)]
    assert len(gates) == TINY.routing_cells + 1
    for gate in gates:
        assert gate.project.weight.grad is not None and gate.project.weight.grad.abs().sum() > 0
        assert gate.reduce[0].weight.grad.abs().sum() > 0


def test_network_fix_has_no_gate_parameters_and_all_paths_open():
    config = replace(TINY, gate=GateConfig(enabled=False))
    model = DynamicRoutingSegmenter(config)
    assert not any(".gate." in name for name, _ in model.named_parameters())
    gates = model(torch.randn(1, 3, 64, 64)).backbone.gates
    expected = torch.tensor([s.paths for s in routing_space(config)], dtype=gates.dtype)
    assert torch.equal(gates[0], expected)






def test_inference_skips_closed_paths_and_dropped_cells_per_image():
    backbone = DynamicBackbone(TINY).eval()
    # cell 1 = layer 0, scale 0: paths [keep, down]. Image 0: all closed (cell dropped);
    # image 1: keep open, down closed; image 2: both open.
    cell: Cell = backbone.cells[1]
    cell.gate = Fixed(torch.tensor([[0.0, 0.0], [0.7, 0.0], [0.5, 0.5]]))
    op_calls, down_calls = [], []
    record_batch_sizes(cell.op, op_calls)
    record_batch_sizes(cell.down, down_calls)
    x = torch.randn(3, TINY.channels, 16, 16)
    out = cell(x)
    assert op_calls == [2]  # image 0 is not computed at all
    assert down_calls == [1]  # only image 2 goes down
    assert torch.equal(out.keep[0], x[0])  # dropped cell passes its input through
    assert (out.down[:2] == 0).all() and out.down[2].abs().sum() > 0
    # skipping changes nothing numerically: same result as computing every path
    with torch.no_grad():
        full = cell._forward_all_paths(x, *cell.route(x))
    assert torch.allclose(out.keep, full.keep, atol=1e-6)
    assert torch.allclose(out.down, full.down, atol=1e-6)


def test_all_closed_paths_not_called_and_real_flops_drop():
    model = DynamicRoutingSegmenter(TINY).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        open_gates = model(images).backbone.gates
    # close every path of the layer-1 cells by pushing their gate bias far negative
    closed = [i for i, s in enumerate(model.backbone.specs) if s.layer == 1]
    calls: list[int] = []
    for i in closed:
        cell = model.backbone.cells[i]
        cell.gate.project.bias.data.fill_(-1e3)
        for module in (cell.op, *cell.transforms().values()):
            record_batch_sizes(module, calls)
    with torch.no_grad():
        out = model(images)
    assert calls == []
    assert (out.backbone.gates[:, closed] == 0).all()
    # the same gates with only those cells re-opened as they were: the difference is their cost
    table = cost_table(TINY, 64, 64)
    reopened = out.backbone.gates.clone()
    reopened[:, closed] = open_gates[:, closed]
    saved = real_cost(reopened, table) - real_cost(out.backbone.gates, table)
    was_open = open_gates[:, closed] > 1e-4
    assert was_open.any(dim=-1).all()
    expected = (table.cell[closed] + (was_open * table.paths[closed]).sum(-1)).sum(-1)
    assert torch.allclose(saved, expected)
    assert (saved > 0).all()


def test_input_not_multiple_of_32_rejected_by_backbone():
    with pytest.raises(ValueError, match="multiple of 32"):
        DynamicBackbone(TINY)(torch.randn(1, 3, 50, 64))


def test_batch_independence_at_inference():
    model = DynamicRoutingSegmenter(get_model_config("micro", num_classes=3)).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batched = model(images).logits
        single = torch.cat([model(images[i : i + 1]).logits for i in range(3)])
    assert torch.allclose(batched, single, rtol=1e-4, atol=1e-4)


def test_config_validation_names_the_field():
    from divdr.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"model\.layers"):
        ModelConfig(layers=2)
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(ModelConfig, {"layerz": 3})
    with pytest.raises(ConfigError, match="gate"):
        config_from_dict(ModelConfig, {"gate": {"kind": "magic"}})


def test_group_norm_makes_training_activations_per_image_and_equal_to_eval():
    """model.norm=group: no BatchNorm left; in training an image's A(x) does not depend on the rest
    of its batch and equals its eval-mode A(x) (with BN neither holds)."""
    config = get_model_config("micro", num_classes=3, norm="group")
    model = DynamicRoutingSegmenter(config).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) > 0
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        batched = model(images).backbone.activations
        single = torch.cat([model(images[i : i + 1]).backbone.activations for i in range(4)])
        evaluated = model.eval()(images).backbone.activations
    assert torch.allclose(batched, single, atol=1e-5) and torch.allclose(batched, evaluated, atol=1e-5)
    bn_model = DynamicRoutingSegmenter(get_model_config("micro", num_classes=3)).train()
    with torch.no_grad():
        bn_batched = bn_model(images).backbone.activations
        bn_single = torch.cat([bn_model(images[i : i + 2]).backbone.activations[:1] for i in range(0, 4, 2)])
    assert not torch.allclose(bn_batched[::2], bn_single, atol=1e-3)
    with pytest.raises(Exception, match=r"model\.norm"):
        get_model_config("micro", norm="layer")


def test_gate_input_norm_makes_routes_blind_to_a_global_gain():
    """GateConfig.input_norm: a per-image affine change of the gate's input leaves its weights unchanged."""
    torch.manual_seed(0)
    config = replace(TINY, gate=replace(TINY.gate, input_norm=True))
    gate = DynamicRoutingSegmenter(config).backbone.cells[3].gate.eval()
    x = torch.rand(2, gate.reduce[0].in_channels, 16, 16)
    assert torch.allclose(gate(x), gate(1.7 * x + 0.3), atol=1e-5)
    plain = DynamicRoutingSegmenter(TINY).backbone.cells[3].gate.eval()
    plain.load_state_dict(gate.state_dict())
    assert not torch.allclose(plain(x), plain(1.7 * x + 0.3), atol=1e-3)


def test_a_bf16_training_forward_stays_in_bf16_where_autocast_resizes_in_float32(monkeypatch):
    """CUDA autocast runs bilinear upsampling in float32; before ``divdr.ops.bilinear`` its output promoted
    the cell's paths and every residual after it to float32 (an H100 bf16 step moved twice the bytes).
    CPU autocast keeps bf16, so its CUDA policy is imitated here."""
    import torch.nn.functional as F

    import divdr.ops

    real = F.interpolate

    def cuda_policy(x, **kwargs):
        return real(x.float() if torch.is_autocast_enabled("cpu") else x, **kwargs)

    monkeypatch.setattr(divdr.ops.F, "interpolate", cuda_policy)
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(TINY).train()
    dtypes = set()
    for cell in net.backbone.cells:
        cell.register_forward_hook(lambda m, i, o: dtypes.update(t.dtype for t in (o.up, o.keep, o.down)
                                                                   if t is not None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(torch.randn(2, 3, 64, 64)).logits
    # the logits are float32 on purpose after the last, x4 resize (heads.NaiveDecoder): the losses' dtype
    assert dtypes == {torch.bfloat16} and logits.dtype == torch.float32


def test_under_autocast_only_the_logits_are_resized_in_float32(monkeypatch):
    """Every bilinear resize of a bf16 step (the small gates' input, the up paths, the decoder) runs in bf16 under
    CUDA autocast's policy (imitated on the CPU, as above); the small gate's resize in float32 copied every cell
    input whole to float32 and back (with one more change, 4.4 ms of a Layer16 step on an H200). Only the
    logits' x4 is float32."""
    import torch.nn.functional as F

    import divdr.ops

    real = F.interpolate
    dtypes = []

    def cuda_policy(x, **kwargs):
        x = x.float() if torch.is_autocast_enabled("cpu") else x
        dtypes.append((x.dtype, kwargs.get("scale_factor")))
        return real(x, **kwargs)

    monkeypatch.setattr(divdr.ops.F, "interpolate", cuda_policy)
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(TINY).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 3, 64, 64))
    gates = sum(cell.gate.small_gate for cell in net.backbone.cells if hasattr(cell.gate, "small_gate"))
    assert gates > 0 and len(dtypes) > gates
    assert [d for d in dtypes if d[0] != torch.bfloat16] == [(torch.float32, 4)]


def test_gate_input_norm_of_a_one_pixel_map_is_exactly_zero_with_no_gradient():
    """A coarse cell of a small crop sees a 1x1 map: normalised, it is 0 whatever the input (aten's kernel
    gave 1e-14 noise whose sign decided which of the gate's ReLUs passed a gradient, CPU by CPU)."""
    from divdr.gates import gate_input

    x = (torch.randn(2, 8, 1, 1, dtype=torch.float64) * 1e3).requires_grad_()
    normalised = gate_input(x, small_gate=False, input_norm=True)
    assert torch.equal(normalised, torch.zeros_like(normalised))
    assert not normalised.requires_grad or torch.autograd.grad(normalised.sum(), x)[0].eq(0).all()
    wider = gate_input(torch.randn(2, 8, 2, 1, dtype=torch.float64), small_gate=False, input_norm=True)
    assert torch.allclose(wider.abs(), torch.ones_like(wider), atol=1e-3)  # 2 pixels: -1 and +1


def test_closed_gradient_reopens_a_closed_gate_without_changing_the_forward():
    """GateConfig.closed_gradient: the gate's values are the paper's max(0, tanh) (closed gates exactly 0),
    and a closed gate gets c * tanh'(x) of the gradient, where the paper's gets none."""
    from divdr.gates import soft_gate_activation

    logits = torch.tensor([[-2.0, -0.3, 0.0, 0.4, 1.5]], requires_grad=True)
    paper = soft_gate_activation(logits)
    leaky = soft_gate_activation(logits, closed_gradient=0.5)
    assert torch.equal(paper, leaky) and paper[0, :3].eq(0).all()
    (grad_paper,) = torch.autograd.grad(paper.sum(), logits)
    (grad_leaky,) = torch.autograd.grad(leaky.sum(), logits)
    slope = 1 - torch.tanh(logits.detach()) ** 2
    assert torch.equal(grad_paper[0, :3], torch.zeros(3))
    torch.testing.assert_close(grad_leaky[0, :2], 0.5 * slope[0, :2])
    torch.testing.assert_close(grad_leaky[0, 3:], slope[0, 3:])
    assert grad_paper[0, 3:].equal(grad_leaky[0, 3:])
    gate = SoftGate(8, 3, small_gate=False, bias_init=-3.0, closed_gradient=0.5)  # every path starts closed
    x = torch.randn(2, 8, 8, 8)
    gate(x).sum().backward()
    assert gate(x).eq(0).all() and gate.project.bias.grad.abs().sum() > 0
    with pytest.raises(Exception, match=r"gate.closed_gradient must be in \[0, 1\]"):
        GateConfig(closed_gradient=2.0)


def test_scale_streams_leave_a_cpu_forward_and_backward_unchanged():
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(TINY).train()
    images = torch.randn(2, 3, 64, 64)
    plain = net(images)
    plain.logits.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    assert set_scale_streams(net) == 1
    streamed = net(images)
    streamed.logits.sum().backward()
    assert torch.equal(streamed.logits, plain.logits)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))


def test_a_backbone_copies_and_pickles_without_its_streams_and_loads_from_before_them():
    backbone = DynamicBackbone(TINY).eval()
    set_scale_streams(backbone)
    backbone._side_streams["cuda:0"] = [lambda: None]  # stands for a CUDA stream: neither pickles nor copies
    for clone in (copy.deepcopy(backbone), pickle.loads(pickle.dumps(backbone))):
        assert clone.scale_streams and clone._side_streams == {}
    older = {k: v for k, v in backbone.__dict__.items() if k not in ("scale_streams", "_side_streams")}
    restored = DynamicBackbone.__new__(DynamicBackbone)
    restored.__setstate__(older)  # a model pickled before the streams existed
    assert not restored.scale_streams
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(images).gates, backbone(images).gates)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU (bench/gpu.py checks them)")
def test_scale_streams_on_a_gpu_give_the_outputs_and_gradients_of_one_stream():
    """Up to rounding: the GPU's own reductions and bilinear backward (atomics) are not bit-reproducible, and
    autograd may add a gradient coming from two streams in another order (Layer16 on an H200: 1.5e-4, fp32)."""
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(TINY).cuda().train()
    images = torch.randn(2, 3, 64, 64, device="cuda")
    results = []
    for streams in (False, True):
        set_scale_streams(net, streams)
        net.zero_grad()
        out = net(images)
        out.logits.float().square().mean().backward()
        results.append((out.logits.detach().clone(), torch.cat([p.grad.flatten() for p in net.parameters()])))
    (logits, grads), (logits_streams, grads_streams) = results
    torch.testing.assert_close(logits_streams, logits, rtol=1e-5, atol=1e-6)
    assert float((grads_streams - grads).norm() / grads.norm()) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU (bench/gpu.py checks them)")
def test_scale_streams_leave_evaluation_on_one_stream():
    """Evaluation skips paths per image (host reads per cell): on side streams a Layer16 forward at batch 1 was 18%
    slower on an H200, so the option applies to training only."""
    net = DynamicRoutingSegmenter(TINY).cuda().eval()
    set_scale_streams(net)
    with torch.no_grad():
        net(torch.randn(2, 3, 64, 64, device="cuda"))
    assert net.backbone._side_streams == {}
    net.train()(torch.randn(2, 3, 64, 64, device="cuda"))
    assert net.backbone._side_streams
