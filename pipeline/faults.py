"""Fault injection for the reliability tests: off unless asked for.

A spec like ``"kill_worker:rank=1,step=8;kill_store:step=6;nan_loss:step=5"`` (``run(faults=...)`` or
the ``DIVDR_FAULTS`` environment variable of the driver) makes the training loop fail on purpose, each
fault once per run (a marker file in the run folder remembers that it fired, so a restarted worker
group does not fail again):

- ``kill_worker:rank=R,step=S``: worker R exits abruptly at step S (a dead process, as a lost node);
- ``kill_store:step=S``: rank 0 has the store write a snapshot, then kills the actor at step S (Ray
  restarts it, and it restores that snapshot);
- ``kill_store_forever:step=S``: rank 0 kills the store at step S so that Ray cannot restart it (a
  store whose node is gone for good);
- ``nan_loss:step=S``: the loss of step S is NaN on every rank;
- ``nan_activations:step=S``: the gate activations of step S hold a NaN on rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FAULTS_ENV = "DIVDR_FAULTS"
KINDS = ("kill_worker", "kill_store", "kill_store_forever", "nan_loss", "nan_activations")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None  # None = the rank that acts on it (see the module docstring)


def parse_faults(spec: str | None) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in (spec or "").split(";"))):
        kind, _, args = item.partition(":")
        if kind not in KINDS:
            raise ValueError(f"{FAULTS_ENV}: unknown fault {kind!r} in {item!r}; known: {list(KINDS)}")
        values = dict(pair.split("=", 1) for pair in filter(None, args.split(",")))
        try:
            faults.append(Fault(kind, int(values["step"]), int(values["rank"]) if "rank" in values else None))
        except (KeyError, ValueError):
            raise ValueError(f"{FAULTS_ENV}: {item!r} needs step=N (and rank=R for kill_worker)") from None
    return faults


def faults_from_env() -> str:
    return os.environ.get(FAULTS_ENV, "")


class FaultPlan:
    """The faults of one run; ``due`` is true once per fault, on the rank it concerns."""

    def __init__(self, spec: str | None, marker_dir: Path) -> None:
        self.faults = parse_faults(spec)
        self.marker_dir = Path(marker_dir)

    def due(self, kind: str, step: int, rank: int) -> bool:
        for i, fault in enumerate(self.faults):
            if fault.kind != kind or fault.step != step:
                continue
            if fault.rank is not None and fault.rank != rank:
                continue
            marker = self.marker_dir / f".fault-{i}-{kind}-rank{rank}"
            if marker.exists():
                return False
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("fired")
            return True
        return False
