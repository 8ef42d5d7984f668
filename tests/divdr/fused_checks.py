"""The fused kernels' checks (divdr.fused, train.fused_kernels), run by tests/divdr/test_fused.py in a process of
their own with TRITON_INTERPRET=1 set before triton is imported: triton's interpreter then runs the kernels on CPU
tensors. They compare with aten's bilinear resize and products, and go through a whole forward + backward."""

import os

import pytest
import torch
import torch.nn.functional as F

from divdr import fused
from divdr.config import BudgetConfig, ClusteringConfig, get_model_config
from divdr.flops import budget_ratio, cost_table
from divdr.heads import DynamicRoutingSegmenter
from divdr.losses import total_loss

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run through tests/divdr/test_fused.py: these checks need TRITON_INTERPRET=1 from the start")


BF16_STEP = 2**-7  # bf16's spacing relative to a value: 8 significant bits


@pytest.fixture(scope="module")
def interpreted():
    fused.set_fused_kernels(True)
    yield
    fused.set_fused_kernels(False)


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _resized_both_ways(x, size=None, scale_factor=None, grad_channels_last=None):
    """(fused output, aten output, fused input gradient, aten input gradient) for one random output gradient, in
    the output's layout unless ``grad_channels_last`` says which."""
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fused.resize(a, size, scale_factor)
    assert out is not None, "the fused kernel should apply here"
    ref = F.interpolate(b, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=False)
    # bf16-exact values: the same gradient whether ``x`` is bf16 or float32
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).bfloat16().to(x.dtype)
    if grad_channels_last is None:
        grad = grad.contiguous(memory_format=torch.channels_last) if _strictly_channels_last(ref) else grad
    else:
        grad = _layout(grad, grad_channels_last)
    out.backward(grad)
    ref.backward(grad)
    return out, ref, a.grad, b.grad


RESIZES = [  # (input shape, size, scale_factor): the cells' x2, the logits' x4, the small gate's /4, odd sizes
    ((2, 3, 5, 7), None, 2),
    ((2, 3, 6, 10), None, 4),
    ((2, 3, 16, 12), (4, 3), None),
    ((2, 3, 17, 13), (4, 3), None),
    ((1, 2, 3, 5), (6, 10), None),  # the decoder's x2 given as a size
    ((1, 2, 3, 5), (5, 9), None),  # Layer17's ceil sizes: not a whole factor
    ((2, 4, 1, 1), None, 2),  # a 1x1 map
    # the backward's window at other ratios: /2, /3 and 7/3 (not powers of two), x3, x3.5-x3.7, the same size
    ((1, 2, 8, 8), (4, 4), None),
    ((1, 2, 9, 12), (3, 4), None),
    ((1, 2, 7, 9), (3, 4), None),
    ((1, 2, 4, 6), None, 3),
    ((1, 2, 2, 3), (7, 11), None),
    ((1, 2, 5, 5), (5, 5), None),
]


def _strictly_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("channels_last", "grad_channels_last"), [(False, None), (True, None), (True, False)])
@pytest.mark.parametrize(("shape", "size", "scale_factor"), RESIZES)
def test_resize_gives_aten_values_gradients_and_layout(interpreted, shape, size, scale_factor, channels_last,
                                                       grad_channels_last):
    """NCHW maps take the flat kernels; channels_last ones the tiled kernels, their backward too when the incoming
    gradient is channels_last (the flat one otherwise)."""
    x = _layout(torch.randn(shape, generator=torch.Generator().manual_seed(0)), channels_last)
    out, ref, grad, ref_grad = _resized_both_ways(x, size, scale_factor, grad_channels_last)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert out.stride() == ref.stride(), "the output keeps F.interpolate's memory format"
    assert grad.stride() == ref_grad.stride()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=5e-6)


class _Refused:
    """Stands for a triton kernel (``kernel[grid](...)``) that must not run."""

    def __getitem__(self, grid):
        raise AssertionError("the other layout's kernel ran")


@pytest.mark.parametrize(("channels_last", "refused"), [(True, ("bilinear_forward", "bilinear_backward")),
                                                        (False, ("bilinear_forward_nhwc", "bilinear_backward_nhwc"))])
def test_each_layout_takes_its_own_kernels(interpreted, monkeypatch, channels_last, refused):
    import divdr.triton_kernels as kernels

    for name in refused:
        monkeypatch.setattr(kernels, name, _Refused())
    x = _layout(torch.randn(2, 8, 4, 6, generator=torch.Generator().manual_seed(0)), channels_last)
    out, ref, grad, ref_grad = _resized_both_ways(x, scale_factor=2, grad_channels_last=channels_last)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=5e-6)


