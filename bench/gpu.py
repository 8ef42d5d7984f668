"""The training step and inference where users train: one prepared script, torch alone, JSON out.

    python bench/gpu.py --json bench/results/gpu.json                # a GPU: Layer16, the paper's sizes
    python bench/gpu.py --device cpu --json bench/results/gpu_cpu.json   # this machine: smaller sizes
    python bench/gpu.py --tiny                                     # seconds: checks the script works

It needs torch and this repository only (no Ray, FAISS, MLflow or pycocotools: the GPU machine this project
is checked on has none of them), finishes within ``--budget`` seconds (sections that would start past it are
skipped and say so), and keeps going when a section fails (its error is recorded). Sections:

- ``ops``: aten operations dispatched by one forward + backward of the training step (task loss, budget and
  eq. 2), counted with a TorchDispatchMode, by operation; and torch._dynamo.explain of forward + losses
  (graphs, graph breaks).
- ``train``: Layer16 training step time at the crop and batch given (forward, losses, backward, gradient
  clipping, SGD - as ``pipeline.loop.Trainer.run_step``): eager fp32, bf16 autocast, bf16 + channels_last
  (with and without cudnn.benchmark); on a GPU each also captured whole in a CUDA graph and replayed;
  DivDR-A over DR-A. ``compile``: the same step with regional compilation (``divdr.cells.compile_cells``,
  its compile time measured) in bf16 + channels_last, bf16 and fp32.
- ``trainer`` (first): the pipeline's own step (``pipeline.loop.Trainer.run_step``, DivDR-A with eq. 2 on),
  launched, and on a GPU with ``train.cuda_graph`` (the step captured once and replayed), bf16 +
  channels_last and fp32.
- ``inference``: latency at batch 1 on the full-size image against FLOPs: every path open (weights 0.9, the
  gates' value at initialisation), paths closed at random (50%, 90%), every cell dropped (the fixed floor),
  each with the dynamic network forced onto the route (its gates run) and the route's static export
  (``divdr.export``: no gates), eager and (GPU) captured in a CUDA graph; the network at initialisation (its
  own gates), Network-Fix; batch 8 per image. Ratios are to ``all_open``. ``inference_compile``: the static
  exports compiled whole (and captured), a section of its own because each compile takes seconds to a minute.
- ``ops_fused`` (not in the default list; on a CPU with TRITON_INTERPRET=1): the operation count of a step with
  ``train.fused_kernels``, with the kernels launching ones and the Triton launches, against the default step.
- ``profile`` (not in the default list): torch.profiler of the bf16 + channels_last step, device time by kernel.
- ``compile_cache`` (not in the default list): what ``train.compile_cache`` saves - the compiling first step in
  three processes, each standing for a machine (its own inductor and Triton cache directories): cold (which also
  times the compiled step, as ``compile``'s first row); on another machine with the cache file the first wrote;
  again on that machine.

On a GPU every time is taken between ``torch.cuda.synchronize()`` calls; each figure is the median of
``--repeats`` timed runs after warm-up.
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cap_threads, finish, parser


def _failure(error: Exception) -> dict[str, str]:
    """A failed measurement as a row (the traceback printed): one failure must not lose the others."""
    traceback.print_exc()
    return {"error": f"{type(error).__name__}: {error}"[:500]}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graphed_step(step: Step) -> Callable[[], None]:
    """The whole training step (forward, losses, backward, clipping, SGD) captured in one CUDA graph:
    each replay launches every kernel of the step at once, with no Python and no per-kernel launch cost.
    Possible because the step reads nothing back on the host and copies nothing to the device."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def graphed_forward(module: Any, image: Any) -> Callable[[], Any]:
    """``module(image)`` under no_grad captured in one CUDA graph (replayed on the same input buffer)."""
    import torch

    static_image = image.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                module(static_image)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(static_image)
    return graph.replay


