"""train.cuda_graph on the CPU: the captured step trains as the launched one, reading every value that
changes between steps from a device buffer. CUDA graphs need a GPU (bench/gpu.py measures them there); here a
stand-in backend replays the step with the trainer's host-side state frozen at capture, so a value read from
Python rather than from a buffer replays stale, as it would from a real graph."""

import contextlib
import copy
import dataclasses
import functools
from pathlib import Path

import pytest
import torch

import pipeline.loop
from pipeline.config import ConfigError, resolve
from pipeline.loop import Trainer
from pipeline.tasks import SegmentationTask

STEPS = 10
CAPTURED = ["train.cuda_graph=true", "scaling.use_gpu=true"]  # the network stays on the CPU here
# train.lr 0.01, not the default 0.05: at 0.05 ten SGD steps of this micro net amplify float32 rounding chaotically
# (A(x) of two runs that differ only in rounding: 7e-6 apart at step 2, 5e-2 at step 9, past what a bug gives),
# at 0.01 they stay 3e-7 apart while the learning rate frozen at capture still moves A(x) by 5e-3
SETTINGS = ["model_size=micro", "train.crop=[64,64]", f"train.steps={STEPS}", "train.log_every=5", "train.lr=0.01",
            "budget.start_fraction=0.2", "budget.warmup_fraction=0.5", "clustering.warmup_fraction=0.5"]


def _tensors(value):
    """Every tensor in a step's outputs (dataclasses, tuples, lists, dicts), in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    return []


class FrozenHostReplay:
    """CPU stand-in for ``pipeline.cuda_graph.CudaGraphs``. ``capture`` runs the step for its output tensors
    and undoes its effects (weights, momenta, BatchNorm statistics, skip counts), as a capture runs nothing.
    ``replay`` runs it again with the trainer's host-side values as they were at capture (its step count, so
    its progress; its centre state; the objects in the optimizer's ``lr`` slots) and writes the results into
    the captured outputs."""

    def __init__(self):
        self.trainer = None
        self.captures = 0

    def warmup(self):
        return contextlib.nullcontext()

    def capture(self, step):
        trainer = self.trainer
        self.captures += 1
        saved = [t.clone() for t in _effects(trainer)]
        outputs = step()
        with torch.no_grad():
            for live, before in zip(_effects(trainer), saved, strict=True):
                live.copy_(before)
        frozen = (trainer.step, copy.deepcopy(trainer.centres), [g["lr"] for g in trainer.optimizer.param_groups])

        def replay():
            live = (trainer.step, trainer.centres, [g["lr"] for g in trainer.optimizer.param_groups])
            trainer.step, trainer.centres = frozen[0], frozen[1]
            for group, lr in zip(trainer.optimizer.param_groups, frozen[2], strict=True):
                group["lr"] = lr
            try:
                fresh = step()
            finally:
                trainer.step, trainer.centres = live[0], live[1]
                for group, lr in zip(trainer.optimizer.param_groups, live[2], strict=True):
                    group["lr"] = lr
            with torch.no_grad():
                for static, value in zip(_tensors(outputs), _tensors(fresh), strict=True):
                    static.copy_(value)

        return outputs, replay


def _effects(trainer):
    """The tensors a step writes in place (the live ones, not copies)."""
    momenta = [s["momentum_buffer"] for s in trainer.optimizer.state.values()]
    return [*trainer.net.state_dict().values(), *momenta, trainer._skips.counts]


def _trainer(monkeypatch, settings, backend=None):
    """The Trainer with the fused SGD it gets on a GPU (fused SGD runs on the CPU too)."""
    monkeypatch.setattr(pipeline.loop, "build_optimizer", functools.partial(pipeline.loop.build_optimizer, fused=True))
    cfg = resolve("DivDR-A", None, settings)
    torch.manual_seed(0)
    task = SegmentationTask(cfg, Path("."))  # forward and cost table only: no dataset is read
    trainer = Trainer(cfg, task, task.build_model(), graph_backend=backend)
    if backend is not None:
        backend.trainer = trainer
    return trainer


def _batches(count):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.randint(0, 19, (2, 64, 64), generator=g),
             "sample_id": [2 * i, 2 * i + 1]} for i in range(count)]


def _payload(version, sigma2, seed):
    cfg = resolve("DivDR-A", None, SETTINGS)
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(cfg.clustering.k, cfg.model.a_dim, generator=g)
    return {"version": version, "centres": centres.numpy(), "sigma2": sigma2, "stats": {}}


# centre versions adopted before these steps: the first K-means, a version the store paused (sigma^2 0), a new one
ADOPT = {3: _payload(1, 0.3, 1), 5: _payload(2, 0.0, 2), 7: _payload(3, 0.2, 3)}


def _train(trainer):
    """STEPS steps; per step the total loss, eq. 2's term and the learning rate, and the weights at the end."""
    rows = []
    for index, batch in enumerate(_batches(STEPS)):
        if index in ADOPT:
            trainer.centres.adopt(ADOPT[index], index)
        result = trainer.run_step(batch)
        terms = result.terms
        rows.append((float(terms.total.detach()), float(terms.clustering.detach()), float(terms.budget.detach()),
                     float(trainer.scheduler.get_last_lr()[0]), result.activations.detach().clone()))
    return rows, [p.detach().clone() for p in trainer.net.parameters()]


