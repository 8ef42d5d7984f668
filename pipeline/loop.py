"""The training loop's pieces in plain PyTorch (no Ray): the optimizer and its learning-rate schedule.

``pipeline.worker`` (Ray Train) builds its training from these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from divdr.gates import gate_parameters
from pipeline.config import TrainConfig


def build_optimizer(net: torch.nn.Module, train: TrainConfig) -> torch.optim.SGD:
    """SGD as the DR paper; the gates in a group of their own at ``lr x train.gate_lr_scale``."""
    gates = {id(p) for p in gate_parameters(net)}
    rest = [p for p in net.parameters() if id(p) not in gates]
    groups: list[dict] = [{"params": rest}]
    if gates:
        groups.append({"params": [p for p in net.parameters() if id(p) in gates],
                       "lr": train.lr * train.gate_lr_scale})
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def poly_schedule(total: int, power: float) -> Callable[[int], float]:
    """The DR paper's poly learning-rate factor at a step: (1 - step / total) ** power."""
    return lambda step: max(0.0, 1.0 - step / total) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(train.steps, train.poly_power))
