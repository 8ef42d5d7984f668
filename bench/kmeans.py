"""K-means over gate activations: FAISS (the store's ``divdr.clustering.kmeans``, all points) against
scikit-learn's ``KMeans``, same data, same iteration cap, same thread cap: time and objective reached.

    python bench/kmeans.py --json bench/results/kmeans.json

Data: realistic gate activations, i.e. values of max(0, tanh) in [0, 1): a few route patterns
(each gate mostly open or mostly closed) plus noise, clipped, with exact zeros where a gate is shut.
The objective (sum of squared distances of every point to its nearest centre) is recomputed in
float64 on all points for both, with the same function.
"""

from __future__ import annotations

import os
import time
from typing import Any

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import cap_threads, finish, interleaved, median, parser, table

ROUTE_PATTERNS = 6  # distinct routes the synthetic activations are drawn around
NOISE = 0.15


def gate_activations(n: int, d: int, seed: int = 0) -> np.ndarray:
    """[n, d] float32 in [0, 1): routes (gates open ~0.9 / shut 0) plus noise, exact zeros kept."""
    rng = np.random.default_rng(seed)
    patterns = np.where(rng.random((ROUTE_PATTERNS, d)) < 0.5, 0.9, -0.3)
    x = patterns[rng.integers(0, ROUTE_PATTERNS, n)] + NOISE * rng.standard_normal((n, d))
    return np.clip(x, 0.0, 0.999).astype(np.float32)


def objective(x: np.ndarray, centres: np.ndarray) -> float:
    from divdr import clustering

    a = clustering.assign(x, centres)
    return float(clustering._own_sq_distances(x, np.asarray(centres, np.float32), a).sum())


def run_faiss(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, float]:
    from divdr import clustering

    t = time.perf_counter()
    result = clustering.kmeans(x, k, niter=niter, seed=seed)
    return time.perf_counter() - t, objective(x, result.centres)


def run_sklearn(x: np.ndarray, k: int, niter: int, seed: int, threads: int) -> tuple[float, float]:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        t = time.perf_counter()
        model = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=niter, algorithm="lloyd",
                       random_state=seed).fit(x)
        seconds = time.perf_counter() - t
    return seconds, objective(x, model.cluster_centers_.astype(np.float32))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[3000, 30000, 118000])
    p.add_argument("--d", type=int, nargs="+", default=[183, 198])
    p.add_argument("--k", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--niter", type=int, default=20, help="iteration cap for both (the store's default: 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "default"], default="default",
                   help="OMP_WAIT_POLICY for both libraries' OpenMP threads (read when OpenMP loads: "
                        "only effective if FAISS and scikit-learn are not imported yet)")
    p.set_defaults(threads=2)
    args = p.parse_args(argv)
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    if args.tiny:
        args.n, args.d, args.k, args.repeats = [300], [16], [2], 1
    started = time.perf_counter()
    cap_threads(args.threads)
    rows = []
    for n in args.n:
        for d in args.d:
            x = gate_activations(n, d, seed=n + d)
            for k in args.k:
                objectives: dict[str, list[float]] = {"faiss": [], "sklearn": []}
                seeds = iter(range(10_000))

                def timed(name: str, fn, seeds=seeds, objectives=objectives):
                    def call() -> float:
                        seconds, obj = fn(next(seeds))
                        objectives[name].append(obj)
                        return seconds
                    return call

                times = interleaved({
                    "faiss": timed("faiss", lambda s, x=x, k=k: run_faiss(x, k, args.niter, s)),
                    "sklearn": timed("sklearn", lambda s, x=x, k=k: run_sklearn(x, k, args.niter, s, args.threads)),
                }, args.repeats)
                row = {"N": n, "D": d, "K": k,
                       "faiss_s": median(times["faiss"]), "sklearn_s": median(times["sklearn"]),
                       "speedup": median([b / a for a, b in zip(times["faiss"], times["sklearn"], strict=True)]),
                       "faiss_objective": median(objectives["faiss"]),
                       "sklearn_objective": median(objectives["sklearn"])}
                row["objective_gap"] = row["faiss_objective"] / row["sklearn_objective"] - 1
                rows.append(row)
                print(f"N={n} D={d} K={k}: faiss {row['faiss_s']:.3f}s sklearn {row['sklearn_s']:.3f}s "
                      f"(x{row['speedup']:.1f}), objective gap {row['objective_gap']:+.2e}", flush=True)
    print(table(rows, ["N", "D", "K", "faiss_s", "sklearn_s", "speedup", "faiss_objective", "sklearn_objective",
                       "objective_gap"],
                {"faiss_s": ".3f", "sklearn_s": ".3f", "speedup": ".1f", "faiss_objective": ".6g",
                 "sklearn_objective": ".6g", "objective_gap": "+.2e"}))
    result = {"benchmark": "kmeans", "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "niter": args.niter, "repeats": args.repeats,
              "rows": rows}
    return finish(result, args.json, started)


if __name__ == "__main__":
    main()
