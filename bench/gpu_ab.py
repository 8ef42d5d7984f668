"""Each speed change of 2026-11-28 (issue #20) against the code before it, side by side on one GPU.

    python bench/gpu_ab.py --json bench/results/gpu_ab.json     # a GPU: Layer16, 768x768, batch 8 (~2 minutes)
    python bench/gpu_ab.py --device cpu --model small --crop 256 --batch 2 --repeats 5   # this CPU
    python bench/gpu_ab.py --tiny                               # seconds on a CPU: checks the script works

The code before each change is put back for its "before" rows by replacing one function (defined here, as it
was); the rows run in interleaved rounds (before, after, before, after ...) in one process. The library's step is
bench/gpu.py's ``Step`` (bf16 autocast + channels_last, DivDR-A with eq. 2), captured in a CUDA graph on a GPU:

- ``gate_resize``: the small gates' down-sampling by 4 under autocast in float32 (autocast's policy for
  ``F.interpolate``: each cell input copied whole to float32, and back in the backward) / in the input's dtype.
- ``logits``: the logits' x4 resize in bf16 on a channels_last map / in float32 from a contiguous map.
- ``up_weight``: the up path's per-image weight applied after the x2 resize / before it (a quarter of the pixels).
- ``trainer_host``: ``pipeline.loop.Trainer``'s work before each step - ``model.train()`` and the search for gates
  with a temperature, every step / only when needed (the pipeline's captured step with a sync after each, as
  ``timed`` measures it; a captured step's GPU waits on that host work).
- ``upsample``: the x2 resize alone, forward and forward + backward kernel time (torch.profiler), at the sizes of
  Layer16's up paths and the x4 of the logits: ``F.interpolate`` in the input's dtype, in float32, on an NCHW copy.
- ``per_image_product``: a per-image weight times a channels_last map ([B, 1, 1, 1] broadcast) against an add of
  two maps of the same size: the broadcast runs a slower, non-vectorised kernel.

And ``train.fused_kernels`` (divdr.fused, Triton; 2026-11-28, later), off / on:

- ``upsample`` and ``per_image_product`` get a ``fused`` variant (the small gates' down-sampling by 4 is a row of
  ``upsample`` too; ``per_image_product`` also times the keep path's two-term sum, a cell's ReLU(h + x) with its
  keep path, and the backward);
- ``fused``: the gradients of one bf16 + channels_last step with and without the kernels, each against the float32
  step (aten), from the same weights and batch; the library's captured step, with and without
  ``train.scale_streams``, and the pipeline's, each off / on in interleaved rounds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cap_threads, finish, interleaved, median, parser


def gate_resize_as_before(x, size=None, scale_factor=None):
    """divdr.gates' resize before the change: F.interpolate under the autocast in force (float32 on CUDA)."""
    import torch.nn.functional as F

    return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=False)


def logits_resize_as_before(x, size=None, scale_factor=None):
    """divdr.heads' resizes before the change: the logits' x4 in the autocast dtype, channels_last."""
    import torch

    import divdr.ops

    if scale_factor == 4:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = x.contiguous(memory_format=torch.channels_last)
    return divdr.ops.bilinear(x, size=size, scale_factor=scale_factor)


def up_projection_as_before(self, activated, weight=None):
    """divdr.ops.UpTransform.project before the change: the weight applied after the resize."""
    import divdr.ops

    up = divdr.ops.bilinear(self.conv[1](activated), scale_factor=2)
    return up if weight is None else weight * up


def begin_step_as_before(self):
    """pipeline.loop.Trainer.begin_step before the change: both module walks at every step."""
    from divdr.gates import anneal_temperature

    self.model.train()
    return anneal_temperature(self.net, self.progress, self.cfg.model.gate.temperature)


@contextlib.contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def before_contexts() -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    import divdr.gates
    import divdr.heads
    import divdr.ops

    return {"gate_resize": lambda: replaced(divdr.gates, "bilinear", gate_resize_as_before),
            "logits": lambda: replaced(divdr.heads, "bilinear", logits_resize_as_before),
            "up_weight": lambda: replaced(divdr.ops.UpTransform, "project", up_projection_as_before)}