class Step:
    """One training step of the library, as ``pipeline.loop.Trainer.run_step`` does it (without Ray, the
    store and the finite check): forward under the precision's autocast, cross-entropy, budget (eq. 9) and
    eq. 2 against fixed centres in float32, backward (GradScaler for fp16), gradient clipping, SGD."""

    def __init__(self, model_size: str, preset: str, crop: tuple[int, int], batch: int, device: str,
                 precision: str = "fp32", channels_last: bool = False, compile_backend: str | None = None,
                 scale_streams: bool = False, fused_kernels: bool = False) -> None:
        import torch

        from divdr.backbone import set_scale_streams
        from divdr.cells import compile_cells
        from divdr.config import get_model_config, get_preset
        from divdr.flops import cost_table, table_for
        from divdr.fused import set_fused_kernels
        from divdr.heads import DynamicRoutingSegmenter

        torch.manual_seed(0)
        self.device = device
        self.preset = get_preset(preset)
        base = get_model_config(model_size, num_classes=19)
        self.config = replace(base, gate=replace(base.gate, kind=self.preset.gate))
        self.net = DynamicRoutingSegmenter(self.config).to(device).train()
        memory = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=memory)
        self.compile_seconds = self.compiled_graphs = None
        if compile_backend:
            compile_cells(self.net, backend=compile_backend)
        set_scale_streams(self.net, scale_streams)
        set_fused_kernels(fused_kernels)  # for the process, as train.fused_kernels: the last Step built decides
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4,
                                         fused=True if device.startswith("cuda") else None)
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        self.autocast = (torch.autocast(device.split(":")[0], dtype=dtypes[precision]) if precision in dtypes
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(device.split(":")[0]) if precision == "fp16" else None
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, *crop, generator=g).to(device).contiguous(memory_format=memory)
        self.labels = torch.randint(0, 19, (batch, *crop), generator=g).to(device)
        self.centres = torch.rand(3, self.config.a_dim, generator=g).to(device)
        self.table = table_for({}, cost_table(self.config, *crop), self.centres)
        if compile_backend:  # the first step compiles every kind of cell
            from torch._dynamo.utils import counters

            graphs_before = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            self()
            _sync(device)
            self.compile_seconds = time.perf_counter() - start
            self.compiled_graphs = counters["stats"]["unique_graphs"] - graphs_before  # one per kind of cell

    def loss(self):
        import torch

        from divdr.flops import budget_ratio
        from divdr.losses import total_loss

        with self.autocast:
            out = self.net(self.images)
            task = torch.nn.functional.cross_entropy(out.logits, self.labels, ignore_index=255)
        clustering = self.preset.clustering
        return total_loss(task, cost_ratio=budget_ratio(out.backbone.gates, self.table), progress=0.5,
                          budget=replace(self.preset.budget, start_fraction=0.0),
                          clustering=replace(clustering, start_fraction=0.0),
                          activations=out.backbone.activations,
                          centres=self.centres if clustering.weight else None, sigma2=0.1).total

    def __call__(self) -> None:
        import torch

        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