def test_resize_in_bf16_rounds_once_from_float32(interpreted):
    """bf16 in, bf16 out, float32 arithmetic: within one bf16 rounding of the float32 result (the gradient too)."""
    x = _layout(torch.randn(2, 8, 6, 5, generator=torch.Generator().manual_seed(0)), True)
    out, _, grad, _ = _resized_both_ways(x.bfloat16(), scale_factor=2)
    ref, _, ref_grad, _ = _resized_both_ways(x.bfloat16().float(), scale_factor=2)
    assert out.dtype == grad.dtype == torch.bfloat16
    # within one bf16 step (2**-7 relative): triton's interpreter truncates float32 to bf16 where a GPU rounds
    # to nearest (half a step)
    torch.testing.assert_close(out.float(), ref, rtol=BF16_STEP, atol=0)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=BF16_STEP, atol=1e-6)


def test_resize_falls_back_where_the_kernels_do_not_apply(interpreted, monkeypatch):
    x = torch.randn(1, 2, 4, 4)
    assert fused.resize(x, None, 8) is None, "x8: the backward's window would be too wide"
    assert fused.resize(x[0], None, 2) is None, "not a 4-d map"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fused.resize(x, None, 2) is None, "torch.compile fuses on its own"


def _weighted_sums(x1, x2, w, two: bool, grad_weights: bool = True):
    """scaled_sum with the kernels and with aten's operations: outputs, and the gradients of x1, x2 and w."""
    results = []
    for enabled in (True, False):
        fused.set_fused_kernels(enabled)
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        weights = w.clone().requires_grad_(grad_weights)
        w1, w2 = weights.reshape(-1, 2, 1, 1, 1).unbind(1)  # strided views, as the cells' per-path weights
        out = fused.scaled_sum(a, w1, b if two else None, w2 if two else None)
        # a gradient in the other memory format: the kernel reads it in the maps' layout
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype))
        results.append((out, a.grad, b.grad, weights.grad))
    fused.set_fused_kernels(True)
    return results


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("two", [False, True])
def test_scaled_sum_gives_aten_values_and_gradients(interpreted, two, channels_last):
    g = torch.Generator().manual_seed(0)
    x1, x2 = (_layout(torch.randn(3, 4, 5, 6, generator=g), channels_last) for _ in range(2))
    w = torch.randn(3, 2, generator=g)
    (out, g1, g2, gw), (ref, r1, r2, rw) = _weighted_sums(x1, x2, w, two)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert out.stride() == ref.stride()
    torch.testing.assert_close(g1, r1, rtol=0, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)
    if two:
        torch.testing.assert_close(g2, r2, rtol=0, atol=1e-6)
    else:
        assert g2 is None and r2 is None


def test_scaled_sum_in_bf16_and_without_weight_gradients(interpreted):
    g = torch.Generator().manual_seed(0)
    x1, x2 = (_layout(torch.randn(2, 8, 4, 4, generator=g), True).bfloat16() for _ in range(2))
    w = torch.rand(2, 2, generator=g).bfloat16()
    (out, g1, g2, gw), (ref, r1, r2, rw) = _weighted_sums(x1, x2, w, True, grad_weights=False)
    assert out.dtype == torch.bfloat16 and gw is None and rw is None
    # one rounding of the float32 sum, against aten's rounding after each product: within two bf16 steps
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * BF16_STEP, atol=2 * BF16_STEP)
    # one product each, rounded once (the interpreter truncates: one step)
    torch.testing.assert_close(g1.float(), r1.float(), rtol=BF16_STEP, atol=0)
    torch.testing.assert_close(g2.float(), r2.float(), rtol=BF16_STEP, atol=0)


def test_scaled_sum_leaves_mixed_dtypes_and_broadcasts_to_aten(interpreted):
    x = torch.randn(2, 3, 4, 4)
    assert not fused._fusable(x, torch.rand(2, 1, 1, 1, dtype=torch.float64), None, None)
    assert not fused._fusable(x, torch.rand(1, 1, 1, 1), None, None), "one weight for the batch: a broadcast"
    assert not fused._fusable(x, torch.rand(2, 1, 1, 1), x.transpose(2, 3), torch.rand(2, 1, 1, 1))
    assert not fused._fusable(x[:, :, ::2], torch.rand(2, 1, 1, 1), None, None), "images not dense"
    assert fused._fusable(x, torch.rand(2, 1, 1, 1), x.clone(), torch.rand(2))


