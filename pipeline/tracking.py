"""MLflow tracking: a local SQLite store under the run folder by default, a server with --tracking-uri.

Tracking never stops training: if the server cannot be reached, the logger warns once and
appends the metrics to a local JSONL file beside the checkpoints, so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.config import redact_uri

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id"
PROGRESS_FILE = "metrics.jsonl"  # every metric the tracker logs, also kept in the run folder (Tune follows it)
FALLBACK_FILE = "metrics_fallback.jsonl"
MAX_PARAM_LENGTH = 500  # MLflow's limit on a param value


def finite(values: dict[str, Any]) -> dict[str, float]:
    """The values MLflow can hold: numbers, finite."""
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def mask_secret(text: str, uri: str) -> str:
    """``text`` with the password of ``uri`` (if any) masked: error messages may quote the URL."""
    from urllib.parse import urlsplit

    secret = urlsplit(uri).password
    return text.replace(secret, "***") if secret else text


def local_tracking_uri(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'mlflow.db').resolve()}"


# MLflow 3's UI has one switch for every experiment, GenAI (its default) or model training; this link
# parameter sets it (the experiment tag above is what versions that infer the view read)
TRAINING_VIEW = "?workflowType=machine_learning"


def ui_command(uri: str, experiment_id: str = "") -> str:
    """How to look at the runs of ``uri``: the MLflow UI on a local store, or the server itself, opened on
    the experiment in the model-training view."""
    import sys

    page = f"#/experiments/{experiment_id}{TRAINING_VIEW}" if experiment_id else TRAINING_VIEW
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    mlflow = Path(sys.executable).parent / "mlflow"
    return f"{mlflow} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open http://127.0.0.1:5000/{page}"


def experiment_of(uri: str, run_id: str) -> str:
    """The experiment id of ``run_id`` ("" when tracking is offline or unreachable)."""
    if run_id.startswith(OFFLINE_PREFIX):
        return ""
    try:
        return MlflowClient(uri).get_run(run_id).info.experiment_id
    except Exception:  # only for the printed link: tracking never stops a run
        return ""


def artifact_root(out_dir: Path) -> str:
    return (Path(out_dir) / "mlartifacts").resolve().as_uri()


# MLflow 3's UI opens an experiment in its GenAI view unless told it holds model training
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
REPO = Path(__file__).resolve().parent.parent


def get_or_create_experiment(client: MlflowClient, name: str, out_dir: Path | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = artifact_root(out_dir) if out_dir is not None else None
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    for key, value in EXPERIMENT_TAGS.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def source_tags() -> dict[str, str]:
    """The code a run was trained with: MLflow's own git tags, where the project is a git checkout
    (a ``ray job submit`` working directory is not: then none)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "divdr.git.dirty": str(bool(dirty)).lower()}


OFFLINE_PREFIX = "offline-"
# An unreachable server must cost seconds, not MLflow's default minutes of retries per call.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def _short_http_retries() -> None:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def start_or_resume_run(uri: str, experiment: str, run_name: str, run_dir: Path, out_dir: Path | None,
                        tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """The MLflow run of this training run: the one recorded in ``run_dir`` if any (a re-run of
    the same command resumes it), else a new one. If the tracking server cannot be reached, the
    user is warned and an offline id is returned: everything is then written to the run folder."""
    _short_http_retries()
    try:
        return _start_or_resume(uri, experiment, run_name, run_dir, out_dir, tags, parent_run_id)
    except Exception as err:  # tracking must never stop training
        detail = mask_secret(f"{type(err).__name__}: {err}", uri)
        warnings.warn(f"MLflow tracking at {redact_uri(uri)} is unreachable ({detail}); training goes on "
                      f"and metrics are written to {Path(run_dir) / FALLBACK_FILE}", stacklevel=2)
        return f"{OFFLINE_PREFIX}{uuid.uuid4().hex}"


def _start_or_resume(uri: str, experiment: str, run_name: str, run_dir: Path, out_dir: Path | None,
                     tags: dict[str, str] | None, parent_run_id: str | None) -> str:
    client = MlflowClient(uri)
    id_file = Path(run_dir) / RUN_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    experiment_id = get_or_create_experiment(client, experiment, out_dir)
    all_tags = {"mlflow.runName": run_name, **source_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.info.run_id)
    return run.info.run_id


