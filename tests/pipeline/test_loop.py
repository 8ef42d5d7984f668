"""The plain-PyTorch pieces of the training loop: the optimizer's parameter groups, the speed options."""

import math
import re
from pathlib import Path

import pytest

from divdr.gates import gate_parameters
from divdr.heads import DynamicRoutingSegmenter
from pipeline.config import resolve
from pipeline.loop import Hook, build_optimizer


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


def test_scale_streams_are_set_on_the_network_and_train_as_without_on_a_cpu():
    """train.scale_streams reaches the backbone through the task (detection's too); on a CPU it changes nothing."""
    from divdr.backbone import DynamicBackbone

    base = ["model_size=micro", "train.crop=[64,64]"]
    _, plain = _steps(resolve("DivDR-A", None, base))
    trainer, streamed = _steps(resolve("DivDR-A", None, [*base, "train.scale_streams=true"]))
    backbones = [m for m in trainer.net.modules() if isinstance(m, DynamicBackbone)]
    assert len(backbones) == 1 and backbones[0].scale_streams
    assert streamed == plain


def test_fused_kernels_are_switched_on_for_the_process_and_train_as_without_on_a_cpu():
    """train.fused_kernels switches divdr.fused on (off again for a run without it); on a CPU nothing changes."""
    from divdr import fused

    base = ["model_size=micro", "train.crop=[64,64]"]
    try:
        _, with_kernels = _steps(resolve("DivDR-A", None, [*base, "train.fused_kernels=true"]))
        assert fused.fused_kernels_enabled()
        _, plain = _steps(resolve("DivDR-A", None, base))
        assert not fused.fused_kernels_enabled()
    finally:
        fused.set_fused_kernels(False)
    assert with_kernels == plain


@pytest.mark.parametrize("kind", ["soft", "gumbel"])
def test_a_step_walks_the_modules_only_after_an_evaluation(monkeypatch, kind):
    """Host work before a step is what a replayed CUDA graph waits on: ``model.train()`` and the temperature's
    search for gates visit Layer16's ~2,000 modules (10 ms a step on this machine, the pipeline's captured step's
    gap to the library's on an H200). They now run once; the gates' tau still follows the schedule at every step,
    and a network an evaluation left in eval mode trains in training mode again."""
    import torch

    from divdr.gates import temperature_schedule

    cfg = resolve("DR-A", None, ["model_size=micro", "train.crop=[64,64]", f"model.gate.kind={kind}",
                                 "train.steps=4", "model.gate.temperature.pretrain_fraction=0.0"])
    trainer = _fused_trainer(monkeypatch, cfg)
    walks = []
    real_modules, real_train = torch.nn.Module.modules, torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "modules", lambda self: walks.append("modules") or real_modules(self))
    monkeypatch.setattr(torch.nn.Module, "train",
                        lambda self, mode=True: walks.append("train") or real_train(self, mode))
    batches = _batches(cfg, 4)
    for batch in batches[:2]:
        result = trainer.run_step(batch)
        expected_tau = temperature_schedule(trainer.progress - 1 / cfg.train.steps, cfg.model.gate.temperature)
        assert result.tau == expected_tau
        for gate in trainer.tempered:
            assert float(gate.tau) == pytest.approx(expected_tau)
    assert not walks and (len(trainer.tempered) > 0) == (kind == "gumbel")
    trainer.net.eval()  # as an evaluation leaves it
    trainer.run_step(batches[2])
    assert "train" in walks
    assert trainer.net.training and all(m.training for m in real_modules(trainer.net))


def test_precision_is_validated_by_name():
    with pytest.raises(Exception, match=re.escape("train.precision must be 'fp32' or 'bf16' or 'fp16', got 'fp64'")):
        resolve("DR-A", None, ["train.precision=fp64"])


def _fused_trainer(monkeypatch, cfg, hooks=()):
    """The pipeline's Trainer with the fused SGD it gets on a GPU (fused SGD runs on the CPU too)."""
    import functools

    import torch

    import pipeline.loop
    from pipeline.loop import Trainer
    from pipeline.tasks import SegmentationTask

    monkeypatch.setattr(pipeline.loop, "build_optimizer", functools.partial(pipeline.loop.build_optimizer, fused=True))
    torch.manual_seed(0)
    task = SegmentationTask(cfg, Path("."))
    return Trainer(cfg, task, task.build_model(), hooks=hooks)


def _batches(cfg, count):
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 3, 64, 64, generator=g),
             "label": torch.randint(0, cfg.model.num_classes, (2, 64, 64), generator=g), "sample_id": [0, 1]}
            for _ in range(count)]