def _relative(a, b):
    return float(torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)))
                 / torch.sqrt(sum((x ** 2).sum() for x in a)))


def _assert_same_training(launched, captured):
    """The same to float32 rounding: the captured step's learning rate and schedule progress are float32
    tensors, the launched step's Python floats. Measured on an AMD EPYC (train.lr 0.01, SETTINGS): losses 5e-6
    apart, A(x) 3e-7, the weights 3e-8; with the learning rates frozen at capture (the next test) 1e-2, 5e-3 and
    1e-3."""
    (rows_a, weights_a), (rows_b, weights_b) = launched, captured
    for step, (a, b) in enumerate(zip(rows_a, rows_b, strict=True)):
        assert b[:4] == pytest.approx(a[:4], rel=2e-4, abs=1e-6), f"step {step}"
        assert _relative([a[4]], [b[4]]) < 1e-4, f"step {step}: A(x)"
    assert _relative(weights_a, weights_b) < 1e-5


def test_the_captured_step_trains_as_the_launched_one(monkeypatch):
    """Budget and eq. 2 ramps, centre versions (eq. 2 off, on, paused, on), the poly schedule: the replayed
    step follows them all through its buffers and gives the launched step's losses and weights."""
    launched = _train(_trainer(monkeypatch, SETTINGS))
    backend = FrozenHostReplay()
    trainer = _trainer(monkeypatch, [*SETTINGS, *CAPTURED], backend)
    captured = _train(trainer)
    assert backend.captures == 1 and trainer.captured.replay is not None
    assert [r[1] for r in launched[0]][:3] == [0.0, 0.0, 0.0] and launched[0][5][1] == 0.0  # eq. 2 off, paused
    assert launched[0][4][1] > 0 and any(row[1] > 0 for row in launched[0][7:])
    _assert_same_training(launched, captured)
    assert trainer.skipped_total == 0


def test_the_stand_in_catches_a_value_frozen_at_capture(monkeypatch):
    """The check above has teeth: with the learning rates left as Python floats the replays keep the rate of
    the capture, and the training drifts from the launched one."""
    launched = _train(_trainer(monkeypatch, SETTINGS))
    monkeypatch.setattr(pipeline.loop, "tensor_learning_rates", lambda optimizer, device: None)
    captured = _train(_trainer(monkeypatch, [*SETTINGS, *CAPTURED], FrozenHostReplay()))
    assert captured[0][-1][3] != launched[0][-1][3] or not all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(launched[1], captured[1], strict=True))
    with pytest.raises(AssertionError):
        _assert_same_training(launched, captured)


def test_a_checkpoint_of_a_captured_run_holds_plain_learning_rates(monkeypatch):
    trainer = _trainer(monkeypatch, [*SETTINGS, *CAPTURED], FrozenHostReplay())
    for batch in _batches(5):
        trainer.run_step(batch)
    state = trainer.state()
    assert all(isinstance(g["lr"], float) for g in state["optimizer"]["param_groups"])
    assert all(isinstance(v, float) for v in state["scheduler"]["base_lrs"] + state["scheduler"]["_last_lr"])
    resumed = _trainer(monkeypatch, [*SETTINGS, *CAPTURED], FrozenHostReplay())
    resumed.load_state(state)
    lrs = [g["lr"] for g in resumed.optimizer.param_groups]
    assert all(isinstance(lr, torch.Tensor) for lr in lrs)
    assert [float(lr) for lr in lrs] == pytest.approx([float(g["lr"]) for g in trainer.optimizer.param_groups])
    plain = _trainer(monkeypatch, SETTINGS)
    plain.load_state(state)  # and a run without the option resumes from it
    assert all(isinstance(g["lr"], float) for g in plain.optimizer.param_groups)


@pytest.mark.parametrize(("settings", "message"), [
    (["train.precision=fp16"], "train.cuda_graph cannot run with train.precision: fp16"),
    (["task=detection"], "train.cuda_graph needs batches of one shape"),
    (["scaling.use_gpu=false"], "train.cuda_graph captures the step in a CUDA graph: it needs scaling.use_gpu"),
])
def test_settings_a_captured_step_cannot_take_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        resolve("DivDR-A", None, [*CAPTURED, *settings])


def test_a_captured_step_needs_a_gpu(monkeypatch):
    with pytest.raises(ValueError, match="needs the network on a CUDA device, it is on cpu"):
        _trainer(monkeypatch, [*SETTINGS, *CAPTURED])


NAN_AT = 5  # rank 1's batch of this step has a NaN pixel: every process must leave the update out


