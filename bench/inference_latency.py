"""Inference: measured latency per image against real GFLOPs for the same network at several
budgets. Does removing FLOPs remove time?

    python bench/inference_latency.py --json bench/results/inference_latency.json \
        [--checkpoint DR-A=runs/ray_results/main-DR-A/checkpoint_.../state.pt ...]

Budgets: the network with gates forced closed at random rates (each path of each cell closed with
probability r, independently per image, the same mask at every batch size) from r = 0 (every path
open: the net at initialisation, gates ~tanh(1.5)) to r = 1 (every cell dropped: only the stem, the
gates and the decoder run), plus any trained checkpoints given (their own gates). Latency is measured
at batch 1 and at a batch (per image = batch time / batch size), eval mode (paths really skipped),
``--threads`` torch threads; configurations are interleaved and each figure is a median over repeats.

Tracking: for every budget, latency ratio (to r = 0) against FLOPs ratio (to r = 0); the target is
|latency ratio / FLOPs ratio - 1| <= 15%. The routing part alone (minus the r = 1 floor, in time and
FLOPs) shows whether the gap is in the routed cells or in what every image pays.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cap_threads, finish, median, parser, table

TRACKING_TARGET = 0.15
# Where the time goes (torch.profiler self CPU time), grouped: what FLOPs count and what they do not.
OP_GROUPS = {
    "convolution": ("conv", "mkldnn", "addmm", "mm"),
    "bilinear interpolation (not counted in FLOPs)": ("upsample", "interpolate", "grid_sampler"),
    "batch norm": ("batch_norm",),
    "gather/scatter/copies (skipping)": ("index", "copy_", "clone", "where", "nonzero", "cat", "stack", "scatter",
                                         "zeros", "fill_", "masked"),
    "element-wise (ReLU, weights, sums, pooling)": ("relu", "clamp", "mul", "add", "sum", "tanh", "mean", "div",
                                                    "sub", "pool", "pad"),
    "tensor bookkeeping (empty, views, ...)": ("empty", "view", "as_strided", "reshape", "slice", "select",
                                               "expand", "unsqueeze", "squeeze", "resolve", "detach", "item",
                                               "to", "contiguous", "_local_scalar"),
}


class ForcedClosure:
    """Forward hooks that close each path of each cell with probability ``rate``, per image; the
    mask is drawn once per image (``set_images`` names the images of the next forward)."""

    def __init__(self, net: Any, rate: float, num_images: int, seed: int = 0) -> None:
        import torch

        cells = net.backbone.cells
        g = torch.Generator().manual_seed(seed)
        # 3 path slots, plus a fast-forward weight where the gate has one (Gumbel gates)
        self.mask = (torch.rand(num_images, len(cells), 4, generator=g) >= rate).float()
        self.ids = torch.arange(1)
        self.handles = [cell.gate.register_forward_hook(self._hook(i)) for i, cell in enumerate(cells)]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            return output * self.mask[self.ids, index, : output.shape[1]]
        return hook

    def set_images(self, ids: Any) -> None:
        self.ids = ids

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def load_images(count: int, height: int, width: int, tiny: bool):
    import torch

    if tiny:
        return torch.randn(count, 3, height, width, generator=torch.Generator().manual_seed(0))
    from divdr.data.cityscapes import CityscapesSegmentation
    from divdr.data.synthetic import ensure_default_dataset

    val = CityscapesSegmentation(ensure_default_dataset(), "val")
    images = torch.stack([val[i]["image"] for i in range(min(count, len(val)))])
    if tuple(images.shape[-2:]) != (height, width):
        images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="the batched measurement (besides batch 1)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--before", action="store_true",
                   help="also time every network with the skipping as it was before the fix (side by side)")
    p.add_argument("--dense", type=float, nargs="*", default=[],
                   help="also time every network with divdr.cells.set_dense_fraction(F) (side by side)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a trained network (state.pt of a pipeline checkpoint, its config.yaml beside the run)")
    args = p.parse_args(argv)
    if args.tiny:
        args.model_size, args.height, args.width, args.images, args.batch = "micro", 64, 64, 4, 2
        args.rates, args.repeats, args.before, args.dense = [0.0, 0.5, 1.0], 1, True, [0.5]
    started = time.perf_counter()
    cap_threads(args.threads)
    import torch

    from divdr.config import get_model_config
    from divdr.flops import cost_table, real_cost
    from divdr.heads import DynamicRoutingSegmenter

    images = load_images(args.images, args.height, args.width, args.tiny)
    n = images.shape[0]
    torch.manual_seed(0)
    base = DynamicRoutingSegmenter(get_model_config(args.model_size)).eval()
    nets: dict[str, tuple[Any, Any]] = {}
    for rate in args.rates:
        nets[f"closed {rate:.2f}"] = (base, rate)
    for spec in args.checkpoint:
        name, path = spec.split("=", 1)
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]  # a training checkpoint: tensors only
        net = DynamicRoutingSegmenter(get_model_config(args.model_size)).eval()
        net.load_state_dict(state)
        nets[name] = (net, None)
    variants = (["before"] if args.before else []) + [f"dense {f:g}" for f in args.dense]
    nets.update({f"{name} [{v}]": spec for v in variants for name, spec in list(nets.items())})
    table_ = cost_table(base.config, args.height, args.width)

    from bench.reference_skipping import skipping_before
    from divdr.cells import STRICT_PER_IMAGE, set_dense_fraction

    @contextlib.contextmanager
    def variant(name: str, net: Any):
        tag = name.rsplit("[", 1)[-1].rstrip("]") if name.endswith("]") else ""
        if tag == "before":
            with skipping_before():
                yield
        elif tag.startswith("dense "):
            set_dense_fraction(net, float(tag.split()[1]))
            try:
                yield
            finally:
                set_dense_fraction(net, STRICT_PER_IMAGE)
        else:
            yield

    def forward_all(name: str, batch: int) -> tuple[float, Any]:
        net, rate = nets[name]
        hooks = ForcedClosure(net, rate, n) if rate is not None else None
        gates = []
        try:
            with torch.inference_mode(), variant(name, net):
                t = time.perf_counter()
                for start in range(0, n, batch):
                    ids = torch.arange(start, min(n, start + batch))
                    if hooks is not None:
                        hooks.set_images(ids)
                    gates.append(net(images[ids]).backbone.gates)
                seconds = time.perf_counter() - t
        finally:
            if hooks is not None:
                hooks.remove()
        return seconds / n, torch.cat(gates)

    gflops = {}
    for name in nets:  # warm-up, and the routes' real FLOPs
        _, gates = forward_all(name, args.batch)
        gflops[name] = float(real_cost(gates, table_).mean()) / 1e9
    latency: dict[tuple[str, int], list[float]] = {(name, b): [] for name in nets for b in (1, args.batch)}
    keys = list(latency)
    for r in range(args.repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            latency[key].append(forward_all(*key)[0])
    rows = []
    for name in nets:
        tag = " [" + name.rsplit("[", 1)[-1] if name.endswith("]") else ""
        reference = f"closed {args.rates[0]:.2f}{tag}"
        floor = f"closed {max(args.rates):.2f}{tag}" if max(args.rates) == 1.0 else None
        row: dict[str, Any] = {"network": name, "gflops": gflops[name],
                               "flops_ratio": gflops[name] / gflops[reference]}
        for b in (1, args.batch):
            lat = median(latency[(name, b)])
            row[f"ms_b{b}"] = lat * 1e3
            row[f"latency_ratio_b{b}"] = lat / median(latency[(reference, b)])
            row[f"tracking_b{b}"] = row[f"latency_ratio_b{b}"] / row["flops_ratio"] - 1
            if floor is not None and name != floor:
                dt = lat - median(latency[(floor, b)])
                dt0 = median(latency[(reference, b)]) - median(latency[(floor, b)])
                df = (gflops[name] - gflops[floor]) / (gflops[reference] - gflops[floor])
                row[f"routing_latency_ratio_b{b}"] = dt / dt0
                row["routing_flops_ratio"] = df
        rows.append(row)
    b = args.batch
    print(table(rows, ["network", "gflops", "flops_ratio", "ms_b1", "latency_ratio_b1", "tracking_b1", f"ms_b{b}",
                       f"latency_ratio_b{b}", f"tracking_b{b}"],
                {"gflops": ".4f", "flops_ratio": ".3f", "ms_b1": ".2f", "latency_ratio_b1": ".3f",
                 "tracking_b1": "+.1%",
                 f"ms_b{b}": ".2f", f"latency_ratio_b{b}": ".3f", f"tracking_b{b}": "+.1%"}))
    current = [r for r in rows if not r["network"].endswith("]")]
    worst = {bs: max(abs(r[f"tracking_b{bs}"]) for r in current) for bs in (1, b)}
    breakdown = {}
    for name in [f"closed {args.rates[0]:.2f}", f"closed {max(args.rates):.2f}"]:
        for bs in (1, b):
            breakdown[f"{name} b{bs}"] = _profile(lambda name=name, bs=bs: forward_all(name, bs))
    print("share of self CPU time by kind of op:")
    for key, shares in breakdown.items():
        print(f"  {key}: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    for v in variants:
        worst[f"{v} b{b}"] = max(abs(r[f"tracking_b{b}"]) for r in rows if r["network"].endswith(f"[{v}]"))
    if args.before:
        for r in current:
            old = next(o for o in rows if o["network"] == r["network"] + " [before]")
            for bs in (1, b):
                r[f"speedup_vs_before_b{bs}"] = old[f"ms_b{bs}"] / r[f"ms_b{bs}"]
    print("worst |latency ratio / FLOPs ratio - 1|: " + ", ".join(
        f"{k if isinstance(k, str) else f'batch {k}'} {v:.1%}" for k, v in worst.items()) +
        f" (target {TRACKING_TARGET:.0%})")
    result = {"benchmark": "inference_latency", "model_size": args.model_size, "size": [args.height, args.width],
              "images": n, "batch": b, "threads": args.threads, "repeats": args.repeats, "rows": rows,
              "worst_tracking": {(f"b{k}" if isinstance(k, int) else k): v for k, v in worst.items()},
              "target": TRACKING_TARGET,
              "gflops_all_open_no_gates": table_.all_open / 1e9, "gflops_fixed": table_.fixed / 1e9,
              "checkpoints": args.checkpoint, "time_by_op_kind": breakdown}
    return finish(result, args.json, started)


def _profile(run: Any) -> dict[str, float]:
    import torch.profiler

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        group = next((g for g, keys in OP_GROUPS.items() if any(k in event.key for k in keys)), "other")
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {g: v / whole for g, v in sorted(totals.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    main()
