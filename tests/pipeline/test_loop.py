"""The plain-PyTorch pieces of the training loop: the optimizer's parameter groups, the speed options."""

import math
import re
from pathlib import Path

import pytest

from divdr.gates import gate_parameters
from divdr.heads import DynamicRoutingSegmenter
from pipeline.config import resolve
from pipeline.loop import build_optimizer


@pytest.mark.parametrize("kind", ["soft", "gumbel"])
def test_gates_get_their_own_learning_rate(kind):
    cfg = resolve("DR-A", None, ["model_size=micro", f"model.gate.kind={kind}", "train.lr=0.02",
                                 "train.gate_lr_scale=10"])
    net = DynamicRoutingSegmenter(cfg.model)
    optimizer = build_optimizer(net, cfg.train)
    rest, gates = optimizer.param_groups
    assert rest["lr"] == pytest.approx(0.02) and gates["lr"] == pytest.approx(0.2)
    assert {id(p) for p in gates["params"]} == {id(p) for p in gate_parameters(net)}
    assert len(rest["params"]) + len(gates["params"]) == len(list(net.parameters()))
    assert gates["momentum"] == rest["momentum"] == cfg.train.momentum


def test_network_fix_has_one_group():
    cfg = resolve("DR-Raw", None, ["model_size=micro", "model.gate.enabled=false"])
    assert len(build_optimizer(DynamicRoutingSegmenter(cfg.model), cfg.train).param_groups) == 1


def _steps(cfg, count=2):
    """``count`` steps of the pipeline's Trainer on random batches; returns the trainer and the losses."""
    import torch

    from pipeline.loop import Trainer
    from pipeline.tasks import SegmentationTask

    torch.manual_seed(0)
    task = SegmentationTask(cfg, Path("."))  # forward and cost table only: no dataset is read
    trainer = Trainer(cfg, task, task.build_model())
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(count):
        batch = {"image": torch.randn(2, 3, 64, 64, generator=g),
                 "label": torch.randint(0, cfg.model.num_classes, (2, 64, 64), generator=g), "sample_id": [0, 1]}
        losses.append(float(trainer.run_step(batch).terms.total.detach()))
    return trainer, losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train_in_float32_losses(precision):
    import torch

    cfg = resolve("DivDR-A", None, ["model_size=micro", "train.crop=[64,64]", f"train.precision={precision}"])
    trainer, losses = _steps(cfg)
    assert all(math.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())  # autocast: weights stay fp32
    assert (trainer.precision.scaler is not None) == (precision == "fp16")
    if precision == "fp16":
        assert trainer.precision.scaler.get_scale() > 1  # the loss was scaled


def test_compiled_channels_last_steps_match_eager(monkeypatch):
    """train.compile (regional, here with the aot_eager backend: inductor compiles C++ for minutes on a CPU)
    and train.channels_last train as the plain step does."""
    import functools

    import pipeline.tasks
    from divdr.cells import compile_cells

    monkeypatch.setattr(pipeline.tasks, "compile_cells", functools.partial(compile_cells, backend="aot_eager"))
    base = ["model_size=micro", "train.crop=[64,64]"]
    _, plain = _steps(resolve("DR-A", None, base))
    _, fast = _steps(resolve("DR-A", None, [*base, "train.compile=true", "train.channels_last=true"]))
    assert fast == pytest.approx(plain, rel=1e-4)


def test_precision_is_validated_by_name():
    with pytest.raises(Exception, match=re.escape("train.precision must be 'fp32' or 'bf16' or 'fp16', got 'fp64'")):
        resolve("DR-A", None, ["train.precision=fp64"])
