"""Step and inference time of this checkout against another one, side by side (e.g. before a change).

    git worktree add /tmp/before 655fe79
    python bench/compare_trees.py --before /tmp/before --json bench/results/compare_trees.json

Each measurement is a fresh process (``--measure``) importing one tree's ``divdr``: the training step
(forward, cross-entropy, budget and eq. 2, backward, SGD) or an eval-mode forward with every path open
(``open``) or every cell dropped (``floor``: each gate runs, then its weights are multiplied by 0). The two
trees alternate within each round and the order flips every round; the figure is the median over rounds of
the per-round ratio now / before. Only the library API both trees share is used.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import finish, parser

REPO = Path(__file__).resolve().parent.parent
CASES = {  # name: (mode, model, height, width, batch, timed runs)
    "train_small_128x256_b8": ("train", "small", 128, 256, 8, 10),
    "train_layer16_128x128_b2": ("train", "layer16", 128, 128, 2, 5),
    "open_layer16_512x1024_b1": ("open", "layer16", 512, 1024, 1, 5),
    "floor_layer16_512x1024_b1": ("floor", "layer16", 512, 1024, 1, 5),
}
TINY_CASES = {"train_micro_64x64_b2": ("train", "micro", 64, 64, 2, 2),
              "floor_micro_64x64_b1": ("floor", "micro", 64, 64, 1, 2)}


def measure(root: str, mode: str, model: str, height: int, width: int, batch: int, runs: int) -> float:
    """Median seconds of one step (``train``) or forward (``open`` / ``floor``) with ``root``'s divdr."""
    sys.path.insert(0, root)
    import torch

    from divdr.config import BudgetConfig, ClusteringConfig, get_model_config
    from divdr.flops import budget_ratio, cost_table
    from divdr.heads import DynamicRoutingSegmenter
    from divdr.losses import total_loss

    torch.set_num_threads(1)
    config = get_model_config(model, num_classes=19)
    torch.manual_seed(0)
    net = DynamicRoutingSegmenter(config)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=g)
    labels = torch.randint(0, 19, (batch, height, width), generator=g)
    centres = torch.rand(3, config.a_dim, generator=g)
    table = cost_table(config, height, width)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    class Closed(torch.nn.Module):  # the gate runs; its weights are multiplied by 0 (the cell is dropped)
        def __init__(self, gate: torch.nn.Module) -> None:
            super().__init__()
            self.gate = gate

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(x) * 0.0

    if mode == "floor":
        for cell in net.backbone.cells:
            cell.gate = Closed(cell.gate)

    def step() -> None:
        out = net(images)
        task = torch.nn.functional.cross_entropy(out.logits, labels)
        terms = total_loss(task, cost_ratio=budget_ratio(out.backbone.gates, table), progress=0.5,
                           budget=BudgetConfig(weight=1.0, mu=0.3),
                           clustering=ClusteringConfig(weight=0.5, k=3, alpha=1.0),
                           activations=out.backbone.activations, centres=centres, sigma2=0.1)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()

    def forward() -> None:
        with torch.no_grad():
            net(images)

    fn = step if mode == "train" else forward
    net.train(mode == "train")
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _subprocess(root: Path, case: tuple) -> float:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", str(root), *map(str, case)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="the other checkout (a folder holding divdr/)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--measure", nargs=7, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.measure:
        root, mode, model, *numbers = args.measure
        print(measure(root, mode, model, *map(int, numbers)))
        return {}
    started = time.perf_counter()
    if args.before is None or not (args.before / "divdr").is_dir():
        p.error(f"--before must be a checkout holding divdr/, got {args.before}")
    cases = TINY_CASES if args.tiny else CASES
    rounds = 1 if args.tiny else args.rounds
    result: dict[str, Any] = {"benchmark": "compare_trees", "before": str(args.before), "now": str(REPO),
                              "cases": {}}
    for name, case in cases.items():
        rows = []
        for r in range(rounds):
            order = [args.before, REPO] if r % 2 == 0 else [REPO, args.before]
            seconds = {str(root): _subprocess(root, case) for root in order}
            rows.append({"before_s": seconds[str(args.before)], "now_s": seconds[str(REPO)],
                         "ratio": seconds[str(REPO)] / seconds[str(args.before)]})
            print(f"{name} round {r + 1}: before {rows[-1]['before_s']:.3f} s, now {rows[-1]['now_s']:.3f} s, "
                  f"now / before {rows[-1]['ratio']:.3f}", flush=True)
        result["cases"][name] = {"rounds": rows, "median_ratio": statistics.median(r["ratio"] for r in rows)}
    return finish(result, args.json, started)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
