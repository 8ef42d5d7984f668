"""pipeline/analysis.py helpers that need no run (no Ray, no training)."""

import io

import numpy as np
import pytest
from PIL import Image

from divdr.evaluation import InferenceResult
from pipeline.analysis import (
    GRID_LABEL_WIDTH,
    THUMBNAIL_HEIGHT,
    _thumbnail,
    a_space_legend,
    cluster_captions,
    nearest_grid,
    pca_2d,
    routing_curve,
)


def test_thumbnail_of_a_sixteen_bit_image_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((THUMBNAIL_HEIGHT, 8), 32896, np.uint16)).save(tmp_path / "grey16.png")  # 128 * 257
    assert np.unique(np.asarray(_thumbnail(tmp_path / "grey16.png"))).tolist() == [128]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert _thumbnail(tmp_path / "broken.png").size == (THUMBNAIL_HEIGHT, THUMBNAIL_HEIGHT)  # a grey tile


def _result(acts: np.ndarray, files: list[str], gflops: np.ndarray) -> InferenceResult:
    n = len(files)
    return InferenceResult(sample_ids=np.arange(n), files=files, subsets=np.full(n, -1), activations=acts,
                           gates=np.zeros((n, 1, 3)), real_gflops=gflops, real_gflops_reference=gflops * 64,
                           confusion=None)


def test_nearest_grid_shows_each_clusters_own_images_and_an_empty_cluster_as_an_empty_row(tmp_path):
    for name, value in (("a.png", 40), ("b.png", 120), ("c.png", 200)):
        Image.fromarray(np.full((THUMBNAIL_HEIGHT, 2 * THUMBNAIL_HEIGHT, 3), value, np.uint8)).save(tmp_path / name)
    acts = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
    centres = np.array([[0.0, 0.0], [9.0, 9.0], [5.0, 5.0]])  # centre 1: nearest to c.png, but c is cluster 2's
    assignments = np.array([0, 0, 2])
    grid = Image.open(io.BytesIO(nearest_grid(_result(acts, ["a.png", "b.png", "c.png"], np.ones(3)), centres,
                                              tmp_path, assignments)))
    assert grid.height == 3 * THUMBNAIL_HEIGHT
    pixels = np.asarray(grid.convert("L")).astype(int)
    images = pixels[:, GRID_LABEL_WIDTH + 1:]  # right of the captions
    row = lambda r: images[r * THUMBNAIL_HEIGHT + 2:(r + 1) * THUMBNAIL_HEIGHT - 1]  # noqa: E731 - inside the rules
    assert {40, 120} <= set(np.unique(row(0)).tolist())
    assert np.unique(row(1)).tolist() == [255]  # the empty cluster: nothing borrowed from the others
    assert 200 in np.unique(row(2)).tolist() and 40 not in np.unique(row(2)).tolist()
    assert (pixels[THUMBNAIL_HEIGHT + 2:2 * THUMBNAIL_HEIGHT - 1, :GRID_LABEL_WIDTH] < 128).any()  # captioned


def test_cluster_captions_give_size_and_mean_gflops_and_name_an_empty_cluster():
    gflops = np.array([1.0, 3.0, 5.0, 1.0])
    captions = cluster_captions(np.array([0, 0, 2, 3]), gflops, 10 * gflops, 4, (1024, 2048), "val images")
    assert captions[0] == "cluster 0: 2 val images\nmean 2.000 GFLOPs (20.00 at 1024x2048)"
    assert captions[1] == "cluster 1: no val images"
    assert captions[3].startswith("cluster 3: 1 val image\n")


def test_a_space_legend_names_the_subsets_and_the_cluster_sizes():
    labels = [h.get_label() for h in a_space_legend(np.array([0, 1, 1]), 3, np.array([0, 1, -1]),
                                                    {0: "large", 1: "tiny"})]
    assert labels == ["cluster 0 (1 image)", "cluster 1 (2 images)", "cluster 2 (0 images)", "centres",
                      "subset large", "subset tiny", "subset unknown"]
    assert [h.get_label() for h in a_space_legend(np.array([0]), 1, np.array([-1]))] == ["cluster 0 (1 image)",
                                                                                        "centres"]


def test_pca_explains_the_variance_of_the_images_and_projects_the_centres_on_it():
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(0, 10, 200), rng.normal(0, 1, 200), np.zeros(200)]
    points, centres, explained = pca_2d(x, x[:2])
    assert explained[0] == pytest.approx(np.var(x[:, 0]) / np.var(x, axis=0).sum(), rel=0.05)
    assert explained.sum() == pytest.approx(1.0)
    assert np.allclose(centres, points[:2])
    assert np.array_equal(pca_2d(np.ones((3, 4)))[2], np.zeros(2))  # no variance: no share


def test_learning_curve_probe_is_two_fold_on_val():
    """The probe of a periodic evaluation: nearest means fitted on half of val, scored on the other half."""
    rng = np.random.default_rng(0)
    subsets = np.repeat([0, 1], 20)
    acts = (rng.normal(size=(40, 6)) * 0.1 + subsets[:, None]).astype(np.float32)  # far apart: probe 1.0
    files = [f"{i}.png" for i in range(40)]
    fields = {"sample_ids": np.arange(40), "files": files, "activations": acts, "gates": np.zeros((40, 2, 3)),
              "real_gflops": np.ones(40), "real_gflops_reference": np.ones(40), "confusion": None}
    result = InferenceResult(subsets=subsets, **fields)
    curve = routing_curve(result, centres=None)
    assert curve["val/subset_probe"] == 1.0 and curve["val/subset_variance_share"] > 0.9
    mixed = InferenceResult(subsets=rng.permutation(subsets), **fields)
    assert routing_curve(mixed, centres=None)["val/subset_probe"] < 0.8  # labels unrelated to A(x): near chance
