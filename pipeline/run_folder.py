"""A run's folder under ``--out``: what state it is in, who holds it, what may be deleted.

Every entry point (train, tune trials, the main job, the oracle) goes through ``prepare``: the run
name was validated as a name when the configuration was resolved, the data was checked, and only
then is anything deleted (``--fresh``) or resumed. The rules:

- a new run trains; an interrupted run (config.yaml, no result.json) resumes, but only with the
  configuration it was started with (the differences are listed otherwise);
- a finished run (result.json) is never trained again or overwritten unless asked: ``fresh``
  deletes it (its folder and its Ray Train checkpoints, nothing else) and trains from scratch,
  ``resume`` returns its stored result;
- one process per run name at a time: a lock file under ``<out>/.locks`` names its holder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml

from divdr.config import ConfigError
from pipeline.config import ExperimentConfig, flatten

Existing = Literal["continue", "resume", "fresh"]  # what to do with a run of the same name
RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"
LOCKS = ".locks"
# what a run folder holds once it has started: a folder with none of these is not deleted by --fresh
RUN_MARKERS = (CONFIG_FILE, RESULT_FILE, "mlflow_run_id", "store", "checkpoint", "artifacts")
# keys a resumed run may change: where things are and how they are tracked, not what is trained
RESUMABLE_CHANGES = ("name", "description", "data.root", "data.eval_batch_size", "tracking.uri",
                     "tracking.experiment", "storage.path", "scaling.torch_threads",
                     # how batches are loaded, never which (pipeline.train_data)
                     "data.loader_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor")


class RunState(Enum):
    NEW = "new"
    INTERRUPTED = "interrupted"
    FINISHED = "finished"


class RunFolderError(ConfigError):
    """A run folder that cannot be used as asked (finished, locked, another configuration)."""


def run_state(run_dir: Path) -> RunState:
    if (run_dir / RESULT_FILE).is_file():
        return RunState.FINISHED
    if (run_dir / CONFIG_FILE).is_file():
        return RunState.INTERRUPTED
    return RunState.NEW


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every setting that differs, except those a resume may change."""
    a, b = flatten(saved), flatten(current)
    return [f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}" for key in sorted(a.keys() | b.keys())
            if a.get(key) != b.get(key) and not key.startswith(RESUMABLE_CHANGES)]


def saved_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise RunFolderError(f"{path} is unreadable ({err}); --fresh starts the run over") from None


def check_resumable(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Refuse to resume ``run_dir`` with another configuration than the one it was started with."""
    differences = config_differences(saved_config(run_dir), cfg.to_dict())
    if differences:
        raise RunFolderError(
            f"run '{cfg.run_name}' in {run_dir} was started with another configuration; resuming it would "
            "mix the two. Differences (saved -> now):\n  " + "\n  ".join(differences)
            + "\nUse --fresh to start it over, or another --name.")


def finished_message(cfg: ExperimentConfig, run_dir: Path) -> str:
    return (f"run '{cfg.run_name}' already finished ({run_dir / RESULT_FILE}); nothing was trained or "
            "overwritten. --fresh trains it again from scratch (deleting that run), --resume prints its "
            "stored result, or choose another --name.")


def stored_result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / RESULT_FILE).read_text())


# ---- deleting a run (--fresh) ---------------------------------------------------------------------

def checkpoint_folder(cfg: ExperimentConfig, out: Path) -> str:
    """Where Ray Train keeps this run's checkpoints: ``storage.path`` (a path or URI) or ``<out>/ray_results``."""
    root = cfg.storage.path or str(out / "ray_results")
    return f"{root.rstrip('/')}/{cfg.run_name}"


def delete_run(cfg: ExperimentConfig, out: Path) -> list[str]:
    """Delete this run's folder and its Ray Train checkpoints (nothing else); the paths deleted.
    The name is a single path component (checked when the configuration was resolved), so both paths
    lie inside the run's own folders; a folder that holds nothing a run writes is refused, not deleted."""
    run_dir = out / cfg.run_name
    deleted = []
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise RunFolderError(f"{run_dir} is not a run folder (a link or a file); not deleting it")
    if run_dir.is_dir():
        if any(run_dir.iterdir()) and not any((run_dir / marker).exists() for marker in RUN_MARKERS):
            raise RunFolderError(f"{run_dir} holds files but none a run writes ({', '.join(RUN_MARKERS)}); "
                                 "not deleting it: choose another --name or --out")
        shutil.rmtree(run_dir)
        deleted.append(str(run_dir))
    deleted += _delete_uri_folder(checkpoint_folder(cfg, out))
    return deleted


def _delete_uri_folder(uri: str) -> list[str]:
    """Delete a folder given as a local path or a URI (s3://, gs://, file://) through pyarrow."""
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return []
    filesystem.delete_dir(path)
    return [uri]


# ---- one process per run ------------------------------------------------------------------------

def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(out: Path, run_name: str) -> Iterator[Path]:
    """Hold ``<out>/.locks/<run name>.lock`` while the run is prepared and trained. A lock left by a
    process that is gone (same host) is taken over; one held elsewhere is refused with its holder."""
    path = out / LOCKS / f"{run_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
                path.unlink(missing_ok=True)  # its process is gone (killed): the lock is stale
                continue
            raise RunFolderError(
                f"run '{run_name}' is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"since {holder.get('since', '?')} (lock {path}); wait for it to finish, or delete the lock "
                "if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            json.dump(_holder(), f)
        break
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
