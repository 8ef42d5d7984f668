"""Trivial baselines for a controlled study: can the hidden subsets be found without learning?

DivDR's controlled study is only a test of the method if nothing trivial gives the subsets away.
Each baseline turns an image into a feature vector; ``kmeans_recovery`` clusters the vectors
(standardised, K = number of subsets) and scores the clusters against the subsets with the same
best one-to-one matching as the method (``divdr.clustering.recovery_accuracy``):

- ``colour_histograms``: the joint RGB histogram (photometry and class pixel fractions);
- ``random_cnn_features``: global average pools of every stage of a random CNN (generic texture
  and edge statistics, what an untrained network's gates could already see);
- ``untrained_activations``: A(x) of an untrained DR network (what the gates see before learning);
- ``object_structure``: shape statistics of the *labels* (a positive control: the subsets do differ).

``divdr baselines STUDY`` prints them as a table for any study folder.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from divdr.clustering import kmeans, recovery_accuracy
from divdr.data.cityscapes import (
    IMAGE_DIR,
    IMAGE_SUFFIX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LABEL_DIR,
    LABEL_SUFFIX,
    DatasetError,
    normalize_image,
    read_label_ids,
    read_rgb,
)
from divdr.data.labels import LABEL_ID_BY_NAME
from divdr.data.manifest import SUBSET_MANIFEST, read_subset_manifest

HISTOGRAM_BINS = 8  # per channel: an 8x8x8 joint RGB histogram
RANDOM_CNN_WIDTHS = (3, 32, 64, 128, 128)  # 4 stages, strides 2 .. 16
KMEANS_RESTARTS = 10  # seeds tried; the lowest K-means objective is kept
STANDARDISE_FLOOR = 1e-8
# the object classes of the generated studies (labelIds), for the label-structure control
OBJECT_LABEL_IDS = [LABEL_ID_BY_NAME[c] for c in ("car", "person", "pole", "traffic sign", "traffic light")]


def kmeans_recovery(features: np.ndarray, subsets: np.ndarray) -> float:
    """K-means of the standardised features into as many clusters as subsets (best of
    ``KMEANS_RESTARTS`` seeds by objective), scored by best one-to-one matching accuracy."""
    k = int(np.unique(subsets).size)
    x = (features - features.mean(0)) / (features.std(0) + STANDARDISE_FLOOR)
    best = min((kmeans(x, k, seed=seed) for seed in range(KMEANS_RESTARTS)), key=lambda r: r.objective)
    return recovery_accuracy(best.assignments, subsets)


def colour_histograms(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, 512] normalised joint RGB histograms."""
    bins = (images // (256 // HISTOGRAM_BINS)).astype(np.int64)
    codes = (bins[..., 0] * HISTOGRAM_BINS + bins[..., 1]) * HISTOGRAM_BINS + bins[..., 2]
    counts = np.stack([np.bincount(c.ravel(), minlength=HISTOGRAM_BINS**3) for c in codes])
    return counts / counts.sum(1, keepdims=True)


def random_cnn_features(images: np.ndarray, seed: int) -> np.ndarray:
    """Global average pools of every stage of a random 4-stage CNN (strides 2..16), concatenated.
    Train-mode BatchNorm: features normalised over the batch, as at initialisation."""
    generator = torch.Generator().manual_seed(seed)
    stages = []
    for a, b in pairwise(RANDOM_CNN_WIDTHS):
        conv = nn.Conv2d(a, b, 3, 2, 1)
        with torch.no_grad():
            bound = 1 / np.sqrt(a * 9)
            conv.weight.uniform_(-bound, bound, generator=generator)
            conv.bias.uniform_(-bound, bound, generator=generator)
        stages.append(nn.Sequential(conv, nn.BatchNorm2d(b), nn.ReLU()))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pooled = []
    with torch.no_grad():
        for stage in stages:
            x = stage(x)
            pooled.append(x.mean((2, 3)))
    return torch.cat(pooled, 1).numpy()


def object_structure(labels: np.ndarray, object_ids: list[int]) -> np.ndarray:
    """Per image: log count, log median area and median elongation of the connected object regions."""
    rows = []
    for label in labels:
        components, count = ndimage.label(np.isin(label, object_ids))
        if count == 0:
            rows.append([0.0, 0.0, 0.0])
            continue
        slices = ndimage.find_objects(components)
        areas = np.bincount(components.ravel())[1:]
        elongation = [max(s[0].stop - s[0].start, s[1].stop - s[1].start) / np.sqrt(a)
                      for s, a in zip(slices, areas, strict=True)]
        rows.append([np.log(count), np.log(np.median(areas)), np.median(elongation)])
    return np.array(rows)


# ---------------------------------------------------------------------------------------------- the table

UNTRAINED_SIZE = "tiny"  # the untrained DR net whose A(x) is clustered (the main job's size)
SEEDS = 3  # random CNNs and untrained nets drawn per study


def untrained_activations(images: np.ndarray, seed: int, size: str = UNTRAINED_SIZE) -> np.ndarray:
    """A(x) of an untrained DR network (train-mode BatchNorm over the whole set, as at initialisation):
    what the gates see before any learning, the floor learned routing should beat."""
    from divdr.config import get_model_config
    from divdr.heads import DynamicRoutingSegmenter

    torch.manual_seed(seed)
    net = DynamicRoutingSegmenter(get_model_config(size))
    x = torch.stack([normalize_image(image) for image in images])
    with torch.no_grad():
        return net(x).backbone.activations.numpy()


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Images [N, H, W, 3] uint8, labelIds [N, H, W], subsets [N] and subset names of a study's split
    (Cityscapes layout with a subset manifest)."""
    manifest = root / SUBSET_MANIFEST
    if not manifest.exists():
        raise DatasetError(f"{root} has no {SUBSET_MANIFEST}: the baselines need known subsets")
    entries = sorted((path, e) for path, e in read_subset_manifest(manifest).items() if e.split == split)
    if not entries:
        raise DatasetError(f"{manifest} lists no {split!r} image")
    images = np.stack([np.asarray(read_rgb(root / path)) for path, _ in entries])
    labels = np.stack([read_label_ids(root / path.replace(IMAGE_DIR, LABEL_DIR, 1).replace(IMAGE_SUFFIX, LABEL_SUFFIX))
                       for path, _ in entries])
    subsets = np.array([e.subset for _, e in entries])
    names = {e.subset: e.subset_name for _, e in entries}
    return images, labels, subsets, [names[s] for s in sorted(names)]


def baseline_rows(images: np.ndarray, labels: np.ndarray, subsets: np.ndarray) -> dict[str, list[float]]:
    """Recovery of the subsets by K-means on each baseline's features (several draws where random)."""
    return {
        "colour histograms (8x8x8 RGB)": [kmeans_recovery(colour_histograms(images), subsets)],
        "random CNN features (4 stages, pooled)": [kmeans_recovery(random_cnn_features(images, s), subsets)
                                                  for s in range(SEEDS)],
        f"untrained DR net's A(x) ({UNTRAINED_SIZE})": [kmeans_recovery(untrained_activations(images, s), subsets)
                                                       for s in range(SEEDS)],
        "label structure (positive control)": [kmeans_recovery(object_structure(labels, OBJECT_LABEL_IDS), subsets)],
    }


def format_baselines(rows: dict[str, list[float]], n_images: int, names: list[str]) -> str:
    lines = [f"K-means recovery of the {len(names)} subsets ({', '.join(names)}) on {n_images} images "
             f"(best one-to-one matching; chance ~{1 / len(names):.2f} and a little above on a finite set)",
             "", "| features | recovery |", "|---|---|"]
    for name, values in rows.items():
        spread = f" +- {np.std(values):.3f} ({len(values)} draws)" if len(values) > 1 else ""
        lines.append(f"| {name} | {np.mean(values):.3f}{spread} |")
    return "\n".join(lines)
