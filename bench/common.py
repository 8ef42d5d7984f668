"""Shared pieces of the benchmarks: thread caps, machine description, interleaved repeats, JSON.

These machines are shared and noisy, so every headline figure is a ratio of two things measured
side by side in one run: the variants run in interleaved blocks (A B C, then B C A, ...), and the
figure is the median over the repeats of the per-round ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))


def cap_threads(n: int) -> None:
    """Cap every thread pool we use (torch intra-op, OpenMP/FAISS, BLAS) at ``n`` threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU (lscpu), memory, library versions, load."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Hypervisor vendor"):
            if key in fields:
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = fields[key].strip()
    except OSError:  # pragma: no cover
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):  # pragma: no cover
        pass
    info["load_average_at_start"] = list(os.getloadavg())
    versions = {}
    for name in ("torch", "ray", "faiss", "numpy", "sklearn"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    info["versions"] = versions
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, rotating the order every round (A B C, B C A, C A B, ...)
    so slow drifts of a shared machine fall on every variant alike. Returns each variant's figures."""
    names = list(variants)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            out[name].append(float(variants[name]()))
    return out


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round ratios a[i] / b[i] (the two were measured in the same round)."""
    return [x / y for x, y in zip(a, b, strict=True)]


def ratio_summary(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Median of per-round ratios (the headline: robust to a noisy round), their spread (min, max),
    the ratio of medians and the ratio of totals (which keeps rare costs, e.g. a K-means wait)."""
    ratios = paired_ratios(a, b)
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios),
            "ratio_of_medians": median(a) / median(b), "ratio_of_totals": sum(a) / sum(b)}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, help="write the figures as JSON to this file")
    p.add_argument("--tiny", action="store_true", help="seconds-long run that only checks the script works")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process (default 1)")
    return p


def finish(result: dict[str, Any], path: Path | None, started: float) -> dict[str, Any]:
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    result.setdefault("machine", machine())
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=_plain))
        print(f"figures written to {path}")
    return result


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def table(rows: list[dict[str, Any]], columns: Sequence[str], fmt: dict[str, str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts) over ``columns``."""
    fmt = fmt or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(format(v, fmt[c]) if c in fmt and isinstance(v, (int, float)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