def library_step_ms(args, **options: Any) -> float:
    """Milliseconds of the library's captured step (launched on a CPU), built afresh; ``options``: ``Step``'s."""
    import torch

    from bench import gpu

    step = gpu.Step(args.model, "DivDR-A", (args.crop, args.crop), args.batch, args.device, precision="bf16",
                    channels_last=True, **options)
    run = gpu.graphed_step(step) if args.device.startswith("cuda") else step
    seconds = gpu.timed(run, args.device, args.repeats)
    del step, run
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 1000 * seconds


def trainer_step_ms(args, *options: str) -> float:
    from bench import gpu

    return gpu._trainer_row(args, gpu.fastest_trainer_settings(args, *options))["step_ms"]


def section_changes(args, deadline: float) -> dict[str, Any]:
    """Per change, the library's step before / after in interleaved rounds; the trainer's host work likewise."""
    from pipeline.loop import Trainer

    out: dict[str, Any] = {}
    for name, before in before_contexts().items():
        if time.perf_counter() > deadline:
            out[name] = {"skipped": "time budget spent"}
            continue

        def as_before(before=before) -> float:
            with before():
                return library_step_ms(args)

        rows = interleaved({"before_ms": as_before, "after_ms": lambda: library_step_ms(args)}, args.rounds)
        out[name] = {**{k: median(v) for k, v in rows.items()}, "rounds": rows}
        print(f"  {name}: {out[name]}", flush=True)
    if time.perf_counter() < deadline:
        def host_as_before() -> float:
            with replaced(Trainer, "begin_step", begin_step_as_before):
                return trainer_step_ms(args)

        rows = interleaved({"before_ms": host_as_before, "after_ms": lambda: trainer_step_ms(args)}, args.rounds)
        out["trainer_host"] = {**{k: median(v) for k, v in rows.items()}, "rounds": rows,
                               "library_ms": library_step_ms(args)}
        print(f"  trainer_host: {out['trainer_host']}", flush=True)
    return out


def kernel_us(fn: Callable[[], Any], device: str, calls: int = 10) -> float:
    """Microseconds per call: summed kernel time on a GPU (launch gaps left out), wall time on a CPU."""
    from bench import gpu

    if not device.startswith("cuda"):
        return 1e6 * gpu.timed(fn, device, 3)
    return 1e3 * gpu._profiled(fn, device, kernels_only=True, steps=calls)["kernel_ms_per_step"]


def _channels(args) -> int:
    from divdr.config import get_model_config

    return get_model_config(args.model, num_classes=19).channels