def count_ops(fn: Callable[[], Any]) -> collections.Counter:
    """aten operations dispatched while ``fn`` runs, by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Counting() as mode:
        fn()
    return mode.counts


def section_ops(args) -> dict[str, Any]:
    """Operations of one forward + backward (gradients accumulated, as in the issue's count) at a small size:
    the count does not depend on the image size or the device."""
    import torch

    step = Step(args.ops_model, "DivDR-A", (64, 64), 2, "cpu")
    step.loss().backward()  # first call: lazy initialisations out of the count
    forward = count_ops(lambda: setattr(step, "_loss", step.loss()))
    backward = count_ops(lambda: step._loss.backward())
    total = forward + backward
    explained = torch._dynamo.explain(step.loss)()
    return {"model": args.ops_model, "forward": sum(forward.values()), "backward": sum(backward.values()),
            "total": sum(total.values()), "by_operation": dict(total.most_common()),
            "graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "break_reasons": [str(b.reason)[:200] for b in explained.break_reasons]}


# Operations that launch no kernel: views, allocations, metadata (what the kernel counts leave out)
NO_KERNEL = frozenset({"aten.detach", "aten.view", "aten.empty", "aten.empty_like", "aten.empty_strided",
                       "aten.new_empty", "aten.expand", "aten.unbind", "aten.select", "aten.slice", "aten.unsqueeze",
                       "aten.squeeze", "aten.alias", "aten.promote_types", "aten._unsafe_view", "aten.as_strided",
                       "aten.t", "aten.reshape", "aten.permute"})
TRITON_KERNELS = ("bilinear_forward", "bilinear_backward", "bilinear_forward_nhwc", "bilinear_backward_nhwc",
                  "scaled_sum_forward", "scaled_sum_backward", "residual_keep_forward", "residual_keep_backward")


def section_ops_fused(args) -> dict[str, Any]:
    """``train.fused_kernels``' step counted on a CPU: aten operations, those that launch a kernel (``NO_KERNEL``
    left out) and the Triton launches, with the kernels run in triton's interpreter (TRITON_INTERPRET=1 must be
    set before this process starts; the interpreter's own copies are left out of the count), against the default
    step counted alike. Channels_last, as on a GPU (the tiled resize kernels)."""
    import os

    from torch.utils._python_dispatch import _disable_current_modes

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ops_fused runs the kernels in triton's interpreter: set TRITON_INTERPRET=1 when starting")
    import divdr.triton_kernels as kernels

    launches: collections.Counter = collections.Counter()

    class Counted:  # a kernel whose launches are counted and whose interpreter's tensor work is not
        def __init__(self, name: str, kernel: Any) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: Any) -> Callable[..., Any]:
            def launch(*a: Any, **k: Any) -> Any:
                launches[self.name] += 1
                with _disable_current_modes():
                    return self.kernel[grid](*a, **k)
            return launch

    originals = {name: getattr(kernels, name) for name in TRITON_KERNELS}
    out: dict[str, Any] = {"model": args.ops_model}
    try:
        for name, kernel in originals.items():
            setattr(kernels, name, Counted(name, kernel))
        for fused_kernels in (False, True):
            step = Step(args.ops_model, "DivDR-A", (64, 64), 2, "cpu", channels_last=True, fused_kernels=fused_kernels)
            step.loss().backward()  # lazy initialisations (and the interpreter's first calls) out of the count
            launches.clear()
            counted = count_ops(lambda step=step: step.loss().backward())
            launching = sum(v for k, v in counted.items() if k not in NO_KERNEL)
            out["fused" if fused_kernels else "default"] = {
                "aten": sum(counted.values()), "launching": launching, "triton": dict(launches),
                "kernels": launching + sum(launches.values())}
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)
        from divdr.fused import set_fused_kernels

        set_fused_kernels(False)
    return out


def section_train(args, deadline: float, compiled: bool = False) -> dict[str, Any]:
    import torch

    crop, batch = (args.crop, args.crop), args.batch
    if compiled:
        # bf16 + channels_last first: the fastest eager step (H100, 2026-11-27), so its compiled form matters most
        variants = {"compiled_bf16_channels_last": {"precision": "bf16", "channels_last": True,
                                                    "compile_backend": args.compile_backend},
                    "compiled_bf16": {"precision": "bf16", "compile_backend": args.compile_backend},
                    "compiled_fp32": {"compile_backend": args.compile_backend}}
    else:
        variants = {"eager_fp32": {}, "eager_bf16": {"precision": "bf16"},
                    "eager_bf16_channels_last": {"precision": "bf16", "channels_last": True},
                    "eager_bf16_channels_last_cudnn_benchmark": {"precision": "bf16", "channels_last": True,
                                                                 "cudnn_benchmark": True}}
    cuda = args.device.startswith("cuda")
    out: dict[str, Any] = {"model": args.model, "crop": crop, "batch": batch, "device": args.device}
    for name, options in variants.items():
        if time.perf_counter() > deadline:
            out[name] = {"skipped": "time budget spent"}
            continue
        options = dict(options)
        torch.backends.cudnn.benchmark = options.pop("cudnn_benchmark", False)
        if cuda:  # each variant's own peak (a step object of the last one is gone by now)
            torch.cuda.reset_peak_memory_stats()
        try:
            step = Step(args.model, "DivDR-A", crop, batch, args.device, **options)
            seconds = timed(step, args.device, args.repeats)
            out[name] = {"step_ms": 1000 * seconds, "images_per_s": batch / seconds,
                         "compile_s": step.compile_seconds, "compiled_graphs": step.compiled_graphs}
            if cuda:
                out[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
                out[f"{name}_cuda_graph"] = _graph_row(step, args, batch)
            del step
        except Exception as error:  # one failed variant must not lose the others
            out[name] = _failure(error)
        finally:
            torch.backends.cudnn.benchmark = False
            if cuda:
                torch.cuda.empty_cache()
        print(f"  {name}: {out[name]} {out.get(f'{name}_cuda_graph', '')}", flush=True)
    if not compiled and time.perf_counter() < deadline:
        dr = Step(args.model, "DR-A", crop, batch, args.device)
        divdr = Step(args.model, "DivDR-A", crop, batch, args.device)
        ratios = [timed(divdr, args.device, args.repeats, 1) / timed(dr, args.device, args.repeats, 1)
                  for _ in range(2)]
        out["divdr_over_dr_eager_fp32"] = statistics.median(ratios)
    return out


class _SegmentationForward:
    """What ``pipeline.loop.Trainer`` needs of a task to train: the forward of
    ``pipeline.tasks.SegmentationTask``, which this script cannot import (its module reads COCO too, with
    pycocotools)."""

    def __init__(self, cfg) -> None:
        from divdr.flops import cost_table

        self.table, self.on_device = cost_table(cfg.model, *cfg.train.crop), {}

    def forward(self, model, batch):
        import torch

        from divdr.flops import table_for

        out = model(batch["image"])
        loss = torch.nn.functional.cross_entropy(out.logits, batch["label"].long(), ignore_index=255)
        return SimpleNamespace(loss=loss, backbone=out.backbone, correct=None, parts={},
                               table=table_for(self.on_device, self.table, out.backbone.gates))


FAST = ["train.precision=bf16", "train.channels_last=true"]
CAPTURED = ["train.cuda_graph=true", "scaling.use_gpu=true"]


def trainer_settings(args, *options: str) -> list[str]:
    """The pipeline's settings for ``args``' network, crop and batch (a run long enough never to end), then
    ``options`` (``FAST``, ``CAPTURED``, ...)."""
    return [f"model_size={args.model}", f"train.crop=[{args.crop},{args.crop}]", f"train.batch_size={args.batch}",
            "train.steps=1000000", *options]


def fastest_trainer_settings(args, *options: str) -> list[str]:
    """bf16 + channels_last, captured in a CUDA graph where ``args.device`` is one."""
    return trainer_settings(args, *FAST, *(CAPTURED if args.device.startswith("cuda") else []), *options)


def section_trainer(args, deadline: float) -> dict[str, Any]:
    """The pipeline's own step, ``pipeline.loop.Trainer.run_step`` (DivDR-A with centres, so eq. 2 is on; the
    skips read every ``train.log_every`` = 10 steps, as in training), launched and with ``train.cuda_graph``
    (GPU only): what a user's run gets, against the library step of ``train``."""

    cuda = args.device.startswith("cuda")
    fast, captured = FAST, CAPTURED
    variants = {"launched_bf16_channels_last": fast, "launched_fp32": []}
    if cuda:
        variants = {"cuda_graph_bf16_channels_last": [*fast, *captured], **variants, "cuda_graph_fp32": captured,
                    # the two graphs of several workers (pipeline/cuda_graph.py), on one process: the all-reduces
                    # between them left out, the rest as a worker of two runs it
                    "cuda_graph_two_graphs_bf16_channels_last": [*fast, *captured],
                    # the fastest settings a user can ask for; last, as its first step compiles (minutes cold)
                    "cuda_graph_compiled_bf16_channels_last": [*fast, *captured, "train.compile=true"]}
    out: dict[str, Any] = {"model": args.model, "crop": args.crop, "batch": args.batch, "device": args.device}
    for name, options in variants.items():
        measured_row(out, name, lambda options=options, name=name: _trainer_row(
            args, trainer_settings(args, *options), workers=2 if "two_graphs" in name else 1), deadline, cuda)
    return out


