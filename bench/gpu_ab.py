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


def library_step_ms(args) -> float:
    """Milliseconds of the library's captured step (launched on a CPU), built afresh."""
    import torch

    from bench import gpu

    step = gpu.Step(args.model, "DivDR-A", (args.crop, args.crop), args.batch, args.device, precision="bf16",
                    channels_last=True)
    run = gpu.graphed_step(step) if args.device.startswith("cuda") else step
    seconds = gpu.timed(run, args.device, args.repeats)
    del step, run
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 1000 * seconds


def trainer_step_ms(args) -> float:
    from bench import gpu

    return gpu._trainer_row(args, gpu.fastest_trainer_settings(args))["step_ms"]


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

    def resize(x, factor):
        return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)

    def nchw(x, factor):
        return resize(x.contiguous(), factor).contiguous(memory_format=torch.channels_last)

    variants = {"interpolate": resize, "interpolate_float32": lambda x, f: resize(x.float(), f).to(x.dtype),
                "interpolate_nchw": nchw}
    # the up paths' inputs (scales 1-3: C x (crop/8)^2 .. 4C x (crop/32)^2; Layer16 at 768: 64 x 96^2 .. 256 x 24^2)
    c, size = _channels(args), args.crop // 8
    shapes = [((args.batch, c * 2**k, size // 2**k, size // 2**k), 2, torch.bfloat16) for k in range(3)]
    shapes.append(((args.batch, 19, 2 * size, 2 * size), 4, torch.float32))  # the logits at 1/4
    out: dict[str, Any] = {}
    for shape, factor, dtype in shapes:
        x = torch.randn(shape, device=args.device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        grad = torch.randn_like(resize(x.detach(), factor))
        row = {}
        for name, fn in variants.items():
            def forward(fn=fn, x=x, factor=factor):
                return fn(x.detach(), factor)

            def both(fn=fn, x=x, factor=factor, grad=grad):
                return torch.autograd.grad(fn(x, factor), x, grad)

            row[name] = {"forward_us": kernel_us(forward, args.device),
                         "forward_backward_us": kernel_us(both, args.device)}
        out[f"{'x'.join(map(str, shape))}_x{factor}_{str(dtype).removeprefix('torch.')}"] = row
        print(f"  {shape} x{factor}: {row}", flush=True)
    return out


def section_per_image_product(args) -> dict[str, Any]:
    import torch

    c, size = _channels(args), args.crop // 4  # a map at 1/4, the finest scale
    maps = torch.randn(args.batch, c, size, size, device=args.device, dtype=torch.bfloat16)
    maps = maps.contiguous(memory_format=torch.channels_last)
    weights = torch.rand(args.batch, 1, 1, 1, device=args.device, dtype=torch.bfloat16)
    return {"per_image_weight_times_map_us": kernel_us(lambda: weights * maps, args.device),
            "map_plus_map_us": kernel_us(lambda: maps + maps, args.device)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--rounds", type=int, default=2, help="interleaved before/after rounds per change")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget", type=float, default=280.0, help="seconds; changes past it are skipped")
    p.add_argument("--model", default="layer16")
    p.add_argument("--crop", type=int, default=768)
    p.add_argument("--batch", type=int, default=8)
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
    result["upsample"] = section_upsample(args)
    result["per_image_product"] = section_per_image_product(args)
    print(f"per_image_product: {result['per_image_product']}", flush=True)
    result["changes"] = section_changes(args, started + args.budget)
    return finish(result, args.json, started)


if __name__ == "__main__":
    main()
