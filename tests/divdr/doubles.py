"""Test doubles shared by the model tests."""

import torch
from torch import nn


class Fixed(nn.Module):
    """Stands in for a gate or a router: per-image outputs decided in advance."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values[: x.shape[0]]


def record_batch_sizes(module: nn.Module, log: list[int]) -> None:
    """Append the batch size of every call of ``module`` to ``log`` (to see what was skipped)."""
    module.register_forward_hook(lambda m, args, out: log.append(args[0].shape[0]))