def measured_row(out: dict[str, Any], name: str, measure: Callable[[], dict[str, Any]], deadline: float,
                 cuda: bool, seconds_needed: float = 0.0) -> None:
    """``out[name] = measure()`` unless fewer than ``seconds_needed`` are left before ``deadline``; a failure is
    recorded as the row (the other rows still run); on a GPU the row's own peak memory, and the cache emptied."""
    import torch

    if time.perf_counter() + seconds_needed > deadline:
        out[name] = {"skipped": "time budget spent"}
        return
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        out[name] = measure()
    except Exception as error:  # one failed row must not lose the others
        out[name] = _failure(error)
    finally:
        if cuda:
            torch.cuda.empty_cache()
    print(f"  {name}: {out[name]}", flush=True)


def _trainer_row(args, settings: list[str], workers: int = 1) -> dict[str, Any]:
    """Time ``Trainer.run_step`` with ``settings`` after its warm-up steps (and its capture, where there is one).
    ``workers`` > 1: the step as one of that many processes, whose communication is left out (one process)."""
    import torch

    start = time.perf_counter()
    trainer, batch = _trainer_ready(args, settings, workers)
    first = time.perf_counter() - start
    seconds = timed(lambda: trainer.run_step(batch), args.device, args.repeats, warmup=1)
    row = {"step_ms": 1000 * seconds, "images_per_s": args.batch / seconds, "first_steps_s": first,
           "skipped_steps": trainer.skipped_total}
    if args.device.startswith("cuda"):
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def _trainer_ready(args, settings: list[str], workers: int = 1) -> tuple[Any, dict[str, Any]]:
    """A ``Trainer`` with ``settings`` and a batch, its warm-up steps (and its capture, where there is one) run."""
    import dataclasses

    import numpy as np
    import torch

    from divdr.backbone import set_scale_streams
    from divdr.cells import compile_cells
    from divdr.fused import set_fused_kernels
    from divdr.heads import DynamicRoutingSegmenter
    from pipeline.config import resolve
    from pipeline.cuda_graph import WARMUP_STEPS
    from pipeline.loop import SingleProcess, Trainer

    cfg = resolve("DivDR-A", None, settings)
    memory = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(cfg.model).to(args.device).to(memory_format=memory)
    if cfg.train.compile:  # as pipeline.tasks.as_configured does (that module needs pycocotools)
        compile_cells(net, backend=args.compile_backend)
    set_scale_streams(net, cfg.train.scale_streams)
    set_fused_kernels(cfg.train.fused_kernels)
    world = dataclasses.replace(SingleProcess(), size=workers)  # its collectives do nothing
    trainer = Trainer(cfg, _SegmentationForward(cfg), net, world=world)
    centres = np.random.default_rng(0).random((cfg.clustering.k, cfg.model.a_dim), dtype=np.float32)
    trainer.centres.adopt({"version": 1, "centres": centres, "sigma2": 0.1, "stats": {}}, 0)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(args.batch, 3, args.crop, args.crop, generator=g).to(args.device)
             .contiguous(memory_format=memory),
             "label": torch.randint(0, cfg.model.num_classes, (args.batch, args.crop, args.crop),
                                    generator=g).to(args.device), "sample_id": list(range(args.batch))}
    for _ in range(WARMUP_STEPS + 1):  # warm-up steps, and the capture where there is one
        trainer.run_step(batch)
    _sync(args.device)
    return trainer, batch


def gradients_after_one_step(step: Step) -> tuple[float, list[Any]]:
    """The loss and every parameter's gradient of one forward + backward of ``step`` (no update)."""
    step.optimizer.zero_grad(set_to_none=True)
    loss = step.loss()
    loss.backward()
    return float(loss.detach()), [p.grad.float().clone() for p in step.net.parameters() if p.grad is not None]


def gradient_difference(grads: list[Any], reference: list[Any]) -> float:
    """The norm of the difference of two lists of gradients over the reference's norm (all parameters as one)."""
    import torch

    difference = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(grads, reference, strict=True)))
    return float(difference / torch.sqrt(sum((a ** 2).sum() for a in reference)))