@pytest.mark.slow
def test_a_training_step_with_the_kernels_is_as_close_to_float64_as_without(interpreted):
    """The whole network (up/keep/down weighting, small gates' resize, decoder, logits' x4), forward and
    backward with the kernels: every parameter's gradient as near the float64 gradient as aten's float32 one."""
    config = get_model_config("micro", num_classes=5)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 5, (2, 64, 64), generator=g)
    centres = torch.rand(3, config.a_dim, generator=g)

    def gradients(enabled: bool, double: bool = False):
        fused.set_fused_kernels(enabled)
        torch.manual_seed(0)
        net = DynamicRoutingSegmenter(config).train()
        dtype = torch.float64 if double else torch.float32
        net.to(dtype)
        out = net(images.to(dtype))
        task = F.cross_entropy(out.logits, labels)
        total_loss(task, cost_ratio=budget_ratio(out.backbone.gates, cost_table(config, 64, 64)), progress=0.5,
                   budget=BudgetConfig(weight=1.0, mu=0.3), clustering=ClusteringConfig(weight=0.5, k=3, alpha=1.0),
                   activations=out.backbone.activations, centres=centres.to(dtype), sigma2=0.1).total.backward()
        return {name: p.grad.double() for name, p in net.named_parameters()}

    reference = gradients(False, double=True)
    aten, kernels = gradients(False), gradients(True)
    fused.set_fused_kernels(True)
    assert reference.keys() == kernels.keys()
    for name, ref in reference.items():
        scale = ref.norm().item() + 1e-12
        aten_error = (aten[name] - ref).norm().item() / scale
        kernel_error = (kernels[name] - ref).norm().item() / scale
        assert kernel_error <= 2 * aten_error + 1e-5, (name, kernel_error, aten_error)


def _residual_keeps(h, x, w, passthrough, use_activated: bool):
    """residual_keep with the kernels and with aten's operations: (activated, keep) and the gradients of h, x, w and
    the pass-through, from a loss that reads keep and (``use_activated``) activated as the other paths do."""
    results = []
    for enabled in (True, False):
        fused.set_fused_kernels(enabled)
        leaves = [t.clone().requires_grad_() for t in (h, x, w, passthrough)]
        activated, keep = fused.residual_keep(*leaves)
        g = torch.Generator().manual_seed(3)
        loss = (keep * torch.randn(keep.shape, generator=g).to(keep.dtype)).sum()
        if use_activated:
            loss = loss + (activated * torch.randn(keep.shape, generator=g).to(keep.dtype)).sum()
        loss.backward()
        results.append((activated, keep, *(leaf.grad for leaf in leaves)))
    fused.set_fused_kernels(True)
    return results


@pytest.mark.parametrize("use_activated", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_residual_keep_gives_aten_values_and_gradients(interpreted, channels_last, use_activated):
    g = torch.Generator().manual_seed(0)
    h, x = (_layout(torch.randn(3, 4, 5, 6, generator=g), channels_last) for _ in range(2))
    w, passthrough = torch.rand(3, 1, 1, 1, generator=g), torch.tensor([0.0, 1.0, 0.5]).view(3, 1, 1, 1)
    fused_rows, aten_rows = _residual_keeps(h, x, w, passthrough, use_activated)
    assert fused_rows[0].stride() == aten_rows[0].stride() and fused_rows[1].stride() == aten_rows[1].stride()
    for name, a, b in zip(("activated", "keep", "h", "x", "w", "passthrough"), fused_rows, aten_rows, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_residual_keep_in_bf16_and_with_a_nan(interpreted):
    """bf16 maps round h + x before the ReLU as aten does; a NaN goes through the ReLU (the trainer's finite check
    must still see it) and its gradient through the ReLU's backward, as aten's."""
    g = torch.Generator().manual_seed(0)
    h, x = (_layout(torch.randn(2, 8, 4, 4, generator=g), True).bfloat16() for _ in range(2))
    w, passthrough = torch.rand(2, 1, 1, 1, generator=g).bfloat16(), torch.ones(2, 1, 1, 1).bfloat16()
    fused_rows, aten_rows = _residual_keeps(h, x, w, passthrough, True)
    # activated: one bf16 rounding of h + x, then the ReLU (equal on a GPU; the interpreter truncates: one step)
    torch.testing.assert_close(fused_rows[0].float(), aten_rows[0].float(), rtol=BF16_STEP, atol=0)
    for a, b in zip(fused_rows[1:4], aten_rows[1:4], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 * BF16_STEP, atol=2 * BF16_STEP)
    h = h.float()
    h[0, 0, 0, 0] = float("nan")
    fused_rows, aten_rows = _residual_keeps(h, x.float(), w.float(), passthrough.float(), True)
    for a, b in zip(fused_rows[:4], aten_rows[:4], strict=True):
        assert torch.equal(a.isnan(), b.isnan())
