"""The batched skipping of ``divdr.cells.Cell`` (fast paths when nothing or part of a batch skips)
gives the same outputs as the per-image gather/scatter it replaced (``bench/reference_skipping.py``)."""

import pytest
import torch

from bench.inference_latency import ForcedClosure
from bench.reference_skipping import skipping_before
from divdr.cells import set_dense_fraction
from divdr.config import get_model_config, get_preset
from divdr.heads import DynamicRoutingSegmenter


def _net(kind: str) -> DynamicRoutingSegmenter:
    config = get_model_config("micro")
    if kind == "gumbel":
        import dataclasses

        gate = dataclasses.replace(config.gate, kind=get_preset("DRNet-A").gate, skip_branch=True)
        config = dataclasses.replace(config, gate=gate)
    return DynamicRoutingSegmenter(config).eval()


@pytest.mark.parametrize("dense", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["soft", "gumbel"])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 1.0])
def test_batched_skipping_matches_the_per_image_reference(kind, rate, dense):
    torch.manual_seed(0)
    net = _net(kind)
    set_dense_fraction(net, dense)
    images = torch.randn(6, 3, 64, 64)
    hooks = ForcedClosure(net, rate, 6, seed=3)
    hooks.set_images(torch.arange(6))
    try:
        with torch.inference_mode():
            now = net(images)
            with skipping_before():
                before = net(images)
    finally:
        hooks.remove()
    torch.testing.assert_close(now.backbone.gates, before.backbone.gates, rtol=0, atol=0)
    torch.testing.assert_close(now.logits, before.logits, rtol=1e-6, atol=1e-6)


def test_dense_fraction_is_checked():
    with pytest.raises(ValueError, match="dense fraction must be in"):
        set_dense_fraction(_net("soft"), 0.0)