def compare_streams(args, precision: str, channels_last: bool) -> dict[str, Any]:
    """One forward + backward with each layer's cells on one stream and on streams side by side, from the same
    weights and batch: the loss and gradients should agree up to the order autograd adds them in."""

    steps = [Step(args.model, "DivDR-A", (args.crop, args.crop), args.batch, args.device, precision=precision,
                  channels_last=channels_last, scale_streams=streams) for streams in (False, True)]
    (loss_one, grads_one), (loss_side, grads_side) = (gradients_after_one_step(step) for step in steps)
    worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
                for a, b in zip(grads_one, grads_side, strict=True))
    return {"loss_one_stream": loss_one, "loss_side_by_side": loss_side,
            "gradient_relative_difference": gradient_difference(grads_side, grads_one),
            "worst_parameter_relative_max": worst,
            "gradients": len(grads_one)}


def section_streams(args, deadline: float) -> dict[str, Any]:
    """``train.scale_streams`` (divdr.backbone.set_scale_streams): the gradients with and without (bf16 +
    channels_last, and fp32), then the library step and the pipeline's captured step, each with the streams off and
    on side by side in this process, the issue's fp32 baseline beside them; last, if time is left, the pipeline's
    compiled + captured step with the streams."""
    import torch

    cuda = args.device.startswith("cuda")
    out: dict[str, Any] = {"model": args.model, "crop": args.crop, "batch": args.batch, "device": args.device}

    def row(name: str, measure: Callable[[], dict[str, Any]], seconds_needed: float = 0.0) -> None:
        measured_row(out, name, measure, deadline, cuda, seconds_needed)

    def library(streams: bool, precision: str = "bf16", channels_last: bool = True) -> dict[str, Any]:
        step = Step(args.model, "DivDR-A", (args.crop, args.crop), args.batch, args.device, precision=precision,
                    channels_last=channels_last, scale_streams=streams)
        seconds = timed(step, args.device, args.repeats)
        result = {"step_ms": 1000 * seconds, "images_per_s": args.batch / seconds}
        if cuda:
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["cuda_graph"] = _graph_row(step, args, args.batch)
        return result

    base = fastest_trainer_settings(args)
    row("gradients_bf16_channels_last", lambda: compare_streams(args, "bf16", True))
    row("gradients_fp32", lambda: compare_streams(args, "fp32", False))
    row("library_bf16_channels_last", lambda: library(False))
    row("library_bf16_channels_last_streams", lambda: library(True))
    row("baseline_library_eager_fp32", lambda: library(False, "fp32", False))
    row("trainer_bf16_channels_last", lambda: _trainer_row(args, base))
    row("trainer_bf16_channels_last_streams", lambda: _trainer_row(args, [*base, "train.scale_streams=true"]))
    row("trainer_compiled_bf16_channels_last_streams",  # its first step compiles: only with minutes left
        lambda: _trainer_row(args, [*base, "train.scale_streams=true", "train.compile=true"]), 200.0)
    return out