class RunLogger:
    """Logs params, metrics and artifacts to one MLflow run; falls back to a local file on failure."""

    def __init__(self, uri: str, run_id: str, fallback_dir: Path) -> None:
        _short_http_retries()
        self.client = MlflowClient(uri)
        self.uri = uri
        self.run_id = run_id
        self.offline = run_id.startswith(OFFLINE_PREFIX)
        self.fallback = Path(fallback_dir) / FALLBACK_FILE
        self._warned = self.offline  # the user was warned when the run went offline

    def _online(self) -> None:
        if self.offline:
            raise ConnectionError("tracking is offline for this run")

    def _failed(self, what: str, err: Exception, record: dict[str, Any]) -> None:
        if not self._warned:
            warnings.warn(f"MLflow {what} failed ({mask_secret(str(err), self.uri)}); writing to {self.fallback} "
                          "instead", stacklevel=3)
            self._warned = True
        self.fallback.parent.mkdir(parents=True, exist_ok=True)
        with self.fallback.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        clean = finite(values)
        try:
            self._online()
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in clean.items()])
        except Exception as err:  # tracking must never stop training
            self._failed("log_metrics", err, {"step": step, "metrics": clean})

    def params(self, values: dict[str, Any]) -> None:
        params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]
        try:
            self._online()
            existing = self.client.get_run(self.run_id).data.params
            new = [p for p in params if p.key not in existing]
            for i in range(0, len(new), 100):
                self.client.log_batch(self.run_id, params=new[i : i + 100])
        except Exception as err:
            self._failed("log_params", err, {"params": {p.key: p.value for p in params}})

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        try:
            self._online()
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:
            self._failed("log_artifact", err, {"artifact": str(path)})

    def tag(self, key: str, value: str) -> None:
        try:
            self._online()
            self.client.set_tag(self.run_id, key, value)
        except Exception as err:
            self._failed("set_tag", err, {"tag": {key: value}})

    def model(self, path: Path) -> None:
        """The trained network as an MLflow model (``mlflow.pytorch.load_model(uri)`` gives it back), with
        the ``divdr`` package as its code: the run page lists it under its logged models."""
        import mlflow
        import mlflow.pytorch
        import torch

        from pipeline.model_file import load_model

        try:
            self._online()
            net = load_model(path)
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                # pickle, not pt2: torch.export would trace one route, and routes are chosen per image
                mlflow.pytorch.log_model(net, name="model", serialization_format="pickle",
                                         code_paths=[str(REPO / "divdr")],
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        except Exception as err:
            self._failed("log_model", err, {"model": str(path)})

    def finish(self, status: str = "FINISHED") -> None:
        try:
            self._online()
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:
            self._failed("set_terminated", err, {"status": status})



def _per_class_metrics(folder: Path) -> dict[str, float]:
    """``final/iou/<class>`` from the run's per-class IoU (segmentation runs)."""
    path = folder / "per_class_iou.json"
    if not path.exists():
        return {}
    return {f"final/iou/{name}": float(value) for name, value in json.loads(path.read_text()).items()
            if value is not None and math.isfinite(float(value))}


def _scalar_metrics(values: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class Tracker:
    """What training workers talk to: rank 0 sends metrics and the final artifacts here.

    Run as a Ray actor on the driver's node (``pipeline.train``), so a local store under the run
    folder works on a multi-node cluster too; artifacts arrive as bytes.
    """

    def __init__(self, uri: str, run_id: str, run_dir: str) -> None:
        self.run_dir = Path(run_dir)
        self.logger = RunLogger(uri, run_id, self.run_dir)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.logger.metrics(values, step)
        clean = finite(values)
        with (self.run_dir / PROGRESS_FILE).open("a") as f:
            f.write(json.dumps({"step": step, "metrics": clean}) + "\n")

    def progress(self, line: str) -> None:
        print(line, flush=True)

    def final(self, summary: dict[str, Any], artifacts: dict[str, bytes]) -> None:
        folder = self.run_dir / "artifacts"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in artifacts.items():
            (folder / name).write_bytes(data)
        self.logger.metrics({**_scalar_metrics(summary, "final/"), **_per_class_metrics(folder)}, step=0)
        self.logger.artifact(folder)
        if (folder / "model.pt").exists():
            self.logger.model(folder / "model.pt")
