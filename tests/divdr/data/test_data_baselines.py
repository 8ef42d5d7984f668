"""The controlled study is not solved by trivial statistics, yet its label structure tells the regimes apart.

Best one-to-one matching of K-means clusters to the hidden subsets (the DivDR recovery metric), on
the default study's validation split (60 images, 20 per subset; chance level is about 0.42).
"""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from torch import nn

from divdr.data.cityscapes import IMAGENET_MEAN, IMAGENET_STD, SUBSET_MANIFEST, read_subset_manifest
from divdr.data.labels import LABEL_ID_BY_NAME
from divdr.data.synthetic import StudyConfig, generate, split_records

MAX_TRIVIAL_RECOVERY = 0.6  # 3 balanced subsets: chance is ~0.42 on 60 images, perfect is 1
MIN_STRUCTURE_RECOVERY = 0.9
HISTOGRAM_BINS = 8  # per channel: an 8x8x8 joint RGB histogram
RANDOM_NETS = 3
OBJECT_IDS = [LABEL_ID_BY_NAME[c] for c in StudyConfig().object_classes]


@pytest.fixture(scope="module")
def default_val(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images [N, H, W, 3], labelIds [N, H, W] and subsets [N] of the default study's val split.

    Every image draws from its own (seed, split, index) stream, so generating without the train
    split yields exactly the default study's val images.
    """
    config = replace(StudyConfig(), n_train=0)
    assert split_records(config, "val") == split_records(StudyConfig(), "val")
    root = tmp_path_factory.mktemp("baseline") / "study"
    generate(config, root)
    entries = sorted(read_subset_manifest(root / SUBSET_MANIFEST).items())
    images = np.stack([np.asarray(Image.open(root / path)) for path, _ in entries])
    labels = np.stack([np.asarray(Image.open(root / path.replace("leftImg8bit", "gtFine", 1)
                                             .replace("_leftImg8bit.png", "_gtFine_labelIds.png")))
                       for path, _ in entries])
    return images, labels, np.array([entry.subset for _, entry in entries])


def recovery(features: np.ndarray, subsets: np.ndarray) -> float:
    """K-means (standardised features), then the best one-to-one cluster -> subset matching accuracy."""
    k = int(subsets.max()) + 1
    standardised = (features - features.mean(0)) / (features.std(0) + 1e-8)
    clusters = KMeans(k, n_init=10, random_state=0).fit_predict(standardised)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (subsets, clusters), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return float(confusion[rows, cols].sum() / len(subsets))


def colour_histograms(images: np.ndarray) -> np.ndarray:
    bins = (images // (256 // HISTOGRAM_BINS)).astype(np.int64)
    codes = (bins[..., 0] * HISTOGRAM_BINS + bins[..., 1]) * HISTOGRAM_BINS + bins[..., 2]
    counts = np.stack([np.bincount(c.ravel(), minlength=HISTOGRAM_BINS**3) for c in codes])
    return counts / counts.sum(1, keepdims=True)


def random_cnn_features(images: np.ndarray, seed: int) -> np.ndarray:
    """Global average pools of every stage of a random 4-stage CNN (strides 2..16), concatenated."""
    torch.manual_seed(seed)
    widths = [3, 32, 64, 128, 128]
    stages = [nn.Sequential(nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.ReLU()) for a, b in pairwise(widths)]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pooled = []
    with torch.no_grad():
        for stage in stages:  # train-mode BN: features normalised over the batch, as at initialisation
            x = stage(x)
            pooled.append(x.mean((2, 3)))
    return torch.cat(pooled, 1).numpy()


def object_structure(labels: np.ndarray) -> np.ndarray:
    """Per image: log count, log median area and median elongation of the connected object regions."""
    rows = []
    for label in labels:
        components, count = ndimage.label(np.isin(label, OBJECT_IDS))
        slices = ndimage.find_objects(components)
        areas = np.bincount(components.ravel())[1:]
        elongation = [max(s[0].stop - s[0].start, s[1].stop - s[1].start) / np.sqrt(a)
                      for s, a in zip(slices, areas, strict=True)]
        rows.append([np.log(count), np.log(np.median(areas)), np.median(elongation)])
    return np.array(rows)


def test_colour_histograms_recover_subsets_at_chance(default_val: tuple) -> None:
    images, _, subsets = default_val
    assert np.bincount(subsets).tolist() == [20, 20, 20]
    assert recovery(colour_histograms(images), subsets) < MAX_TRIVIAL_RECOVERY


def test_random_cnn_features_recover_subsets_at_chance(default_val: tuple) -> None:
    images, _, subsets = default_val
    scores = [recovery(random_cnn_features(images, seed), subsets) for seed in range(RANDOM_NETS)]
    assert np.mean(scores) < MAX_TRIVIAL_RECOVERY, scores


def test_object_structure_of_the_labels_recovers_subsets(default_val: tuple) -> None:
    """Positive control: the regimes do differ, in the spatial structure of the objects."""
    _, labels, subsets = default_val
    assert recovery(object_structure(labels), subsets) > MIN_STRUCTURE_RECOVERY