def _graph_row(step: Step, args, batch: int) -> dict[str, Any]:
    """The same step captured in a CUDA graph and replayed; its own error, so the eager row stays."""
    import torch

    try:
        start = time.perf_counter()
        replay = graphed_step(step)
        capture = time.perf_counter() - start
        seconds = timed(replay, args.device, args.repeats)
        return {"step_ms": 1000 * seconds, "images_per_s": batch / seconds, "capture_s": capture,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    except Exception as error:
        return _failure(error)


def compile_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a process of its own (``section_compile_cache``): the step of ``compile`` built and run once, the
    compile cache loaded before it and / or written after it as ``spec`` says."""
    from pathlib import Path

    from divdr.cells import graphs_compiled_afresh, load_compile_cache, save_compile_cache

    if spec["device"] == "cpu":
        cap_threads(spec["threads"])
    cache = Path(spec["cache"])
    loaded = load_compile_cache(cache) if spec["load"] else False
    step = Step(spec["model"], "DivDR-A", (spec["crop"], spec["crop"]), spec["batch"], spec["device"],
                precision=spec["precision"], channels_last=spec["channels_last"], compile_backend=spec["backend"])
    row = {"compile_s": step.compile_seconds, "compiled_graphs": step.compiled_graphs,
           "graphs_compiled_afresh": graphs_compiled_afresh(), "cache_loaded": loaded,
           "cache_bytes": save_compile_cache(cache) if spec["save"] else None}
    if spec["repeats"]:  # the compiled step itself, launched and (GPU) captured: the compile section's first row
        seconds = timed(step, spec["device"], spec["repeats"])
        row |= {"step_ms": 1000 * seconds, "images_per_s": spec["batch"] / seconds}
        if spec["device"].startswith("cuda"):
            row["cuda_graph"] = _graph_row(step, SimpleNamespace(device=spec["device"], repeats=spec["repeats"]),
                                           spec["batch"])
    return row


# (row, inductor cache directory, load the file, write the file): each row a new process, as a new run would be
COMPILE_CACHE_ROWS = (("cold", "machine_a", False, True),             # a fresh machine, nothing cached: compiles
                      ("fresh_machine_with_file", "machine_b", True, False),  # another machine, train.compile_cache
                      ("same_machine_again", "machine_b", False, False))      # a re-run there: torch's own cache


def section_compile_cache(args, deadline: float) -> dict[str, Any]:
    """What ``train.compile_cache`` saves: the compiling first step of the ``compile`` section's first variant
    (bf16 + channels_last on a GPU) in three processes, each with its own inductor (and Triton) cache directory
    standing for a machine - cold, on another machine with the file the first wrote, and again on that machine
    (torch's local cache). The cold process also times the compiled step, launched and (GPU) in a CUDA graph, so
    this section alone gives the compile section's first row."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from bench.common import REPO

    cuda = args.device.startswith("cuda")
    spec = {"model": args.model, "crop": args.crop, "batch": args.batch, "device": args.device,
            "precision": "bf16" if cuda else "fp32", "channels_last": cuda, "backend": args.compile_backend,
            "threads": args.threads}
    out: dict[str, Any] = {key: spec[key] for key in ("model", "crop", "batch", "device", "precision",
                                                      "channels_last", "backend")}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bench.gpu import compile_child; "
            "print('ROW ' + json.dumps(compile_child(json.loads(sys.argv[2]))))")
    with tempfile.TemporaryDirectory() as tmp:
        for name, machine, load, save in COMPILE_CACHE_ROWS:
            if time.perf_counter() > deadline:
                out[name] = {"skipped": "time budget spent"}
                continue
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/{machine}",
                   "TRITON_CACHE_DIR": f"{tmp}/{machine}/triton"}
            child = {**spec, "cache": f"{tmp}/cells.cache", "load": load, "save": save,
                     "repeats": args.repeats if name == "cold" else 0}  # the step is timed once: compiled cold
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", code, str(REPO), json.dumps(child)], env=env,
                                  capture_output=True, text=True, timeout=900)
            rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
            out[name] = (json.loads(rows[-1]) if done.returncode == 0 and rows
                         else {"error": done.stderr[-1000:] or f"exit code {done.returncode}"})
            out[name]["process_s"] = time.perf_counter() - start
            print(f"  {name}: {out[name]}", flush=True)
    return out


def section_profile(args, deadline: float) -> dict[str, Any]:
    """Where the GPU time of one training step goes: torch.profiler over 3 steps of the bf16 + channels_last
    step launched (device time by kernel and by aten operation, both kinds of row: ``top``; where its copies,
    products and fills come from: ``sources``) and, on a GPU, of
    the step captured in a CUDA graph (kernels only: a replay launches no aten operation) - the library's step
    (``captured``), with ``train.scale_streams`` (``captured_streams``), the pipeline's
    ``Trainer.run_step`` (``pipeline_captured``) and the library's with ``train.fused_kernels``
    (``captured_fused_kernels``) - each with the step's time, how many kernels it runs and their
    summed time (over every stream: more than the step's time where streams overlap; less where the GPU idles
    between kernels), that time by kind of kernel, and every kernel (``kernels``, for diffs between rows)."""
    from divdr.fused import set_fused_kernels

    step = Step(args.model, "DivDR-A", (args.crop, args.crop), args.batch, args.device, precision="bf16",
                channels_last=True)
    out: dict[str, Any] = {"top": _profiled(step, args.device)["top"], "sources": operation_sources(step, args.device)}
    del step
    if not args.device.startswith("cuda"):
        return out

    def captured(streams: bool, fused_kernels: bool = False) -> dict[str, Any]:
        step = Step(args.model, "DivDR-A", (args.crop, args.crop), args.batch, args.device, precision="bf16",
                    channels_last=True, scale_streams=streams, fused_kernels=fused_kernels)
        replay = graphed_step(step)
        return {"step_ms": 1000 * timed(replay, args.device, args.repeats),
                **_profiled(replay, args.device, kernels_only=True)}

    def pipeline_captured() -> dict[str, Any]:
        trainer, batch = _trainer_ready(args, fastest_trainer_settings(args))
        replay = lambda: trainer.run_step(batch)  # noqa: E731 - a replay once captured
        return {"step_ms": 1000 * timed(replay, args.device, args.repeats),
                **_profiled(replay, args.device, kernels_only=True)}

    measured_row(out, "captured", lambda: captured(False), deadline, True)
    measured_row(out, "captured_streams", lambda: captured(True), deadline, True)
    measured_row(out, "pipeline_captured", pipeline_captured, deadline, True)
    try:
        measured_row(out, "captured_fused_kernels", lambda: captured(False, fused_kernels=True), deadline, True)
    finally:
        set_fused_kernels(False)  # a switch of the process: the sections after this one run without
    return out


