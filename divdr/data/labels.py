"""Cityscapes label table (cityscapesScripts ``helpers/labels.py``): labelIds <-> the 19 train ids.

Only the columns this project needs: label id, name, train id (255 = ignored in training and
evaluation), and the official colour of each train id (for colourised predictions). The license plate
(id -1) cannot appear in a uint8 labelIds PNG and is left out.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

# (labelId, name, trainId)
CITYSCAPES_LABELS: tuple[tuple[int, str, int], ...] = (
    (0, "unlabeled", 255), (1, "ego vehicle", 255), (2, "rectification border", 255),
    (3, "out of roi", 255), (4, "static", 255), (5, "dynamic", 255), (6, "ground", 255),
    (7, "road", 0), (8, "sidewalk", 1), (9, "parking", 255), (10, "rail track", 255),
    (11, "building", 2), (12, "wall", 3), (13, "fence", 4), (14, "guard rail", 255),
    (15, "bridge", 255), (16, "tunnel", 255), (17, "pole", 5), (18, "polegroup", 255),
    (19, "traffic light", 6), (20, "traffic sign", 7), (21, "vegetation", 8), (22, "terrain", 9),
    (23, "sky", 10), (24, "person", 11), (25, "rider", 12), (26, "car", 13), (27, "truck", 14),
    (28, "bus", 15), (29, "caravan", 255), (30, "trailer", 255), (31, "train", 16),
    (32, "motorcycle", 17), (33, "bicycle", 18),
)
MAX_LABEL_ID = max(label_id for label_id, _, _ in CITYSCAPES_LABELS)
TRAIN_ID_NAMES: tuple[str, ...] = tuple(
    name for _, name, train_id in sorted(CITYSCAPES_LABELS, key=lambda r: r[2]) if train_id != IGNORE_INDEX
)
LABEL_ID_BY_NAME = {name: label_id for label_id, name, _ in CITYSCAPES_LABELS}
# The label id each train id is written back as (the benchmark's labelIds format for predictions).
LABEL_ID_OF_TRAIN_ID: tuple[int, ...] = tuple(
    label_id for label_id, _, train_id in sorted(CITYSCAPES_LABELS, key=lambda r: r[2]) if train_id != IGNORE_INDEX
)
UNLABELED_ID = 0  # what "no prediction" (train id 255) is written as
# cityscapesScripts' colour of each train id, in train-id order (road ... bicycle)
TRAIN_ID_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# lookup table indexed by labelId; ids beyond the table are flagged by label_ids_to_train_ids
_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _, _train_id in CITYSCAPES_LABELS:
    _LUT[_label_id] = _train_id


class LabelError(ValueError):
    """A label file holds ids outside the Cityscapes table."""


def label_ids_to_train_ids(label_ids: np.ndarray, source: str = "label") -> np.ndarray:
    """Map a labelIds array (uint8) to train ids (0-18, 255 ignored).

    Raises LabelError naming ``source`` and the offending ids if any id is not in the table.
    """
    label_ids = np.asarray(label_ids)
    if label_ids.dtype.kind not in "ui":
        raise LabelError(f"{source}: label ids must be integers, got dtype {label_ids.dtype}")
    bad = np.unique(label_ids[(label_ids < 0) | (label_ids > MAX_LABEL_ID)])
    if bad.size:
        raise LabelError(f"{source}: label ids {bad.tolist()[:10]} are not Cityscapes labelIds (0-{MAX_LABEL_ID})")
    return _LUT[label_ids.astype(np.int64)]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map train ids (0-18, 255 = no prediction) back to labelIds (uint8), the format of Cityscapes
    predictions; 255 becomes 0 (unlabeled). Raises LabelError on any other value."""
    train_ids = np.asarray(train_ids)
    if train_ids.dtype.kind not in "ui":
        raise LabelError(f"train ids must be integers, got dtype {train_ids.dtype}")
    bad = np.unique(train_ids[(train_ids < 0) | ((train_ids >= NUM_CLASSES) & (train_ids != IGNORE_INDEX))])
    if bad.size:
        raise LabelError(f"train ids {bad.tolist()[:10]} are not 0-{NUM_CLASSES - 1} or {IGNORE_INDEX}")
    lut = np.full(256, UNLABELED_ID, dtype=np.uint8)
    lut[:NUM_CLASSES] = LABEL_ID_OF_TRAIN_ID
    return lut[train_ids.astype(np.int64)]


def colourise(train_ids: np.ndarray) -> np.ndarray:
    """[H, W] train ids -> [H, W, 3] uint8 in the Cityscapes colours (black for 255, no prediction)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = TRAIN_ID_COLOURS
    return lut[np.asarray(train_ids).astype(np.int64)]
