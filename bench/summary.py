"""Print the Markdown tables of docs/benchmarks.md from the JSON files the benchmarks wrote.

    python bench/summary.py [bench/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import table


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ratio(r: dict[str, Any]) -> str:
    totals = r.get("ratio_of_totals", float("nan"))
    return f"{r['median']:.3f} (rounds {r['rounds']}: {r['min']:.2f}-{r['max']:.2f}; totals {totals:.3f})"


def main(argv: list[str] | None = None) -> None:
    folder = Path((argv or sys.argv[1:] or ["bench/results"])[0])
    st = _load(folder, "step_time")
    if st:
        print("## step time\n")
        for name, v in st["step_seconds"].items():
            print(f"- {name}: median block mean {v['median'] * 1e3:.1f} ms/step")
        for key in ("divdr_over_dr", "divdr_over_dr_serial_kmeans", "streaming_overhead", "divdr_over_dr_store"):
            print(f"- {key}: {_ratio(st[key])}")
        print(f"- K-means seconds: {st['kmeans_seconds']}\n")
    rp = _load(folder, "ray_vs_plain")
    if rp:
        print("## Ray vs plain\n")
        for name, v in rp["images_per_s"].items():
            print(f"- {name}: {v['median']:.1f} images/s (runs {[round(x, 1) for x in v['runs']]})")
        for key in ("ray_over_plain", "ray_over_perfect_scaling"):
            if key in rp:
                print(f"- {key}: {_ratio(rp[key])}")
        print(f"- fit() seconds {[round(x, 1) for x in rp['ray_fit_seconds']]}, "
              f"worker peak RSS {[round(x) for x in rp['ray_worker_peak_rss_mib']]} MiB\n")
    for name in ("kmeans", "kmeans_passive"):
        km = _load(folder, name)
        if km:
            print(f"## {name} (threads {km['threads']}, OMP_WAIT_POLICY {km.get('omp_wait_policy')})\n")
            print(table(km["rows"], ["N", "D", "K", "faiss_s", "sklearn_s", "speedup", "objective_gap"],
                        {"faiss_s": ".3f", "sklearn_s": ".3f", "speedup": ".2f", "objective_gap": "+.2%"}) + "\n")
    il = _load(folder, "inference_latency")
    if il:
        b = il["batch"]
        print(f"## inference ({il['model_size']} {il['size']}, threads {il['threads']})\n")
        cols = ["network", "gflops", "flops_ratio", "ms_b1", "latency_ratio_b1", "tracking_b1", f"ms_b{b}",
                f"latency_ratio_b{b}", f"tracking_b{b}"]
        print(table(il["rows"], cols, {"gflops": ".4f", "flops_ratio": ".3f", "ms_b1": ".2f", "latency_ratio_b1": ".3f",
                                       "tracking_b1": "+.1%", f"ms_b{b}": ".2f", f"latency_ratio_b{b}": ".3f",
                                       f"tracking_b{b}": "+.1%"}))
        print(f"\nworst tracking: {il['worst_tracking']}")
        for key, shares in il.get("time_by_op_kind", {}).items():
            print(f"- {key}: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
        print()
    mem = _load(folder, "memory")
    if mem:
        print("## memory\n")
        print(table(mem["store"], ["N", "D", "dtype", "buffer_mib", "held_mib", "peak_mib", "peak_over_imports_mib",
                                   "update_s"],
                    {"buffer_mib": ".1f", "held_mib": ".1f", "peak_mib": ".0f", "peak_over_imports_mib": ".0f",
                     "update_s": ".2f"}) + "\n")
        print(table(mem["worker"], ["model_size", "preset", "parameters_m", "after_imports_mib", "peak_mib",
                                    "peak_over_imports_mib"],
                    {"parameters_m": ".2f", "after_imports_mib": ".0f", "peak_mib": ".0f",
                     "peak_over_imports_mib": ".0f"}) + "\n")
    ld = _load(folder, "loader")
    if ld:
        print(f"## data loading (device {ld['device']}, threads {ld['threads']}, rounds {ld['rounds']})\n")
        print(table(ld["rows"], ["setting", "variant", "images_per_s", "min", "max", "over_cpu_step", "over_h200_now",
                                 "over_h200_target", "first_batch_s"],
                    {"images_per_s": ".1f", "min": ".1f", "max": ".1f", "over_cpu_step": ".1f", "over_h200_now": ".2f",
                     "over_h200_target": ".3f", "first_batch_s": ".2f"}) + "\n")
        for name, setting in ld["settings"].items():
            stages = ", ".join(f"{k} {v:.1f}" for k, v in setting["stages_ms"].items())
            print(f"- {name}: ms per image: {stages}; cores for the H200 today {setting['cores_for_h200_now']:.1f}, "
                  f"for {ld['gpu_target_factor']}x {setting['cores_for_h200_target']:.1f}")
        print()
    for name in sorted(p.stem for p in folder.glob("store_scale*.json")):
        ss = _load(folder, name)
        print(f"## {name} (N {ss['n']}, D {ss['dim']}, {ss['workers']} workers x {ss['images']} every "
              f"{ss['step_time']} s, switch_lag {ss['switch_lag']})\n")
        print("- in process:", {k: round(v, 4) if isinstance(v, float) else v for k, v in ss["in_process"].items()})
        print("- flood:", {k: round(v, 4) if isinstance(v, float) else v for k, v in ss["flood"].items()})
        paced = {k: v for k, v in ss["paced"].items() if k != "senders"}
        print("- paced:", json.dumps(paced, default=str))
        print(table(ss["limits"], ["step_time", "workers_at_full_busy", "busy_at_64_workers", "update_fits_switch_lag",
                                   "min_switch_lag"], {"workers_at_full_busy": ".0f", "busy_at_64_workers": ".1%"})
              + "\n")


if __name__ == "__main__":
    main()
