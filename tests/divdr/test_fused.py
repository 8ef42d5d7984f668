"""The fused kernels (divdr.fused): their checks (fused_checks.py) run in triton's interpreter, which must be switched
on before triton is first imported, so in a pytest process of their own; and what needs no kernel at all."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from divdr import fused

CHECKS = Path(__file__).with_name("fused_checks.py")


def _run_checks(marker: str) -> str:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", marker,
                             str(CHECKS)], env=env, capture_output=True, text=True, timeout=900,
                            cwd=CHECKS.parents[2])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return result.stdout


def test_kernels_match_aten_in_the_interpreter():
    out = _run_checks("not slow")
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in out, out[-2000:]


@pytest.mark.slow
def test_a_training_step_with_the_kernels_in_the_interpreter():
    out = _run_checks("slow")
    assert re.search(r"\b1 passed", out) and "skipped" not in out, out[-2000:]


def test_without_the_interpreter_cpu_tensors_take_aten_operations(monkeypatch):
    """On a CPU the switch changes nothing: the aten operations run, bit for bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused, "_enabled", True)
    x, w = torch.randn(2, 3, 4, 4), torch.rand(2, 1, 1, 1)
    assert fused.resize(x, None, 2) is None
    assert torch.equal(fused.scaled_sum(x, w), w * x)
    assert torch.equal(fused.scaled_sum(x, w, x.flip(0), w.flip(0)), torch.addcmul(w * x, w.flip(0), x.flip(0)))


def test_switching_on_without_triton_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(fused, "unavailable", lambda: "No module named 'triton'")
    with pytest.raises(RuntimeError, match=r"train.fused_kernels.*triton"):
        fused.set_fused_kernels(True)
    assert not fused.fused_kernels_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU (bench/gpu_ab.py checks them)")
def test_kernels_on_a_gpu_match_aten():
    """Compiled for a GPU (not interpreted), where float32 rounds to the nearest bf16: the x2 resize within half a
    bf16 step of aten's float32 result, its gradient and the weighted sum's likewise."""
    import torch.nn.functional as F

    pytest.importorskip("triton")
    fused.set_fused_kernels(True)
    try:
        x = torch.randn(4, 64, 48, 40, device="cuda").contiguous(memory_format=torch.channels_last)
        exact = F.interpolate(x.bfloat16().float(), scale_factor=2, mode="bilinear", align_corners=False)
        resized = fused.resize(x.bfloat16(), None, 2)
        assert resized is not None
        torch.testing.assert_close(resized.float(), exact, rtol=2**-8, atol=0)
        x, w = x.bfloat16(), torch.rand(4, 1, 1, 1, device="cuda").bfloat16()
        summed = fused.scaled_sum(x, w, x.flip(0), w.flip(0))
        exact = w.float() * x.float() + w.flip(0).float() * x.flip(0).float()
        torch.testing.assert_close(summed.float(), exact, rtol=2**-8, atol=1e-6)
    finally:
        fused.set_fused_kernels(False)


@pytest.mark.parametrize(("in_size", "out_size", "scale_factor"),
                         [(96, 192, 2.0), (192, 768, 4.0), (192, 48, None), (64, 32, None), (5, 9, None),
                          (9, 3, None), (7, 3, None), (4, 12, 3.0), (2, 7, None), (100, 100, None), (1024, 4, None)])
def test_the_backward_window_holds_every_output_that_sampled_an_input(in_size, out_size, scale_factor):
    """bilinear_backward visits, per input pixel, ``gather_taps`` output pixels from the start it computes (in
    float32, rounded up from a hair below): every output pixel whose forward weight on that input is not 0 must be
    among them. The forward's taps computed as the kernel does (aten's float32 formula)."""
    ratio = 1.0 / scale_factor if scale_factor else in_size / out_size
    ratio32 = torch.tensor(ratio, dtype=torch.float32)
    out_index = torch.arange(out_size, dtype=torch.float32)
    source = torch.clamp(ratio32 * (out_index + 0.5) - 0.5, min=0.0)
    first = source.to(torch.int32)
    weight = source - first.float()
    second = first + (first < in_size - 1).int()
    inverse = torch.tensor(1.0 / ratio, dtype=torch.float32)
    taps = fused.gather_taps(ratio)
    slack = pytest.importorskip("divdr.triton_kernels").START_SLACK.value
    for i in range(in_size):
        sampled = {o for o in range(out_size)
                   if (first[o] == i and weight[o] < 1) or (second[o] == i and weight[o] > 0)}
        start = int(torch.ceil((torch.tensor(i, dtype=torch.float32) - 0.5) * inverse - 0.5 - slack))
        assert sampled <= set(range(start, start + taps)), (i, sorted(sampled), start, taps)
    assert fused.gather_taps(0.5) == 4 and fused.gather_taps(4.0) == 1  # x2: 4 x 4 outputs per input; /4: one


