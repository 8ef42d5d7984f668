"""A finished run, loaded to be used without training: its configuration, its model, its cluster centres.

The centres are those of the run's report: the K-means over the eval-mode A(x) of the training images
at the end of training (``pipeline.analysis.summarize_run``), which assigned every val image its cluster
in ``activations_val.parquet`` and ``final_metrics.json``. They are ``artifacts/centres.npy``. Runs
made before that file existed get them back from ``artifacts/activations_train.parquet``: each
cluster's mean A(x) (the K-means fixed point; a cluster with no training image cannot be recovered and
takes no image). ``store/centres.npy`` is *not* used: it holds the centroid store's last streaming
centres, which training used for its loss but which are not the reported clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from torch import nn

from divdr.config import ConfigError
from pipeline.config import ExperimentConfig, from_dict
from pipeline.model_file import ModelFileError, load_model
from pipeline.run_folder import CONFIG_FILE, RESULT_FILE, saved_config

ARTIFACTS = "artifacts"
MODEL_FILE = "model.pt"
CENTRES_FILE = "centres.npy"
TRAIN_ACTIVATIONS = "activations_train.parquet"


class RunDirError(ValueError):
    """A run folder that cannot be used (not a run, not finished, its files unreadable); names the file."""


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: ExperimentConfig
    model: nn.Module  # eval mode, CPU: a DynamicRoutingSegmenter, or a DynamicRoutingDetector
    centres: np.ndarray  # [K, a_dim] float32; a NaN row is a centre that could not be recovered
    centres_source: str  # which file the centres come from, and how

    @property
    def data_root(self) -> Path:
        return Path(self.cfg.data.root)


def load_run(run_dir: Path) -> TrainedRun:
    """The run in ``run_dir`` (a folder ``pipeline/train.py`` wrote), finished: config.yaml,
    artifacts/model.pt and the centres."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE} "
                          "(a run folder is <out>/<name>/ of pipeline/train.py)")
    try:
        cfg = from_dict(saved_config(run_dir))
    except ConfigError as error:
        raise RunDirError(f"{run_dir / CONFIG_FILE}: {error}") from error
    model_path = run_dir / ARTIFACTS / MODEL_FILE
    if not model_path.is_file():
        state = "has finished" if (run_dir / RESULT_FILE).is_file() else f"has not finished (no {RESULT_FILE})"
        raise RunDirError(f"run {run_dir} has no {ARTIFACTS}/{MODEL_FILE}: the run {state}; "
                          "a model is saved at the end of training")
    try:
        model = load_model(model_path)
    except ModelFileError as error:
        raise RunDirError(str(error)) from error
    centres, source = load_centres(run_dir / ARTIFACTS, cfg.clustering.k, cfg.model.a_dim)
    return TrainedRun(run_dir, cfg, model, centres, source)


def load_centres(artifacts: Path, k: int, a_dim: int) -> tuple[np.ndarray, str]:
    """The reported K-means centres ([k, a_dim]) and where they came from (see the module doc)."""
    exact = artifacts / CENTRES_FILE
    if exact.is_file():
        try:
            centres = np.load(exact, allow_pickle=False)  # no pickles from shared storage
        except (OSError, ValueError) as error:
            raise RunDirError(f"cannot read the run's centres {exact}: {error}") from error
        if centres.shape != (k, a_dim):
            raise RunDirError(f"{exact} holds centres of shape {list(centres.shape)}; the run's "
                              f"configuration says [{k}, {a_dim}] (clustering.k, A-space dimension)")
        return centres.astype(np.float32), str(exact)
    table_path = artifacts / TRAIN_ACTIVATIONS
    if not table_path.is_file():
        raise RunDirError(f"the run has neither {exact} nor {table_path}: no centres to assign images to")
    try:
        table = pq.read_table(table_path, columns=["cluster", "a"])
    except Exception as error:  # pyarrow raises several types for a bad file
        raise RunDirError(f"cannot read {table_path}: {error}") from error
    clusters = table.column("cluster").to_numpy()
    acts = np.asarray(table.column("a").to_pylist(), dtype=np.float32).reshape(len(clusters), -1)
    if acts.shape[1] != a_dim:
        raise RunDirError(f"{table_path}: A(x) has {acts.shape[1]} values, the run's model {a_dim}")
    centres = np.full((k, a_dim), np.nan, dtype=np.float32)
    for cluster in range(k):
        members = clusters == cluster
        if members.any():
            centres[cluster] = acts[members].mean(0)
    return centres, f"{table_path} (the mean A(x) of each cluster's training images: this run has no {CENTRES_FILE})"


def nearest_centre(activations: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centre (L2, as ``divdr.clustering.assign``) and its distance; a NaN centre is
    never nearest."""
    activations = np.asarray(activations, dtype=np.float64)
    distances = np.linalg.norm(activations[:, None, :] - np.asarray(centres, dtype=np.float64)[None], axis=2)
    distances = np.where(np.isnan(distances), np.inf, distances)
    nearest = distances.argmin(1)
    return nearest.astype(np.int64), distances[np.arange(len(nearest)), nearest]