def _train_one_process(rank, size, init_file, mode, out):
    """One of ``size`` processes (gloo): STEPS steps on this rank's own batches, launched through DDP
    (``mode`` "ddp", what Ray Train workers run) or captured in two graphs with the gradients reduced between
    them ("captured", the stand-in backend); its parameters and skip count written to ``out``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        pipeline.loop.build_optimizer = functools.partial(pipeline.loop.build_optimizer, fused=True)
        settings = [*SETTINGS, *CAPTURED] if mode == "captured" else SETTINGS
        cfg = resolve("DivDR-A", None, settings)
        torch.manual_seed(rank)  # different weights per rank: rank 0's must reach the others, as from DDP
        task = SegmentationTask(cfg, Path("."))
        net = task.build_model()
        model = torch.nn.parallel.DistributedDataParallel(net) if mode == "ddp" else net
        backend = FrozenHostReplay() if mode == "captured" else None
        trainer = Trainer(cfg, task, net, model, pipeline.loop.ProcessGroup(rank, size), graph_backend=backend)
        if backend is not None:
            backend.trainer = trainer
        g = torch.Generator().manual_seed(100 + rank)
        losses = []
        for index in range(STEPS):
            batch = {"image": torch.randn(2, 3, 64, 64, generator=g),
                     "label": torch.randint(0, 19, (2, 64, 64), generator=g), "sample_id": [2 * index, 2 * index + 1]}
            if rank == 1 and index == NAN_AT:
                batch["image"][0, 0, 0, 0] = float("nan")
            terms = trainer.run_step(batch).terms
            losses.append([float(terms.total.detach()), float(terms.task.detach()), float(terms.budget.detach())])
        trainer.check_skips()
        torch.save({"weights": [p.detach().clone() for p in net.parameters()], "skipped": trainer.skipped_total,
                    "losses": losses, "statistics_finite": all(torch.isfinite(b).all() for b in net.buffers()),
                    "grads_are_views": mode != "captured" or all(p.grad._base is trainer.captured.flat_grads
                                                                 for p in net.parameters())}, out)
    finally:
        torch.distributed.destroy_process_group()


def _train_processes(tmp_path, mode, size=2):
    import torch.multiprocessing as mp

    outs = [tmp_path / f"{mode}-{rank}.pt" for rank in range(size)]
    init_file = tmp_path / f"{mode}-init"
    mp.start_processes(_train_wrapper, args=(size, str(init_file), mode, outs), nprocs=size, start_method="spawn")
    return [torch.load(out, weights_only=True) for out in outs]


def _train_wrapper(rank, size, init_file, mode, outs):
    _train_one_process(rank, size, init_file, mode, outs[rank])


@pytest.mark.slow
def test_several_processes_capture_two_graphs_and_train_as_ddp(tmp_path):
    """train.cuda_graph with several workers: forward and backward in one graph, the flat gradient buffer and
    the finite flag all-reduced, clipping and SGD in a second graph. Two gloo processes, each on its own
    batches, give DDP's weights; a NaN on one process leaves the update out on both."""
    ddp = _train_processes(tmp_path, "ddp")
    captured = _train_processes(tmp_path, "captured")
    assert [r["skipped"] for r in ddp] == [r["skipped"] for r in captured] == [1, 1]
    assert all(r["grads_are_views"] for r in captured)
    assert all(r["statistics_finite"] for r in captured)  # rank 1's NaN batch left its BatchNorm statistics alone
    for a, b in zip(captured[0]["weights"], captured[1]["weights"], strict=True):
        assert torch.equal(a, b)  # one mean gradient, one update: the processes never drift apart
    for rank in (0, 1):  # each process's losses, step by step (NaN at the skipped step of rank 1)
        for step, (a, b) in enumerate(zip(ddp[rank]["losses"], captured[rank]["losses"], strict=True)):
            assert b == pytest.approx(a, rel=1e-4, nan_ok=True), f"rank {rank}, step {step}"
    # The weights: DDP's to float32 rounding, which ten steps amplify (a sum of halves against DDP's mean,
    # float32 learning rates): measured 0.14% of how far training moved them
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in SegmentationTask(resolve("DivDR-A", None, SETTINGS),
                                                                      Path(".")).build_model().parameters()])
    ddp_weights, captured_weights = (torch.cat([w.flatten() for w in r["weights"]]) for r in (ddp[0], captured[0]))
    assert (captured_weights - ddp_weights).norm() < 0.01 * (ddp_weights - start).norm()


def test_flat_gradients_are_views_in_each_parameters_layout_and_bad_parameters_are_named():
    from pipeline.cuda_graph import flat_gradients

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    flat = flat_gradients(net)
    assert flat.numel() == sum(p.numel() for p in net.parameters())
    assert all(p.grad._base is flat and p.grad.stride() == p.stride() for p in net.parameters())
    net[0].weight.grad.fill_(1.0)  # written through the view: the buffer one all-reduce covers
    assert flat.sum() == net[0].weight.numel()
    strided = torch.nn.Linear(4, 3)
    strided.weight = torch.nn.Parameter(torch.randn(4, 6)[:, ::2].t())  # neither contiguous nor channels_last
    with pytest.raises(ValueError, match=r"parameter weight \(3, 4\) has strides"):
        flat_gradients(strided)
    with pytest.raises(ValueError, match="parameters of one dtype"):
        flat_gradients(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double()))
