"""pipeline/trained_run.py: a finished run's centres come from the right file, and a folder that is no
finished run is refused with its name (no training: the files are written by hand)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.trained_run import RunDirError, load_centres, load_run, nearest_centre


def _train_table(path, acts: np.ndarray, clusters: list[int]) -> None:
    dim = acts.shape[1]
    pq.write_table(pa.table({"cluster": pa.array(clusters, pa.int64()), "a": pa.FixedSizeListArray.from_arrays(
        pa.array(acts.reshape(-1).astype(np.float32)), dim)}), path)


def test_the_reported_centres_file_wins(tmp_path):
    centres = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "centres.npy", centres)
    _train_table(tmp_path / "activations_train.parquet", np.zeros((2, 3)), [0, 1])
    loaded, source = load_centres(tmp_path, 2, 3)
    assert np.array_equal(loaded, centres) and source == str(tmp_path / "centres.npy")
    with pytest.raises(RunDirError, match=r"shape \[2, 3\]; the run's configuration says \[3, 3\]"):
        load_centres(tmp_path, 3, 3)


def test_older_runs_get_their_centres_back_from_the_training_activations(tmp_path):
    acts = np.array([[0, 0], [2, 0], [10, 10], [12, 10]], dtype=np.float32)
    _train_table(tmp_path / "activations_train.parquet", acts, [0, 0, 2, 2])
    centres, source = load_centres(tmp_path, 3, 2)
    assert np.array_equal(centres[[0, 2]], [[1, 0], [11, 10]])
    assert np.isnan(centres[1]).all()  # a cluster with no training image cannot be recovered
    assert "activations_train.parquet" in source and "no centres.npy" in source
    clusters, distances = nearest_centre(np.array([[1.0, 1.0], [11, 9]]), centres)
    assert clusters.tolist() == [0, 2] and np.allclose(distances, [1, 1])  # the NaN centre is never nearest
    with pytest.raises(RunDirError, match="A\\(x\\) has 2 values, the run's model 5"):
        load_centres(tmp_path, 3, 5)


def test_no_centres_at_all_is_named(tmp_path):
    with pytest.raises(RunDirError, match=r"neither .*centres\.npy nor .*activations_train\.parquet"):
        load_centres(tmp_path, 2, 3)
    (tmp_path / "centres.npy").write_bytes(b"garbage")
    with pytest.raises(RunDirError, match="cannot read the run's centres"):
        load_centres(tmp_path, 2, 3)
    sink = io.BytesIO()
    np.save(sink, np.array([object()], dtype=object), allow_pickle=True)
    (tmp_path / "centres.npy").write_bytes(sink.getvalue())
    with pytest.raises(RunDirError, match="cannot read"):  # a pickle is never loaded
        load_centres(tmp_path, 2, 3)


def test_a_folder_that_is_no_finished_run_is_refused(tmp_path):
    with pytest.raises(RunDirError, match=f"{tmp_path} is not a run folder: it has no config.yaml"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text("name: r\npreset: DR-A\nmodel_size: micro\n")
    with pytest.raises(RunDirError, match=r"has no artifacts/model\.pt: the run has not finished"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text("name: r\nclustering: {k: 0}\n")
    with pytest.raises(RunDirError, match=r"config\.yaml: clustering\.k must be >= 1"):
        load_run(tmp_path)