def _compile_for(kernel, target, pointers: dict[str, str], constexprs: dict[str, object]):
    """``kernel`` compiled ahead of time for ``target`` (no GPU needed: triton's own compiler and ptxas), its
    integer arguments as int32 and its float ones as float32, as the launches pass them."""
    import inspect

    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name.startswith(
        ("ratio", "inverse")) else "i32") for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    return pytest.importorskip("triton").compile(source, target=target)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])  # A100; H100 / H200
def test_the_kernels_compile_for_a_gpu(arch):
    """The interpreter runs what the compiler may refuse (an annotated constexpr global, for one): every variant
    the network launches, compiled to machine code for the GPUs it is meant for, here on a CPU."""
    from triton.backends.compiler import GPUTarget

    kernels = pytest.importorskip("divdr.triton_kernels")
    target = GPUTarget("cuda", arch, 32)
    compiled = []
    for dtype in ("bf16", "fp32"):
        for channels_last in (False, True):
            maps = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "grad_in_ptr": f"*{dtype}"}
            compiled.append(_compile_for(kernels.bilinear_forward, target, maps,
                                         {"CHANNELS_LAST": channels_last, "BLOCK": fused.BLOCK}))
            for taps in ((4, 4), (1, 1), (8, 8), (3, 4)):  # x2, /4, x4 (the logits), a non-power-of-two ratio
                compiled.append(_compile_for(kernels.bilinear_backward, target, maps, {
                    "CHANNELS_LAST": channels_last, "TAPS_H": taps[0], "TAPS_W": taps[1], "BLOCK": fused.BLOCK}))
        for channels in (32, 64, 512):  # the tiles of Layer16's widths
            block_p, block_c = fused._tile(channels)
            tile = {"BLOCK_P": block_p, "BLOCK_C": block_c}
            compiled.append(_compile_for(kernels.bilinear_forward_nhwc, target, maps, tile))
            for taps in ((4, 4), (1, 1)):  # x2 (up paths, decoder), /4 (small gates)
                compiled.append(_compile_for(kernels.bilinear_backward_nhwc, target, maps,
                                             {"TAPS_H": taps[0], "TAPS_W": taps[1], **tile}))
        pointers = {name: f"*{dtype}" for name in ("x1_ptr", "w1_ptr", "x2_ptr", "w2_ptr", "out_ptr", "grad_ptr",
                                                   "grad_x1_ptr", "grad_x2_ptr")}
        pointers |= {"partial1_ptr": "*fp32", "partial2_ptr": "*fp32"}
        for two in (False, True):
            compiled.append(_compile_for(kernels.scaled_sum_forward, target, pointers,
                                         {"TWO": two, "BLOCK": fused.BLOCK}))
        for flags in ((True, True, True, False), (True, True, False, False), (True, False, True, True)):
            compiled.append(_compile_for(kernels.scaled_sum_backward, target, pointers, {
                **dict(zip(("MAP_GRAD1", "WEIGHT_GRAD1", "MAP_GRAD2", "WEIGHT_GRAD2"), flags, strict=True)),
                "BLOCK": fused.BLOCK}))
        cell = {name: f"*{dtype}" for name in ("h_ptr", "x_ptr", "w_ptr", "p_ptr", "activated_ptr", "keep_ptr",
                                                "grad_activated_ptr", "grad_keep_ptr", "grad_h_ptr", "grad_x_ptr")}
        cell |= {"partial_w_ptr": "*fp32", "partial_p_ptr": "*fp32"}
        compiled.append(_compile_for(kernels.residual_keep_forward, target, cell, {"BLOCK": fused.BLOCK}))
        for flags in ((True, True, False), (False, True, True)):  # the soft gate's; a skip weight, no other path
            compiled.append(_compile_for(kernels.residual_keep_backward, target, cell, {
                **dict(zip(("ACTIVATED_GRAD", "WEIGHT_GRAD", "PASSTHROUGH_GRAD"), flags, strict=True)),
                "BLOCK": fused.BLOCK}))
    assert all("cubin" in c.asm for c in compiled) and len(compiled) == 54
