"""The generated controlled study on disk: Cityscapes-layout segmentation or COCO-format instances.

``generate(config, out, kind)`` writes every image of a ``divdr.data.study.StudyConfig`` (drawn by
``divdr.data.scenes``) in the real formats, with the subset manifest and ``study.json``;
``ensure_default_dataset`` keeps the embedded default in a cache keyed by the generator's parameters.
Generation is deterministic: image ``i`` of a split draws from ``numpy.random.default_rng([seed,
split, i])``, independent of every other image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from divdr.config import ConfigError
from divdr.data.cityscapes import IMAGE_DIR, IMAGE_SUFFIX, LABEL_DIR, LABEL_SUFFIX
from divdr.data.labels import LABEL_ID_BY_NAME
from divdr.data.manifest import SUBSET_MANIFEST, SubsetEntry, write_subset_manifest
from divdr.data.scenes import Scene, SceneObject, generate_scene
from divdr.data.study import (  # noqa: F401 - the study's names, for ``from divdr.data.synthetic import ...``
    DEFAULT_NUM_SUBSETS,
    DEFAULT_REGIMES,
    PREMISE_STUDY,
    STUDIES,
    ShapeRule,
    StudyConfig,
    regimes_by_name,
    study_config,
)

# Bump whenever a change to the generator changes the bytes it writes: it keys the dataset cache.
GENERATOR_VERSION = 2

DataKind = Literal["seg", "det"]
SPLITS = ("train", "val")
CACHE_ENV = "DIVDR_CACHE"
DEFAULT_CACHE = Path("~/.cache/divdr")
STUDY_FILE = "study.json"
FRAME_NUMBER = 19  # Cityscapes names the annotated frame of each sequence *_000019
ANNOTATION_ID_START = 1001  # COCO annotation ids need not start at 1; the loader must not assume it
EMPTY_SUBSET = -1  # det export: images with no objects belong to no subset
EMPTY_SUBSET_NAME = "no-objects"


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ImageRecord:
    split: str
    index: int
    city: str
    stem: str  # e.g. aachen_000003_000019
    subset: int


def split_records(config: StudyConfig, split: str) -> list[ImageRecord]:
    """Balanced subsets in a seeded random order; cities assigned by position, so independent of subset."""
    n = config.split_size(split)
    split_code = SPLITS.index(split)
    order = np.random.default_rng([config.seed, split_code, n]).permutation(n)
    subsets = [int(i % config.num_subsets) for i in order]
    cities = config.cities(split)
    per_city: Counter[str] = Counter()
    records = []
    for index, subset in enumerate(subsets):
        city = cities[index * len(cities) // max(n, 1)]
        stem = f"{city}_{per_city[city]:06d}_{FRAME_NUMBER:06d}"
        per_city[city] += 1
        records.append(ImageRecord(split, index, city, stem, subset))
    return records


def scene_rng(config: StudyConfig, record: ImageRecord) -> np.random.Generator:
    return np.random.default_rng([config.seed, SPLITS.index(record.split), record.index])


def subset_name(config: StudyConfig, subset: int) -> str:
    return EMPTY_SUBSET_NAME if subset == EMPTY_SUBSET else config.regimes[subset].name


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def write_seg_study(config: StudyConfig, out: Path) -> dict[str, Counter[str]]:
    """Cityscapes layout + subsets.parquet; returns image counts per split and subset name."""
    entries, counts = [], {}
    for split in SPLITS:
        counts[split] = Counter()
        for record in split_records(config, split):
            scene = generate_scene(config, record.subset, scene_rng(config, record))
            image_rel = f"{IMAGE_DIR}/{split}/{record.city}/{record.stem}{IMAGE_SUFFIX}"
            write_png(out / image_rel, scene.image)
            write_png(out / LABEL_DIR / split / record.city / f"{record.stem}{LABEL_SUFFIX}", scene.label_ids)
            name = subset_name(config, record.subset)
            entries.append(SubsetEntry(image_rel, split, record.subset, name))
            counts[split][name] += 1
    write_subset_manifest(out / SUBSET_MANIFEST, entries)
    return counts


# ---------------------------------------------------------------------------------------------- COCO export


def coco_categories(config: StudyConfig) -> list[dict]:
    """Category ids are the Cityscapes labelIds of the object classes: sorted but not contiguous."""
    return [{"id": LABEL_ID_BY_NAME[c], "name": c, "supercategory": "object"}
            for c in sorted(config.object_classes, key=LABEL_ID_BY_NAME.__getitem__)]


def _rle_json(mask: np.ndarray, compressed: bool) -> dict:
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    # uncompressed RLE (COCO's crowd format): run lengths over the column-major mask, starting with 0s
    flat = mask.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def _annotation(ann_id: int, image_id: int, class_name: str, mask: np.ndarray, segmentation: object,
                crowd: bool) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id, "image_id": image_id, "category_id": LABEL_ID_BY_NAME[class_name],
        "segmentation": segmentation, "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(crowd),
    }


def scene_annotations(scene: Scene, image_id: int, next_id: int) -> list[dict]:
    """Lone objects: polygon or compressed RLE; each crowd group: one uncompressed-RLE iscrowd record."""
    height, width = scene.label_ids.shape
    annotations = []
    groups: dict[int, list[SceneObject]] = {}
    for obj in scene.objects:
        if obj.group >= 0:
            groups.setdefault(obj.group, []).append(obj)
            continue
        mask = obj.placed.full_mask(height, width)
        if obj.encoding == "polygon":
            segmentation: object = [obj.placed.polygon.ravel().tolist()]
        else:
            segmentation = _rle_json(mask, compressed=True)
        annotations.append(_annotation(next_id + len(annotations), image_id, obj.class_name, mask, segmentation, False))
    for members in groups.values():
        mask = np.logical_or.reduce([m.placed.full_mask(height, width) for m in members])
        annotations.append(_annotation(next_id + len(annotations), image_id, members[0].class_name, mask,
                                       _rle_json(mask, compressed=False), True))
    return annotations


def det_records(config: StudyConfig, split: str) -> list[ImageRecord]:
    records = split_records(config, split)
    n = len(records)
    extra = [ImageRecord(split, n + i, "empty", f"empty_{i:06d}", EMPTY_SUBSET) for i in range(config.det_empty_images)]
    return records + extra


def write_det_study(config: StudyConfig, out: Path) -> dict[str, Counter[str]]:
    """COCO layout: ``{split}/*.png``, ``annotations/instances_{split}.json``, ``subsets.parquet``."""
    entries, counts = [], {}
    ann_id = ANNOTATION_ID_START
    for split in SPLITS:
        counts[split] = Counter()
        images, annotations = [], []
        for record in det_records(config, split):
            scene = generate_scene(config, record.subset, scene_rng(config, record))
            file_name = f"{record.stem}.png"
            write_png(out / split / file_name, scene.image)
            image_id = record.index + 1
            images.append({"id": image_id, "file_name": file_name, "height": config.height, "width": config.width})
            new = scene_annotations(scene, image_id, ann_id)
            annotations.extend(new)
            ann_id += len(new)
            name = subset_name(config, record.subset)
            entries.append(SubsetEntry(f"{split}/{file_name}", split, record.subset, name))
            counts[split][name] += 1
        document = {"info": {"description": "divdr synthetic controlled study", "version": GENERATOR_VERSION},
                    "licenses": [], "images": images, "annotations": annotations,
                    "categories": coco_categories(config)}
        path = out / "annotations" / f"instances_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document))
    write_subset_manifest(out / SUBSET_MANIFEST, entries)
    return counts


# ---------------------------------------------------------------------------------------------- entry points


def config_document(config: StudyConfig, kind: DataKind) -> dict:
    return {"generator_version": GENERATOR_VERSION, "kind": kind, "config": asdict(config)}


def generate(config: StudyConfig, out: str | Path, kind: DataKind = "seg") -> dict[str, Counter[str]]:
    """Write the study into ``out`` (created; must not already hold files)."""
    if kind not in ("seg", "det"):
        raise ConfigError(f"kind must be 'seg' or 'det', got {kind!r}")
    out = Path(out)
    existing = next(path for path in (out, *out.parents) if path.exists())  # the cwd, at worst
    if not existing.is_dir():
        raise ConfigError(f"cannot write the study to {out}: {existing} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} is not empty; choose a new one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. no permission
        raise ConfigError(f"cannot create output folder {out}: {err}") from err
    counts = (write_seg_study if kind == "seg" else write_det_study)(config, out)
    (out / STUDY_FILE).write_text(json.dumps(config_document(config, kind), indent=1, sort_keys=True))
    return counts


def regime_routes(root: str | Path) -> dict[int, tuple[int, ...]]:
    """Subset index -> the route its regime's labels need (ShapeRule.route), read from a generated
    study's ``study.json``; regimes that state none are left out."""
    path = Path(root) / STUDY_FILE
    try:
        regimes = json.loads(path.read_text())["config"]["regimes"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read the regimes of {path}: {err}") from err
    return {index: tuple(r["route"]) for index, r in enumerate(regimes) if r.get("route")}


def cache_key(config: StudyConfig, kind: DataKind) -> str:
    text = json.dumps(config_document(config, kind), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def ensure_default_dataset(cache_dir: str | Path | None = None, config: StudyConfig | None = None,
                           kind: DataKind = "seg") -> Path:
    """The default study's root, generated on first use into ``cache_dir`` (or $DIVDR_CACHE, or
    ~/.cache/divdr) under a folder keyed by the generator parameters.

    Generation goes to a temporary sibling folder renamed into place at the end, so an interrupted
    run leaves only a ``.tmp-*`` folder behind, never a half-written dataset under the final name.
    """
    config = config or StudyConfig()
    root = cache_root(cache_dir)
    final = root / f"synthetic-{kind}-{cache_key(config, kind)}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        generate(config, tmp, kind)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # not a concurrent winner: a real failure
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final




__all__ = [
    "DEFAULT_REGIMES", "GENERATOR_VERSION", "PREMISE_STUDY", "STUDIES", "ShapeRule", "StudyConfig",
    "ensure_default_dataset", "generate", "generate_scene", "regimes_by_name", "study_config",
]
