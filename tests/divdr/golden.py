"""Signatures of a DR network's training forward and backward, to check that rewriting the cell for
speed (issue #20) changed neither its outputs nor its gradients.

``tests/divdr/data/golden_training.json`` holds the signatures computed by the cell as it was before that
rewrite (commit 655fe79); ``python -m tests.divdr.golden`` prints the current ones as JSON (writing
the file again is only right when the network's function is meant to change).

A signature of a tensor is three numbers: its sum, its sum of absolute values, and its dot product with a
fixed pseudo-random vector, so any change of any element shows.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from divdr.config import BudgetConfig, ClusteringConfig, GateConfig, ModelConfig, get_model_config
from divdr.flops import budget_ratio, cost_table
from divdr.heads import DynamicRoutingSegmenter
from divdr.losses import total_loss

GOLDEN = Path(__file__).parent / "data" / "golden_training.json"
MICRO = get_model_config("micro", num_classes=5)

# Every code path of the cell's training forward: soft gates, Gumbel gates with the fast-forward branch,
# a fixed route closing paths and cells, GroupNorm with per-image gate input normalisation.
CASES: dict[str, ModelConfig] = {
    "soft": MICRO,
    "soft_big_gate": replace(MICRO, gate=GateConfig(small_gate=False)),
    "gumbel_skip": replace(MICRO, gate=GateConfig(kind="gumbel", skip_branch=True)),
    "route_fine": replace(MICRO, route=(0,)),
    "route_coarse": replace(MICRO, route=(1, 2)),
    "group_input_norm": replace(MICRO, norm="group", gate=GateConfig(input_norm=True)),
    "network_fix": replace(MICRO, gate=GateConfig(enabled=False)),
}


def signature(t: torch.Tensor) -> list[float]:
    t = t.detach().double().flatten()
    probe = torch.rand(t.numel(), generator=torch.Generator().manual_seed(t.numel()), dtype=torch.float64) - 0.5
    return [float(t.sum()), float(t.abs().sum()), float(t @ probe)]


def training_signatures(config: ModelConfig) -> dict[str, list[float]]:
    """One training step's forward and backward (task, budget and eq. 2 terms) on fixed weights and data."""
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(config).double().train()  # float64: no reduction-order noise
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.randint(0, config.num_classes, (2, 64, 96), generator=torch.Generator().manual_seed(2))
    centres = torch.rand(3, config.a_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.manual_seed(4)  # the Gumbel noise
    out = net(images)
    task = torch.nn.functional.cross_entropy(out.logits, labels)
    ratio = budget_ratio(out.backbone.gates, cost_table(config, 64, 96))
    terms = total_loss(task, cost_ratio=ratio, progress=0.5, budget=BudgetConfig(weight=1.0, mu=0.3),
                       clustering=ClusteringConfig(weight=0.5, k=3, alpha=1.0),
                       activations=out.backbone.activations, centres=centres, sigma2=0.05)
    terms.total.backward()
    found = {"logits": signature(out.logits), "gates": signature(out.backbone.gates),
             "loss": signature(terms.total)}
    found.update({f"grad/{name}": signature(p.grad) for name, p in net.named_parameters() if p.grad is not None})
    found.update({f"buffer/{name}": signature(b) for name, b in net.named_buffers()
                  if b.is_floating_point()})
    return found


if __name__ == "__main__":
    json.dump({name: training_signatures(config) for name, config in CASES.items()}, sys.stdout, separators=(",", ":"))