def operation_sources(fn: Callable[[], Any], device: str, rows: int = 40,
                      names: tuple[str, ...] = ("aten::copy_", "aten::mul", "aten::add_", "aten::add", "aten::fill_",
                                                "aten::zero_")) -> list[dict[str, Any]]:
    """Where one run of ``fn``'s copies, products, sums and fills come from: their device time grouped by the chain
    of operations above each (up to 4, in the backward the autograd node), most time first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    table: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.name not in names:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name[:60])
            parent = parent.cpu_parent
        entry = table[" <- ".join([event.name, *chain])]
        entry[0] += 1
        entry[1] += event.device_time_total / 1e3
    ranked = sorted(table.items(), key=lambda kv: -kv[1][1])[:rows]
    return [{"chain": chain, "count": int(count), "device_ms": ms} for chain, (count, ms) in ranked]


# Kinds of CUDA kernel, by a fragment of their names (the first that matches; lower case)
KERNEL_KINDS = (("batch_norm", ("batch_norm", "bn_fw", "bn_bw")),
                ("upsample", ("upsample", "bilinear_")),  # aten's, and divdr.fused's Triton kernels
                ("fused_weighting", ("scaled_sum",)),
                ("layout_transform", ("nchwtonhwc", "nhwctonchw", "transpose")),
                ("convolution", ("conv", "wgrad", "dgrad", "fprop", "xmma", "implicit")),
                ("matmul", ("gemm", "cutlass", "cublas", "sm90", "sm80")),
                ("optimizer", ("multi_tensor", "fused_sgd", "foreach")),
                ("copy_or_cast", ("copy",)),
                ("reduction", ("reduce",)),
                ("elementwise", ("elementwise",)),
                ("memset_memcpy", ("memset", "memcpy")))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS if any(f in lowered for f in fragments)), "other")


def _profiled(fn: Callable[[], Any], device: str, kernels_only: bool = False, steps: int = 3,
              rows: int = 30) -> dict[str, Any]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(steps):
        fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    events = [e for e in prof.key_averages() if not kernels_only or e.device_type == DeviceType.CUDA]
    ranked = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)

    def listed(chosen) -> list[dict[str, Any]]:
        return [{"name": e.key[:120], "count": e.count, "self_device_ms_per_step": e.self_device_time_total /
                 (1e3 * steps)} for e in chosen]

    # no total where the rows mix aten operations and the kernels they launch: their sum counts time twice
    result: dict[str, Any] = {"top": listed(ranked[:rows])}
    if kernels_only:
        kinds: dict[str, dict[str, float]] = {}
        for e in events:
            kind = kinds.setdefault(kernel_kind(e.key), {"kernels_per_step": 0.0, "ms_per_step": 0.0})
            kind["kernels_per_step"] += e.count / steps
            kind["ms_per_step"] += e.self_device_time_total / (1e3 * steps)
        result |= {"kernels_per_step": sum(e.count for e in events) / steps,
                   "kernel_ms_per_step": sum(e.self_device_time_total for e in events) / (1e3 * steps),
                   "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["ms_per_step"])),
                   "kernels": listed(ranked)}
    return result


def _route(net, closed: float, seed: int):
    """Every path a cell has open with its gate's weight at initialisation (~0.9), a fraction ``closed``
    of them closed at random."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for cell in net.backbone.cells:
        open_paths = torch.tensor(cell.spec.paths, dtype=torch.float32)
        rows.append(0.9 * open_paths * (torch.rand(3, generator=g) >= closed))
    return torch.stack(rows)