def section_upsample(args) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from bench import gpu
    from divdr import fused

    def resize(x, factor):
        return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)

    def nchw(x, factor):
        return resize(x.contiguous(), factor).contiguous(memory_format=torch.channels_last)

    def fused_resize(x, factor):
        out = fused.resize(x, None, factor)
        if out is None:
            raise RuntimeError("the fused kernels do not apply here")
        return out

    variants = {"interpolate": resize, "interpolate_float32": lambda x, f: resize(x.float(), f).to(x.dtype),
                "interpolate_nchw": nchw}
    if fused.fused_kernels_enabled() and args.device.startswith("cuda"):
        variants["fused"] = fused_resize
    # the up paths' inputs (scales 1-3: C x (crop/8)^2 .. 4C x (crop/32)^2; Layer16 at 768: 64 x 96^2 .. 256 x 24^2)
    c, size = _channels(args), args.crop // 8
    shapes = [((args.batch, c * 2**k, size // 2**k, size // 2**k), 2, torch.bfloat16) for k in range(3)]
    shapes.append(((args.batch, 19, 2 * size, 2 * size), 4, torch.float32))  # the logits at 1/4
    shapes.append(((args.batch, c, 2 * size, 2 * size), 0.25, torch.bfloat16))  # a small gate's input at 1/4
    out: dict[str, Any] = {}
    for shape, factor, dtype in shapes:
        # channels_last as the network's maps are, except the logits: resized from a contiguous map (divdr.heads)
        layout = torch.contiguous_format if factor == 4 else torch.channels_last
        x = torch.randn(shape, device=args.device, dtype=dtype).contiguous(memory_format=layout)
        x.requires_grad_()
        grad = torch.randn_like(resize(x.detach(), factor))
        row = {}
        for name, fn in variants.items():
            def forward(fn=fn, x=x, factor=factor):
                return fn(x.detach(), factor)

            def both(fn=fn, x=x, factor=factor, grad=grad):
                return torch.autograd.grad(fn(x, factor), x, grad)

            try:  # a kernel that fails (to compile, say) must not lose the other rows
                row[name] = {"forward_us": kernel_us(forward, args.device),
                             "forward_backward_us": kernel_us(both, args.device)}
                if name == "fused":  # the same values as aten's, to bf16 rounding (its backward adds with atomics)
                    row[name]["max_relative_difference"] = _max_relative_difference(forward(), resize(x.detach(),
                                                                                                      factor))
                    row[name]["max_relative_difference_backward"] = _max_relative_difference(
                        both()[0], torch.autograd.grad(resize(x, factor), x, grad)[0])
            except Exception as error:
                row[name] = gpu._failure(error)
        out[f"{'x'.join(map(str, shape))}_x{factor}_{str(dtype).removeprefix('torch.')}"] = row
        print(f"  {shape} x{factor}: {row}", flush=True)
    return out


def section_per_image_product(args) -> dict[str, Any]:
    import torch

    from divdr import fused

    c, size = _channels(args), args.crop // 4  # a map at 1/4, the finest scale
    g = torch.Generator(device=args.device).manual_seed(0)
    maps, others = (torch.randn(args.batch, c, size, size, device=args.device, dtype=torch.bfloat16, generator=g)
                    .contiguous(memory_format=torch.channels_last) for _ in range(2))
    weights, passthrough = (torch.rand(args.batch, 1, 1, 1, device=args.device, dtype=torch.bfloat16, generator=g)
                            for _ in range(2))
    out = {"per_image_weight_times_map_us": kernel_us(lambda: weights * maps, args.device),
           "map_plus_map_us": kernel_us(lambda: maps + maps, args.device)}
    if not (fused.fused_kernels_enabled() and args.device.startswith("cuda")):
        return out
    assert fused._fusable(maps, weights, others, passthrough), "the kernels should apply to these maps"

    def aten_sum(x, w, x2, w2):  # what the cells ran before (and run without the kernels)
        return w * x if x2 is None else torch.addcmul(w * x, w2, x2)

    def fused_sum(x, w, x2, w2):
        return fused._ScaledSum.apply(x, w, x2, w2)

    def forward_backward(fn, second):
        x, w = maps.detach().requires_grad_(), weights.detach().requires_grad_()
        y = fn(x, w, *second)
        return torch.autograd.grad(y, (x, w), torch.ones_like(y))

    for name, second in (("one_term", (None, None)), ("keep_two_terms", (others, passthrough))):
        out[name] = {
            "aten_forward_us": kernel_us(lambda s=second: aten_sum(maps, weights, *s), args.device),
            "fused_forward_us": kernel_us(lambda s=second: fused_sum(maps, weights, *s), args.device),
            "aten_forward_backward_us": kernel_us(lambda s=second: forward_backward(aten_sum, s), args.device),
            "fused_forward_backward_us": kernel_us(lambda s=second: forward_backward(fused_sum, s), args.device),
            "max_relative_difference": _max_relative_difference(fused_sum(maps, weights, *second),
                                                                aten_sum(maps, weights, *second))}

    def cell_keep(fn):  # a cell's ReLU(h + x) and keep path, forward + backward as a cell uses them (both read)
        h, x = maps.detach().requires_grad_(), others.detach().requires_grad_()
        activated, keep = fn(h, x)
        return torch.autograd.grad((activated, keep), (h, x), (torch.ones_like(keep), torch.ones_like(keep)))

    def aten_keep(h, x):
        activated = torch.relu(h + x)
        return activated, aten_sum(activated, weights, x, passthrough)

    def fused_keep(h, x):
        return fused._ResidualKeep.apply(h, x, weights, passthrough)

    out["cell_relu_and_keep"] = {
        "aten_forward_us": kernel_us(lambda: aten_keep(maps, others), args.device),
        "fused_forward_us": kernel_us(lambda: fused_keep(maps, others), args.device),
        "aten_forward_backward_us": kernel_us(lambda: cell_keep(aten_keep), args.device),
        "fused_forward_backward_us": kernel_us(lambda: cell_keep(fused_keep), args.device),
        "max_relative_difference": _max_relative_difference(fused_keep(maps, others)[1], aten_keep(maps, others)[1])}
    return out


def _max_relative_difference(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def fused_gradients(args) -> dict[str, Any]:
    """One forward + backward of the bf16 + channels_last step with aten's operations and with the fused kernels,
    each against the float32 step (aten's), from the same weights and batch: the kernels should be no further from
    float32 than aten's bf16 step is."""

    from bench import gpu

    def gradients(fused_kernels: bool, precision: str = "bf16") -> tuple[float, list[Any]]:
        step = gpu.Step(args.model, "DivDR-A", (args.crop, args.crop), args.batch, args.device, precision=precision,
                        channels_last=precision != "fp32", fused_kernels=fused_kernels)
        result = gpu.gradients_after_one_step(step)
        del step
        return result

    (loss_ref, ref), (loss_aten, aten), (_, aten_again), (loss_fused, kernels) = (
        gradients(False, "fp32"), gradients(False), gradients(False), gradients(True))
    difference = gpu.gradient_difference  # the norm of the difference over the reference's norm

    # bf16 against float32 can differ by more than the gradients' norm where BatchNorm sees few values (a small
    # net on a small crop); the bf16 steps against each other (aten's up-sampling backward adds with atomics, so
    # two aten steps differ too) are the comparison that counts
    return {"loss_fp32": loss_ref, "loss_bf16_aten": loss_aten, "loss_bf16_fused": loss_fused,
            "gradient_error_bf16_aten": difference(aten, ref), "gradient_error_bf16_fused": difference(kernels, ref),
            "gradient_difference_aten_vs_aten": difference(aten_again, aten),
            "gradient_difference_fused_vs_aten": difference(kernels, aten)}


def section_fused(args, deadline: float) -> dict[str, Any]:
    """train.fused_kernels: gradients against float32, then each step off / on in interleaved rounds."""
    from bench import gpu

    try:
        out: dict[str, Any] = {"gradients": fused_gradients(args)}
    except Exception as error:
        out = {"gradients": gpu._failure(error)}
    print(f"  gradients: {out['gradients']}", flush=True)
    pairs = {"library": lambda on: library_step_ms(args, fused_kernels=on),
             "library_streams": lambda on: library_step_ms(args, fused_kernels=on, scale_streams=True),
             "pipeline": lambda on: trainer_step_ms(args, f"train.fused_kernels={str(on).lower()}"),
             "pipeline_streams": lambda on: trainer_step_ms(args, "train.scale_streams=true",
                                                             f"train.fused_kernels={str(on).lower()}")}
    for name, measure in pairs.items():
        if time.perf_counter() > deadline:
            out[name] = {"skipped": "time budget spent"}
            continue
        try:
            rows = interleaved({"off_ms": lambda m=measure: m(False), "on_ms": lambda m=measure: m(True)},
                               args.rounds)
            out[name] = {**{k: median(v) for k, v in rows.items()}, "rounds": rows}
        except Exception as error:
            out[name] = gpu._failure(error)
        print(f"  {name}: {out[name]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--rounds", type=int, default=2, help="interleaved before/after rounds per change")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget", type=float, default=280.0, help="seconds; changes past it are skipped")
    p.add_argument("--model", default="layer16")
    p.add_argument("--crop", type=int, default=768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sections", nargs="+", default=["fused", "changes"], choices=["fused", "changes"],
                   help="besides the micro-benchmarks: train.fused_kernels off / on, the changes before / after")
    args = p.parse_args(argv)
    started = time.perf_counter()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu":
        cap_threads(args.threads)
    if args.tiny:
        args.model, args.crop, args.batch, args.repeats = "micro", 64, 2, 2
    args.compile_backend = "inductor"  # what bench/gpu.py's trainer rows read; nothing is compiled here
    result: dict[str, Any] = {"benchmark": "gpu_ab", "torch": torch.__version__, "device": args.device,
                              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
                              else "cpu", "model": args.model, "crop": args.crop, "batch": args.batch}
    from bench import gpu
    from divdr.fused import set_fused_kernels

    def section(name: str, measure: Callable[[], dict[str, Any]]) -> None:
        try:  # one failed section (a kernel that does not compile, say) must not lose the others
            result[name] = measure()
        except Exception as error:
            result[name] = gpu._failure(error)

    if args.device.startswith("cuda"):
        set_fused_kernels(True)  # the micro-benchmarks' fused variants
    section("upsample", lambda: section_upsample(args))
    section("per_image_product", lambda: section_per_image_product(args))
    print(f"per_image_product: {result['per_image_product']}", flush=True)
    set_fused_kernels(False)
    if "fused" in args.sections:
        section("fused", lambda: section_fused(args, started + args.budget))
    if "changes" in args.sections:
        section("changes", lambda: section_changes(args, started + args.budget))
    return finish(result, args.json, started)


if __name__ == "__main__":
    main()
