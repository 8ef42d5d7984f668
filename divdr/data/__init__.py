"""Datasets: Cityscapes-layout segmentation, COCO detection, joint transforms, the generated study.

Names are resolved on first use (PEP 562), so ``from divdr.data.labels import ...`` stays cheap:
it does not pull in pyarrow, pycocotools or the generator.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "divdr.data.labels": ("IGNORE_INDEX", "NUM_CLASSES", "TRAIN_ID_NAMES", "LABEL_ID_BY_NAME", "LabelError",
                          "label_ids_to_train_ids"),
    "divdr.data.cityscapes": ("CityscapesSegmentation", "IMAGENET_MEAN", "IMAGENET_STD"),
    "divdr.data.errors": ("DatasetError",),
    "divdr.data.manifest": ("SubsetEntry", "SUBSET_MANIFEST", "UNKNOWN_SUBSET", "read_subset_manifest",
                            "write_subset_manifest"),
    "divdr.data.transforms": ("RandomScaleCropFlip", "SegTransformConfig"),
    "divdr.data.coco": ("CocoDetection", "collate_fn", "load_coco_json"),
    "divdr.data.synthetic": ("StudyConfig", "ShapeRule", "DEFAULT_REGIMES", "study_config", "generate",
                             "ensure_default_dataset"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'divdr.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


def __dir__() -> list[str]:
    return __all__
