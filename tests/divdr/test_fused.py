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