def section_inference(args, deadline: float, compiled: bool = False) -> dict[str, Any]:
    """Latency at batch 1 against FLOPs. ``compiled``: the static exports compiled whole (inductor; each
    compile takes long, so it is a section of its own, run after the training step's compilation)."""
    import torch

    from divdr.config import GateConfig, get_model_config
    from divdr.export import export_route, forced_route, route_flops
    from divdr.flops import cost_table, real_cost
    from divdr.heads import DynamicRoutingSegmenter

    height, width = args.image
    cuda = args.device.startswith("cuda")
    config = get_model_config(args.model, num_classes=19)
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(config).to(args.device).eval()
    image = torch.randn(1, 3, height, width, device=args.device)
    table = cost_table(config, height, width)
    rows: dict[str, Any] = {}

    def measure(name: str, fn: Callable[[], Any], gflops: float) -> None:
        if time.perf_counter() > deadline:
            rows[name] = {"skipped": "time budget spent"}
            return
        try:
            with torch.no_grad():
                rows[name] = {"ms": 1000 * timed(fn, args.device, args.repeats), "gflops": gflops}
        except Exception as error:  # one failed row must not lose the others
            rows[name] = _failure(error)
        print(f"  {name}: {rows[name]}", flush=True)

    def forced(route):
        def run():
            with forced_route(net, route):
                return net(image)
        return run

    if not compiled:
        with torch.no_grad():
            gates = net(image).backbone.gates
        measure("at_initialisation", lambda: net(image), float(real_cost(gates.cpu().double(), table)[0]) / 1e9)
    labels = {0.0: "all_open", 1.0: "every_cell_dropped", 0.5: "closed_50", 0.9: "closed_90"}
    # compiled: the ends first (the floor is a target), the middle routes if time is left
    for closed in (0.0, 1.0, 0.9, 0.5) if compiled else (0.0, 0.5, 0.9, 1.0):
        route = _route(net, closed, seed=int(closed * 100))
        label = labels[closed]
        gflops = float(real_cost(route[None].double(), table)[0]) / 1e9
        if not compiled or closed == 0.0:  # compiled: the dynamic all-open row again, as the ratios' base
            measure(f"{label}_dynamic" if closed else label, forced(route), gflops)
        static = export_route(net, route).to(args.device)
        static_gflops = route_flops(net, route, height, width) / 1e9
        if not compiled:
            measure(f"{label}_static", lambda static=static: static(image), static_gflops)
            if cuda and time.perf_counter() < deadline:
                try:
                    measure(f"{label}_static_cuda_graph", graphed_forward(static, image), static_gflops)
                except Exception as error:  # capture failed: recorded, the other rows still run
                    rows[f"{label}_static_cuda_graph"] = _failure(error)
            continue
        if time.perf_counter() > deadline:
            rows[f"{label}_static_compiled"] = {"skipped": "time budget spent"}
            continue
        try:
            compiled_static = torch.compile(static, backend=args.compile_backend)
            start = time.perf_counter()
            with torch.no_grad():
                compiled_static(image)
            _sync(args.device)
            compile_s = time.perf_counter() - start
            measure(f"{label}_static_compiled", lambda c=compiled_static: c(image), static_gflops)
            rows[f"{label}_static_compiled"]["compile_s"] = compile_s
            if cuda and time.perf_counter() < deadline:
                measure(f"{label}_static_compiled_cuda_graph", graphed_forward(compiled_static, image),
                        static_gflops)
        except Exception as error:
            rows[f"{label}_static_compiled"] = _failure(error)
    if not compiled:
        fix_config = replace(config, gate=GateConfig(enabled=False))
        fix = DynamicRoutingSegmenter(fix_config).to(args.device).eval()
        measure("network_fix", lambda: fix(image), cost_table(fix_config, height, width).all_open / 1e9)
        batch = image.expand(8, -1, -1, -1).contiguous()
        all_open = _route(net, 0.0, seed=0)

        def forced_batch():
            with forced_route(net, all_open):
                return net(batch)

        measure("all_open_batch8_per_image", forced_batch, rows["all_open"].get("gflops", 0.0))
        if "ms" in rows.get("all_open_batch8_per_image", {}):
            rows["all_open_batch8_per_image"]["ms"] /= 8
    base = rows.get("all_open", {})
    for row in rows.values():
        if "ms" in row and "ms" in base:
            row["latency_ratio"] = row["ms"] / base["ms"]
            row["flops_ratio"] = row["gflops"] / base["gflops"]
    return {"model": args.model, "image": [height, width], "device": args.device, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--model", default="layer16")
    p.add_argument("--ops-model", default="layer16", help="the network whose operations are counted")
    p.add_argument("--crop", type=int, default=768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image", type=int, nargs=2, default=(1024, 2048))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget", type=float, default=280.0, help="seconds; sections past it are skipped")
    # the compiled step last but one (its compilation cannot be cut short), the operation count last (it does
    # not depend on the device and is measured on any CPU)
    p.add_argument("--sections", nargs="+",
                   default=["trainer", "train", "inference", "compile", "inference_compile", "ops"],
                   choices=["trainer", "train", "inference", "compile", "inference_compile", "ops", "profile",
                            "compile_cache", "streams", "ops_fused"])
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (--tiny: aot_eager)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        cap_threads(args.threads)
    if args.tiny:
        args.model, args.ops_model, args.crop, args.batch, args.image, args.repeats = \
            "micro", "micro", 64, 2, (64, 128), 2
        args.compile_backend = "aot_eager"  # inductor on a CPU compiles C++: minutes
    deadline = started + args.budget
    result: dict[str, Any] = {"benchmark": "gpu", "torch": torch.__version__, "device": args.device,
                              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
                              else "cpu"}
    sections = {"ops": lambda: section_ops(args), "ops_fused": lambda: section_ops_fused(args),
                "train": lambda: section_train(args, deadline),
                "trainer": lambda: section_trainer(args, deadline),
                "compile": lambda: section_train(args, deadline, compiled=True),
                "inference": lambda: section_inference(args, deadline),
                "inference_compile": lambda: section_inference(args, deadline, compiled=True),
                "profile": lambda: section_profile(args, deadline),
                "compile_cache": lambda: section_compile_cache(args, deadline),
                "streams": lambda: section_streams(args, deadline)}
    for name in args.sections:
        t = time.perf_counter()
        if t > deadline:
            result[name] = {"skipped": "time budget spent"}
            continue
        try:
            result[name] = sections[name]()
        except Exception as error:  # the other sections still run and are written
            result[name] = {"error": f"{type(error).__name__}: {error}"[:1000]}
            traceback.print_exc()
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
        shown = {k: v for k, v in result[name].items() if k not in ("by_operation", "rows", "top")}
        print(f"{name}: {shown}", flush=True)
        if args.json:  # after every section: a run cut short keeps what it measured
            finish(result, args.json, started)
    return finish(result, args.json, started)


if __name__ == "__main__":
    main()