class _NaNAt(Hook):
    """A hook that makes A(x) non-finite at the given step indices."""

    def __init__(self, indices):
        self.indices = set(indices)

    def perturb(self, trainer, task_loss, activations):
        if trainer.step in self.indices:
            activations = activations * float("nan")
        return task_loss, activations


def test_fused_steps_skip_non_finite_steps_without_reading_the_device(monkeypatch):
    """With a fused optimizer (GPUs) a step reads nothing back to the host: a non-finite step is left out by
    the optimizer itself (found_inf), weights and momenta untouched, and the skips are counted on the device
    and read every train.log_every steps."""
    import torch

    cfg = resolve("DivDR-A", None, ["model_size=micro", "train.crop=[64,64]", "train.log_every=4", "train.steps=8"])
    trainer = _fused_trainer(monkeypatch, cfg, hooks=[_NaNAt({1, 2})])
    assert trainer.skips_on_device
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append((trainer.step, _name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    weights = []
    for batch in _batches(cfg, 8):
        before = [p.detach().clone() for p in trainer.net.parameters()]
        assert trainer.run_step(batch) is not None
        weights.append(all(torch.equal(a, b) for a, b in zip(before, trainer.net.parameters(), strict=True)))
    monkeypatch.undo()
    assert weights == [False, True, True, False, False, False, False, False]  # steps 1 and 2 left out
    assert {step for step, _ in reads} <= {4, 8}  # host reads only where the skips are checked
    assert trainer.skipped_total == 2 and trainer.skipped_in_a_row == 0


@pytest.mark.parametrize("fused", [False, True])
def test_a_refused_step_leaves_the_batchnorm_statistics_as_they_were(monkeypatch, fused):
    """A batch with a NaN pixel: the step is refused (on the host, or by the fused SGD on the device) and its
    forward's BatchNorm running statistics are put back, so evaluations and the saved model stay finite."""
    import torch

    from pipeline.loop import Trainer
    from pipeline.tasks import SegmentationTask

    cfg = resolve("DivDR-A", None, ["model_size=micro", "train.crop=[64,64]", "train.steps=4"])
    if fused:
        trainer = _fused_trainer(monkeypatch, cfg)
    else:
        torch.manual_seed(0)
        task = SegmentationTask(cfg, Path("."))
        trainer = Trainer(cfg, task, task.build_model())
    assert trainer.skips_on_device is fused
    good, bad, after = _batches(cfg, 3)
    bad["image"][0, 0, 0, 0] = float("nan")
    trainer.run_step(good)
    before = {name: b.clone() for name, b in trainer.net.named_buffers() if "running" in name}
    assert len(before) > 40  # every BatchNorm's mean and variance
    trainer.run_step(bad)
    trainer.check_skips()
    assert trainer.skipped_total == 1
    assert all(torch.equal(b, before[name]) for name, b in trainer.net.named_buffers() if name in before)
    trainer.run_step(after)  # and the next finite step updates them again
    assert all(torch.isfinite(b).all() and not torch.equal(b, before[name])
               for name, b in trainer.net.named_buffers() if name in before)


def test_fused_steps_stop_a_run_that_stays_non_finite(monkeypatch):
    from pipeline.loop import MAX_SKIPPED_STEPS

    steps = MAX_SKIPPED_STEPS + 3
    cfg = resolve("DivDR-A", None, ["model_size=micro", "train.crop=[64,64]", f"train.log_every={steps}",
                                    f"train.steps={steps}"])
    trainer = _fused_trainer(monkeypatch, cfg, hooks=[_NaNAt(range(1, MAX_SKIPPED_STEPS + 2))])
    batches = _batches(cfg, steps)
    for batch in batches[:-1]:
        trainer.run_step(batch)  # counted on the device, not read yet
    with pytest.raises(FloatingPointError, match=f"non-finite for {MAX_SKIPPED_STEPS + 1} consecutive steps"):
        trainer.run_step(batches[-1])


def test_pending_activations_go_to_the_host_together():
    """Streaming mode: A(x) leaves the device every store.send_every steps, at the step before each K-means
    trigger and at the last step, with every row and the last step's index (the store's watermark)."""
    import torch

    from pipeline.loop import PendingActivations, StepResult

    cfg = resolve("DivDR-A", None, ["store.send_every=3", "clustering.update_every=5", "train.steps=12"])
    pending = PendingActivations(cfg)  # K-means triggers at steps 5 and 10
    sent = {}
    for index in range(12):
        result = StepResult(index, {"sample_id": [2 * index, 2 * index + 1]}, None, None, None,
                            torch.full((2, 4), float(index)), 1.0)
        out = pending.add(result)
        if out is not None:
            sent[index] = out
    assert sorted(sent) == [2, 4, 7, 9, 11]  # every 3rd, before K-means at 5 and 10, the last
    step, ids, acts = sent[4]
    assert step == 4 and ids.tolist() == [6, 7, 8, 9] and acts[:, 0].tolist() == [3, 3, 4, 4]
    assert acts.dtype == "float32" and sum(len(s[1]) for s in sent.values()) == 24


def _numbered(batches):
    """The batches with sample ids of their own (the store clusters distinct samples)."""
    return [{**batch, "sample_id": [2 * i, 2 * i + 1]} for i, batch in enumerate(batches)]


def test_a_step_left_out_before_a_trigger_still_tells_the_store_the_run_is_past_it():
    """A non-finite step at the step before a K-means trigger (host-decided skip, CPU): what was pending goes
    to the store all the same, so K-means runs and the centres switch on schedule, not at the next send."""
    import torch

    from pipeline.centroid_store import CentroidStoreImpl
    from pipeline.local import LocalCentres
    from pipeline.loop import Trainer
    from pipeline.tasks import SegmentationTask

    cfg = resolve("DivDR-A", None, ["model_size=micro", "train.crop=[64,64]", "train.steps=8",
                                    "clustering.update_every=4", "store.switch_lag=1"])  # trigger 4, switch 5
    store = CentroidStoreImpl(16, cfg.model.a_dim, 1, cfg.train.steps, cfg.clustering, cfg.store, None)
    torch.manual_seed(0)
    task = SegmentationTask(cfg, Path("."))
    trainer = Trainer(cfg, task, task.build_model(), hooks=[LocalCentres(store, None, cfg), _NaNAt({3})])
    trainer.fit(_numbered(_batches(cfg, 8)))
    assert trainer.skipped_total == 1 and store.watermark == [7]
    assert [h["switch_step"] for h in trainer.centres.history] == [5]  # was: never (the next send is the last)
    assert store.history[0]["points"] == 6  # the three steps trained before the skip


class _Sender:
    def __init__(self):
        self.calls = []

    def send(self, step, ids, acts, complete=True):
        self.calls.append(("send", step, ids.tolist()))

    def mark(self, step):
        self.calls.append(("mark", step))


def test_ray_workers_send_what_is_pending_at_a_skipped_step_before_a_trigger_or_a_mark():
    import torch

    from pipeline.loop import StepResult
    from pipeline.worker import StreamActivations

    cfg = resolve("DivDR-A", None, ["store.send_every=3", "clustering.update_every=5", "train.steps=12"])
    sender = _Sender()
    hook = StreamActivations(sender, cfg)  # every 3 rows, and at indices 4, 9 (triggers 5, 10) and 11
    for index in (0, 1, 2, 3):
        hook.after_step(None, StepResult(index, {"sample_id": [index]}, None, None, None, torch.ones(1, 4), 1.0))
    hook.after_skip(None, 4)  # before the trigger: index 3's row goes now
    hook.after_skip(None, 5)  # not due: nothing
    hook.after_skip(None, 9)  # before the next trigger, nothing pending: a mark
    assert sender.calls == [("send", 2, [0, 1, 2]), ("send", 4, [3]), ("mark", 9)]


def test_kmeans_membership_steps_use_the_stores_partition():
    """clustering.membership: kmeans: eq. 2 in a training step takes each image's own centre from the
    partition that came with the centres (by sample id), not the nearest; a checkpoint keeps it."""
    import torch

    from divdr.losses import clustering_loss
    from pipeline.loop import Trainer
    from pipeline.tasks import SegmentationTask

    cfg = resolve("DivDR-A", None, ["model_size=micro", "train.crop=[64,64]", "clustering.k=2",
                                    "clustering.alpha=1.0", "clustering.membership=kmeans"])
    torch.manual_seed(0)
    task = SegmentationTask(cfg, Path("."))
    trainer = Trainer(cfg, task, task.build_model())
    batch = _batches(cfg, 1)[0]
    with torch.no_grad():
        acts = task.forward(trainer.model, batch).backbone.activations
    centres = torch.stack([acts[0], acts[1]]).numpy()  # each image sits on its own centre: nearest = itself
    trainer.centres.adopt({"version": 1, "centres": centres, "sigma2": 0.5, "stats": {},
                           "assignments": [1, 0, -1]}, step=0)  # K-means put them the other way round
    torch.manual_seed(1)
    result = trainer.run_step(batch)
    expected = clustering_loss(result.activations.detach(), torch.as_tensor(centres), 0.5, 1.0,
                               members=torch.tensor([1, 0]))
    nearest = clustering_loss(result.activations.detach(), torch.as_tensor(centres), 0.5, 1.0)
    assert torch.allclose(result.terms.clustering_per_image.detach(), expected)
    assert not torch.allclose(expected, nearest)
    assert trainer.state()["centre_assignments"].tolist() == [1, 0, -1]
    with pytest.raises(ValueError, match="outside the centroid store"):
        trainer.centres.members([5])
    with pytest.raises(Exception, match=re.escape("clustering.membership: kmeans")):
        resolve("DivDR-A", None, ["clustering.membership=kmeans", "train.cuda_graph=true", "scaling.use_gpu=true"])


class _Sink:
    def __init__(self) -> None:
        self.rows: list[tuple[dict, int]] = []
        self.lines: list[str] = []

    def metrics(self, values, step):
        self.rows.append((values, step))

    def progress(self, line):
        self.lines.append(line)


@pytest.mark.parametrize(("rank", "cache", "loaded", "afresh", "writes"), [
    (0, "compiled", False, 8, True),   # the first run: compiles and writes the file
    (0, "compiled", True, 0, False),   # a later run found every graph in the file: nothing to add
    (0, "compiled", True, 2, True),    # it compiled graphs the file lacked (another torch build): written again
    (1, "compiled", False, 8, False),  # only rank 0 writes
    (0, "", False, 8, False),          # no folder named: torch's own cache only
])
def test_compilation_loads_the_cache_before_the_first_step_and_writes_it_after(monkeypatch, tmp_path, rank, cache,
                                                                               loaded, afresh, writes):
    """train.compile_cache: the network's file is loaded before the first (compiling) step, written by rank 0 after
    it when this process compiled anything the file lacked; the first step's time and the graphs compiled reach
    the metrics and the progress lines."""
    from types import SimpleNamespace

    import torch

    import pipeline.loop
    from pipeline.loop import Compilation, compile_cache_file

    calls = []
    monkeypatch.setattr(pipeline.loop, "load_compile_cache", lambda path: calls.append(("load", path)) or loaded)
    monkeypatch.setattr(pipeline.loop, "save_compile_cache", lambda path: calls.append(("save", path)) or 100)
    # the process had compiled 3 graphs for an earlier run; this run's first step compiles `afresh` more
    counts = iter([3, *[3 + afresh] * 3])
    monkeypatch.setattr(pipeline.loop, "graphs_compiled_afresh", lambda: next(counts))
    cfg = resolve("DR-A", None, ["train.compile=true", *([f"train.compile_cache={tmp_path / cache}"] if cache else [])])
    path = compile_cache_file(cfg, torch.device("cpu"))
    sink = _Sink() if rank == 0 else None
    hook = Compilation(sink)
    trainer = SimpleNamespace(cfg=cfg, net=torch.nn.Linear(1, 1), world=SimpleNamespace(rank=rank), step=1)
    for step in (1, 2, 3):
        trainer.step = step
        hook.before_step(trainer, {})
        assert calls[:1] == ([("load", path)] if cache else [])  # before the first step, once
        hook.after_step(trainer, None)
    assert [c for c in calls if c[0] == "save"] == ([("save", path)] if writes else [])
    if rank == 0:
        ((values, step),) = sink.rows  # reported once, at the first step
        assert step == 1 and values["compile/graphs_compiled"] == afresh and values["compile/first_step_s"] >= 0
        assert values["compile/cache_loaded"] == float(loaded and bool(cache))
        assert sink.lines == [f"step 1 compiled the cells in {values['compile/first_step_s']:.1f} s: {afresh} graphs "
                              f"compiled afresh{f', the rest from {path}' if loaded and cache else ''}"]


def test_each_network_has_its_own_compile_cache_file(tmp_path):
    """Runs of different networks or input sizes sharing one train.compile_cache folder never replace each other's
    file; the same settings find the same file (run after run, trial after trial)."""
    import torch

    from pipeline.loop import compile_cache_file

    def file(*overrides):
        cfg = resolve("DR-A", None, ["train.compile=true", f"train.compile_cache={tmp_path}", *overrides])
        return compile_cache_file(cfg, torch.device("cpu"))

    assert file().parent == tmp_path and file() == file() == file("train.lr=0.01", "train.seed=3")
    others = [file("model_size=micro"), file("train.crop=[96,96]"), file("train.batch_size=4"),
              file("train.precision=bf16"), file("train.channels_last=true"), file("model.gate.kind=gumbel")]
    assert len({file(), *others}) == 1 + len(others)
