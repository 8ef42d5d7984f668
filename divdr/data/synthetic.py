"""The embedded default dataset: a generated controlled study with hidden subsets ("regimes").

DivDR's controlled study (sec. 5) needs data whose subsets are known and genuinely call for different
routes through a multi-scale network, while nothing trivial gives them away. Every image here is a
street-like scene (sky, buildings, vegetation, sidewalk, road) with *objects* (car, person, pole,
traffic sign, traffic light). The hidden subset of an image is the geometry of its objects:

- ``large``: one or two very large objects (~50% of the image height) holding big dark "glass"
  windows (35% of their area). A window is labelled as its object but looks like a shadow on the
  road, so labelling it needs context far beyond the window: coarse scales / a large receptive field.
- ``tiny``: ~80 tiny objects (4-8% of the height, 1-2 cells at 1/4), in part packed into a crowd
  (an ``iscrowd`` group in the COCO export): they need the fine 1/4 scale.
- ``thin``: ~15 thin, long bars (3-5 px wide, poles and wires at any angle): fine scale, elongated.
- ``medium`` (4th, only with ``--subsets 4``): mid-sized solid objects.

Measured (1000 / 600 SGD steps, batch 8, CPU): a net working only at 1/4 (receptive field ~40 px)
reaches mIoU 0.94 / 0.78 / 0.78 on large / tiny / thin but gets only 92% of window pixels right; a
net working only at 1/16 reaches 0.87 on large with 99% of window pixels, but 0.42 / 0.44 on tiny /
thin. So the large regime can drop the fine scale and needs the coarse one, the other two need the
fine scale and not the coarse one.

What keeps the subsets from being trivially separable:

- Same palette, same classes, same expected per-class pixel fractions: each image draws one area
  budget B, and *every* geometry fills exactly B nominal pixels (shapes are rescaled to it); the
  object class of each shape is drawn from the same weights in every regime.
- Every image contains all K geometries, with the same budget B each: the image's own regime as
  objects (palette colours, object labels), the other K-1 as shadows of the background (darkened,
  slightly tinted, labelled as the background under them; large ones with glass patches too). So
  the amount of small, thin and large structure, edge density and the glass colour are the same in
  every regime: only *which* structure carries objects differs, which is what a segmentation net
  learns and a random or colour-statistics feature does not see.
- Class colours are jittered per image and per instance, the whole image gets a random gain and
  white balance, an illumination ramp, and the same pixel noise and mottling everywhere.

Defaults and why: 128x256 images keep the Cityscapes 1:2 aspect and give 32x64 cells at 1/4 and 4x8 at
1/32, so all four scales of the routing space still carry information; shape sizes are fractions of
the image height so another resolution keeps the same structure relative to those scales. 240 train
/ 60 val images, balanced over 3 subsets (80 / 20 each), are enough for a small net to learn the
task in minutes on 2 CPU cores and for K-means over 60 validation activations to be meaningful,
and generate in seconds (~7 s for the default study). Object budget 9-15% of the image per geometry
(so a third of the pixels carry shape structure, a third of that objects): enough objects for every
object class to matter in the mIoU, while the background stays the larger part, as in street scenes.

Trivial baselines on the default validation split (best one-to-one matching accuracy; chance ~0.42):
K-means on 8x8x8 colour histograms 0.38, on the pooled features of random CNNs 0.38-0.42; K-means
on the shape statistics of the *labels* (component count, size, elongation) 1.0.

The same scenes are written as Cityscapes-layout segmentation (``kind="seg"``) or as COCO-format
detection / instance segmentation (``kind="det"``: polygons for tiny/thin objects, compressed RLE for
large ones, uncompressed RLE for crowd groups, category ids = Cityscapes label ids, non-contiguous).
Generation is deterministic: image ``i`` of a split draws from ``numpy.random.default_rng([seed,
split, i])``, independent of every other image.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from divdr.config import ConfigError
from divdr.data.cityscapes import IMAGE_DIR, IMAGE_SUFFIX, LABEL_DIR, LABEL_SUFFIX
from divdr.data.labels import LABEL_ID_BY_NAME
from divdr.data.manifest import SUBSET_MANIFEST, SubsetEntry, write_subset_manifest

# Bump whenever a change to this module changes the bytes it writes: it keys the dataset cache.
GENERATOR_VERSION = 2

ShapeKind = Literal["blob", "line", "bar"]
DataKind = Literal["seg", "det"]
Clutter = Literal["shadow", "decoy", "none"]
Background = Literal["street", "road"]
SPLITS = ("train", "val")
CACHE_ENV = "DIVDR_CACHE"
DEFAULT_CACHE = Path("~/.cache/divdr")
STUDY_FILE = "study.json"
FRAME_NUMBER = 19  # Cityscapes names the annotated frame of each sequence *_000019
MIN_IMAGE_SIDE = 32  # the coarsest routing scale is 1/32
MAX_PLACEMENT_TRIES = 40
ELLIPSE_VERTICES = 20
# Vertices sit on a 1/8-pixel grid: exact in binary floating point and in JSON, so pycocotools
# rasterises a polygon read back from the JSON to exactly the pixels drawn here.
POLYGON_GRID = 8
ANNOTATION_ID_START = 1001  # COCO annotation ids need not start at 1; the loader must not assume it
EMPTY_SUBSET = -1  # det export: images with no objects belong to no subset
EMPTY_SUBSET_NAME = "no-objects"

BACKGROUND_PALETTE = {
    "road": (118, 112, 124),
    "sidewalk": (196, 168, 176),
    "building": (150, 112, 92),
    "vegetation": (78, 128, 56),
    "sky": (150, 188, 228),
}
OBJECT_PALETTE = {
    "car": (36, 64, 180),
    "person": (206, 44, 64),
    "pole": (214, 206, 72),
    "traffic sign": (236, 150, 36),
    "traffic light": (44, 190, 180),
}
# Dark, nearly neutral: close to a shadow on the road, so a window is only recognisable by its context.
GLASS_COLOUR = (52, 52, 60)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_range(value: tuple[float, float], name: str, upper: float = math.inf) -> None:
    _check(len(value) == 2 and 0 < value[0] <= value[1] <= upper,
           f"{name} must be a range 0 < lo <= hi <= {upper}, got {value}")


@dataclass(frozen=True)
class ShapeRule:
    """The geometry of one regime. Lengths are fractions of the image height.

    ``blob``: ellipse or rectangle, ``size`` = diameter range, ``aspect`` = width/height range.
    ``line``: rotated bar, ``size`` = width range, ``length`` = length range; ``vertical_fraction``
    of them near-vertical (poles), the rest at any angle (wires). ``windows`` = fraction of a blob's
    area given to glass patches inside it. ``crowd_probability``: chance that an image of this regime
    has one crowd (``crowd_size`` shapes of one class packed within ``crowd_radius``).
    """

    name: str
    kind: ShapeKind
    size: tuple[float, float]
    aspect: tuple[float, float] = (1.0, 1.0)
    length: tuple[float, float] = (0.0, 0.0)
    vertical_fraction: float = 0.0
    windows: float = 0.0
    window_count: tuple[int, int] = (1, 3)
    crowd_probability: float = 0.0
    crowd_size: tuple[int, int] = (6, 12)
    crowd_radius: float = 0.12
    # ``bar`` (the premise study): a horizontal bar, ``size`` = its thickness, ``length`` = its length.
    # Only its two end caps, each ``caps`` x the thickness long, carry the class colour; the body between
    # them is painted in the glass colour, the same for every class. So the class of a body pixel is
    # known only from the caps, up to half a bar length away.
    caps: float = 0.0
    # The image's object budget B split between this regime's objects and "puddles": glass blobs
    # labelled as the background under them. With bars (mostly glass) in one regime and solid objects
    # in another, puddles give both the same share of glass pixels, so colour statistics cannot tell
    # the regimes apart. ``object_share`` + ``puddle_share`` <= 1.
    object_share: float = 1.0
    puddle_share: float = 0.0
    # The part of the routing space this regime's labels need (ModelConfig.route of its one-route
    # expert), recorded with the study so the experts can be built from it; () = not stated.
    route: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = f"regime {self.name!r}"
        _check(self.kind in ("blob", "line", "bar"),
               f"{where}: kind must be 'blob', 'line' or 'bar', got {self.kind!r}")
        _check_range(self.size, f"{where}: size", upper=1.0)
        _check_range(self.aspect, f"{where}: aspect")
        if self.kind == "line":
            _check_range(self.length, f"{where}: length", upper=1.0)
        if self.kind == "bar":
            _check_range(self.length, f"{where}: length")
        _check(self.caps >= 0, f"{where}: caps must be >= 0, got {self.caps}")
        _check(all(isinstance(r, int) and r >= 0 for r in self.route), f"{where}: route must list scales >= 0")
        _check(0 < self.object_share and 0 <= self.puddle_share and self.object_share + self.puddle_share <= 1,
               f"{where}: object_share must be > 0, puddle_share >= 0, and their sum <= 1, "
               f"got {self.object_share} and {self.puddle_share}")
        _check(0 <= self.vertical_fraction <= 1, f"{where}: vertical_fraction must be in [0, 1]")
        _check(0 <= self.windows < 1, f"{where}: windows must be in [0, 1), got {self.windows}")
        _check(1 <= self.window_count[0] <= self.window_count[1],
               f"{where}: window_count must be 1 <= lo <= hi, got {self.window_count}")
        _check(self.crowd_radius > 0, f"{where}: crowd_radius must be > 0, got {self.crowd_radius}")
        _check(0 <= self.crowd_probability <= 1, f"{where}: crowd_probability must be in [0, 1]")
        _check(1 <= self.crowd_size[0] <= self.crowd_size[1], f"{where}: crowd_size must be 1 <= lo <= hi")


LARGE = ShapeRule("large", "blob", size=(0.40, 0.70), aspect=(0.7, 1.6), windows=0.35, window_count=(1, 2))
TINY = ShapeRule("tiny", "blob", size=(0.04, 0.08), aspect=(0.7, 1.4), crowd_probability=0.5)
THIN = ShapeRule("thin", "line", size=(0.025, 0.04), length=(0.30, 0.80), vertical_fraction=0.5)
MEDIUM = ShapeRule("medium", "blob", size=(0.14, 0.24), aspect=(0.7, 1.4))
PUDDLE = ShapeRule("puddle", "blob", size=(0.15, 0.45), aspect=(0.6, 1.7))
DEFAULT_REGIMES: tuple[ShapeRule, ...] = (LARGE, TINY, THIN, MEDIUM)
DEFAULT_NUM_SUBSETS = 3


@dataclass(frozen=True)
class StudyConfig:
    """Everything that determines the generated study; equal configs give identical bytes."""

    height: int = 128
    width: int = 256
    n_train: int = 240
    n_val: int = 60
    seed: int = 0
    regimes: tuple[ShapeRule, ...] = DEFAULT_REGIMES[:DEFAULT_NUM_SUBSETS]
    object_fraction: tuple[float, float] = (0.09, 0.15)  # per-image budget B / image area, per geometry
    object_classes: tuple[str, ...] = tuple(OBJECT_PALETTE)
    class_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    colour_jitter: float = 10.0  # std of the per-image shift of each class colour (0-255 units)
    instance_jitter: float = 6.0  # std of the per-object shift
    gain_range: tuple[float, float] = (0.8, 1.2)  # global brightness
    white_balance: float = 0.08  # per-channel gain spread
    illumination: float = 0.15  # amplitude of a random linear brightness ramp
    shadow_range: tuple[float, float] = (0.45, 0.70)  # brightness factor of shadows
    shadow_tint: float = 0.06  # per-channel spread of the shadow factor
    # How the other regimes' shapes appear. "shadow" (default): darkened background, so an object is
    # told from clutter by its colour alone. "decoy": painted in the object palette like objects but
    # labelled as background, each other geometry with decoy_fraction of the budget: an object-coloured
    # shape can then only be labelled by knowing the image's regime (its dominant geometry), which
    # the network must infer from global context.
    clutter: Clutter = "shadow"
    # "street": sky, buildings, trees, sidewalk and road (default). "road": the whole image is road, so
    # the background asks nothing of the network and every label that matters is an object's.
    background: Background = "street"
    decoy_fraction: float = 0.5
    pixel_noise: float = 8.0  # std of i.i.d. pixel noise
    mottling: float = 6.0  # std of a smooth noise field with ~4 px grain
    det_empty_images: int = 2  # det export: extra images per split with no objects at all
    train_cities: tuple[str, ...] = ("aachen", "bochum", "bremen", "cologne")
    val_cities: tuple[str, ...] = ("frankfurt", "lindau", "munster")

    def __post_init__(self) -> None:
        _check(self.height >= MIN_IMAGE_SIDE and self.width >= MIN_IMAGE_SIDE,
               f"study size must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}, got {self.height}x{self.width}")
        _check(self.n_train >= 0 and self.n_val >= 0, f"n_train/n_val must be >= 0, got {self.n_train}/{self.n_val}")
        _check(len(self.regimes) >= 1, "regimes: need at least one regime")
        names = [r.name for r in self.regimes]
        _check(len(set(names)) == len(names), f"regimes: names must be unique, got {names}")
        _check_range(self.object_fraction, "object_fraction", upper=0.3)
        unknown = [c for c in self.object_classes if c not in OBJECT_PALETTE]
        _check(not unknown, f"object_classes: {unknown} have no colour; choose from {list(OBJECT_PALETTE)}")
        _check(len(self.class_weights) == len(self.object_classes) and min(self.class_weights) >= 0
               and sum(self.class_weights) > 0,
               f"class_weights must be {len(self.object_classes)} non-negative numbers, got {self.class_weights}")
        _check_range(self.gain_range, "gain_range")
        _check_range(self.shadow_range, "shadow_range", upper=1.0)
        _check(self.clutter in ("shadow", "decoy", "none"),
               f"clutter must be 'shadow', 'decoy' or 'none', got {self.clutter!r}")
        _check(self.background in ("street", "road"),
               f"background must be 'street' or 'road', got {self.background!r}")
        _check(0 < self.decoy_fraction < 1, f"decoy_fraction must be in (0, 1), got {self.decoy_fraction}")
        _check(self.det_empty_images >= 0, f"det_empty_images must be >= 0, got {self.det_empty_images}")
        _check(len(self.train_cities) >= 1 and len(self.val_cities) >= 1, "train_cities/val_cities: need one each")

    @property
    def num_subsets(self) -> int:
        return len(self.regimes)

    def split_size(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_val

    def cities(self, split: str) -> tuple[str, ...]:
        return self.train_cities if split == "train" else self.val_cities


# The premise study (`make-data --study premise`): two regimes whose labels need two different parts of
# the routing space, at about the same cost, while colour statistics cannot tell them apart.
# - fine: tiny objects (5-9 px, one or two cells at 1/4), the rest of the object budget as glass puddles
#   (background). Their labels need the 1/4 resolution: a route through 1/8 and coarser blurs them away.
# - coarse: horizontal bars whose glass body is the same for every class; only the end caps show the
#   class, up to ~100 px from the middle of a body. The 1/4 column's receptive field falls short of it
#   and labels the body's class wrongly; the 1/8 column's reaches it.
# Both on a plain road, so no background structure favours either route. ``object_share`` gives the fine
# regime about the caps' share of class colour, and its puddles the bars' share of glass. Measured (one-route
# experts, baselines, DR and DivDR on it): docs/2026-11-26-premise-study.md.
FINE_PREMISE = ShapeRule("fine", "blob", size=(0.05, 0.09), aspect=(0.7, 1.4), object_share=0.16,
                         puddle_share=0.84, route=(0,))
COARSE_PREMISE = ShapeRule("coarse", "bar", size=(0.2, 0.3), length=(1.5, 3.6), caps=1.0, route=(1,))
PREMISE_STUDY = StudyConfig(height=96, width=384, n_val=80, regimes=(FINE_PREMISE, COARSE_PREMISE), clutter="none",
                            background="road", object_fraction=(0.15, 0.25), gain_range=(0.9, 1.1),
                            white_balance=0.03, illumination=0.05)
STUDIES: dict[str, StudyConfig] = {"default": StudyConfig(), "premise": PREMISE_STUDY}


def regimes_by_name(names: str | list[str] | tuple[str, ...]) -> tuple[ShapeRule, ...]:
    """Default regimes picked by name ("large,tiny,medium" or a list), in the order given: another
    subset rule for the study (the generalisation check of the controlled study)."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    known = {r.name: r for r in DEFAULT_REGIMES}
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ConfigError(f"regimes: {unknown or wanted} unknown; choose from {', '.join(known)}")
    return tuple(known[n] for n in wanted)


def study_config(num_subsets: int = DEFAULT_NUM_SUBSETS, **overrides: object) -> StudyConfig:
    """A StudyConfig with the first ``num_subsets`` default regimes (large, tiny, thin, medium)."""
    if not 1 <= num_subsets <= len(DEFAULT_REGIMES):
        raise ConfigError(f"subsets must be in 1..{len(DEFAULT_REGIMES)} "
                          f"({', '.join(r.name for r in DEFAULT_REGIMES)}), got {num_subsets}")
    return StudyConfig(regimes=DEFAULT_REGIMES[:num_subsets], **overrides)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- geometry


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """Aspect ratios: as likely to be 2:1 as 1:2."""
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


@dataclass(frozen=True)
class ShapeDraft:
    """A shape centred at the origin, before rescaling to the budget and placement."""

    kind: str  # "ellipse", "rect", "line" or "bar" (an axis-aligned horizontal rectangle)
    width: float
    height: float  # for lines: width = bar width, height = length
    angle: float = 0.0  # lines only, radians

    @property
    def area(self) -> float:
        return self.width * self.height * (math.pi / 4 if self.kind == "ellipse" else 1.0)

    def scaled(self, factor: float) -> ShapeDraft:
        """Lines keep their width (thinness defines the regime) and scale their length by factor**2."""
        if self.kind == "line":
            return replace(self, height=self.height * factor**2)
        if self.kind == "bar":  # bars keep their thickness: the length takes the whole factor
            return replace(self, width=self.width * factor**2)
        return replace(self, width=self.width * factor, height=self.height * factor)

    def polygon(self) -> np.ndarray:
        """Vertices [V, 2] (x, y) around the origin."""
        if self.kind == "ellipse":
            t = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)
            return np.stack([self.width / 2 * np.cos(t), self.height / 2 * np.sin(t)], axis=1)
        hw, hh = self.width / 2, self.height / 2
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        if self.kind == "line":
            c, s = math.cos(self.angle), math.sin(self.angle)
            corners = corners @ np.array([[c, s], [-s, c]])
        return corners


def draft_shape(rule: ShapeRule, rng: np.random.Generator, image_height: int) -> ShapeDraft:
    size = _uniform(rng, rule.size) * image_height
    if rule.kind == "bar":
        return ShapeDraft("bar", _uniform(rng, rule.length) * image_height, size)
    if rule.kind == "line":
        length = _uniform(rng, rule.length) * image_height
        vertical = rng.random() < rule.vertical_fraction
        # angle 0 = vertical bar; poles lean at most ~8 degrees, wires take any direction
        angle = rng.normal(0.0, 0.07) if vertical else rng.uniform(0, np.pi)
        return ShapeDraft("line", size, length, float(angle))
    aspect = _log_uniform(rng, rule.aspect)
    kind = "ellipse" if rng.random() < 0.5 else "rect"
    return ShapeDraft(kind, size * math.sqrt(aspect), size / math.sqrt(aspect))


def fill_budget(rule: ShapeRule, budget: float, rng: np.random.Generator, image_height: int) -> list[ShapeDraft]:
    """Draft shapes until their area reaches ``budget``, then rescale them all to exactly ``budget``.

    So every geometry covers the same nominal area in an image, whatever its shape size: the
    per-class pixel fractions cannot reveal the regime.
    """
    drafts: list[ShapeDraft] = []
    while sum(d.area for d in drafts) < budget:
        drafts.append(draft_shape(rule, rng, image_height))
    factor = math.sqrt(budget / sum(d.area for d in drafts))
    return [d.scaled(factor) for d in drafts]


def window_drafts(shape: ShapeDraft, rule: ShapeRule, rng: np.random.Generator,
                  ) -> list[tuple[ShapeDraft, float, float]]:
    """Glass patches inside a blob: rectangles inside its inscribed rectangle, as (draft, dx, dy)."""
    fraction = rule.windows
    if fraction <= 0 or shape.kind == "line":
        return []
    inset = 1 / math.sqrt(2) if shape.kind == "ellipse" else 0.8  # inscribed rectangle of an ellipse
    inner_w, inner_h = shape.width * inset, shape.height * inset
    count = int(rng.integers(rule.window_count[0], rule.window_count[1] + 1))
    windows = []
    for _ in range(count):
        area = fraction * shape.area / count
        aspect = _log_uniform(rng, (0.5, 2.0))
        w = min(math.sqrt(area * aspect), inner_w)
        h = min(area / w, inner_h)
        dx = rng.uniform(-(inner_w - w) / 2, (inner_w - w) / 2)
        dy = rng.uniform(-(inner_h - h) / 2, (inner_h - h) / 2)
        windows.append((ShapeDraft("rect", w, h), float(dx), float(dy)))
    return windows


# ---------------------------------------------------------------------------------------------- raster


@dataclass(frozen=True)
class Placed:
    """A polygon placed in the image and its raster (a window [y0:y1, x0:x1] of the image)."""

    polygon: np.ndarray  # [V, 2] (x, y), image coordinates
    y0: int
    x0: int
    mask: np.ndarray  # bool [y1 - y0, x1 - x0]

    def full_mask(self, height: int, width: int) -> np.ndarray:
        full = np.zeros((height, width), dtype=bool)
        full[self.y0: self.y0 + self.mask.shape[0], self.x0: self.x0 + self.mask.shape[1]] = self.mask
        return full

    def region(self, array: np.ndarray) -> np.ndarray:
        return array[self.y0: self.y0 + self.mask.shape[0], self.x0: self.x0 + self.mask.shape[1]]

    def clipped_to(self, other: Placed) -> Placed:
        """This raster restricted to ``other``'s pixels, in ``other``'s window."""
        height, width = self.y0 + self.mask.shape[0], self.x0 + self.mask.shape[1]
        height, width = max(height, other.y0 + other.mask.shape[0]), max(width, other.x0 + other.mask.shape[1])
        return Placed(self.polygon, other.y0, other.x0, other.region(self.full_mask(height, width)) & other.mask)


def decode_rle(rle: list[dict] | dict) -> np.ndarray:
    """pycocotools' decode, minus the numpy-2 DeprecationWarning its Cython code raises on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def rasterize(polygon: np.ndarray, height: int, width: int) -> Placed:
    """Rasterise with pycocotools itself, so a COCO polygon decodes to exactly the pixels drawn."""
    polygon = np.round(polygon * POLYGON_GRID) / POLYGON_GRID
    x0 = max(0, math.floor(polygon[:, 0].min()))
    y0 = max(0, math.floor(polygon[:, 1].min()))
    x1 = min(width, math.ceil(polygon[:, 0].max()) + 1)
    y1 = min(height, math.ceil(polygon[:, 1].max()) + 1)
    local = (polygon - [x0, y0]).ravel().tolist()
    rle = mask_utils.frPyObjects([local], y1 - y0, x1 - x0)
    return Placed(polygon, y0, x0, decode_rle(rle)[:, :, 0].astype(bool))


def place(vertices: np.ndarray, rng: np.random.Generator, height: int, width: int,
          near: tuple[float, float, float] | None = None) -> np.ndarray:
    """Translate origin-centred vertices by an integer offset keeping them inside the image.

    Integer offsets keep pycocotools' rasterisation translation-invariant. ``near`` = (cx, cy, r)
    keeps the centre within r of (cx, cy) (crowds).
    """
    low = np.ceil(-vertices.min(axis=0))
    high = np.floor(np.array([width, height]) - vertices.max(axis=0))
    if near is not None:
        cx, cy, r = near
        low = np.maximum(low, np.ceil([cx - r, cy - r]))
        high = np.minimum(high, np.floor([cx + r, cy + r]))
    high = np.maximum(high, low)
    offset = np.array([rng.integers(low[0], high[0] + 1), rng.integers(low[1], high[1] + 1)], dtype=float)
    return vertices + offset


def fit_inside(shape: ShapeDraft, height: int, width: int) -> ShapeDraft:
    """Shrink a shape that cannot fit in the image (only ever the largest blobs)."""
    extent = np.ptp(shape.polygon(), axis=0)
    if shape.kind == "bar":  # a bar keeps its thickness
        return replace(shape, width=min(shape.width, width - 1.0))
    factor = min(1.0, (width - 1) / max(extent[0], 1e-6), (height - 1) / max(extent[1], 1e-6))
    return shape if factor >= 1 else replace(shape, width=shape.width * factor, height=shape.height * factor)


# ---------------------------------------------------------------------------------------------- scene


@dataclass
class SceneObject:
    """One object instance (the image's regime): its class, pixels and COCO encoding."""

    class_name: str
    placed: Placed
    windows: list[Placed]
    group: int  # crowd group index, -1 for a lone object
    encoding: str  # "polygon" or "rle"
    caps: float = 0.0  # bars: length in pixels of each class-coloured end cap; 0 = painted solid

    def painted(self) -> np.ndarray:
        """The pixels painted in the class colour, in ``placed``'s window: all of them for a solid
        object, the two end caps of a bar (the rest of a bar is its glass body)."""
        mask = self.placed.mask
        if self.caps <= 0:
            return mask
        columns = np.flatnonzero(mask.any(axis=0))
        x = np.arange(mask.shape[1])
        ends = (x < columns[0] + self.caps) | (x > columns[-1] - self.caps)
        return mask & ends[None, :]


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    label_ids: np.ndarray  # uint8 [H, W], Cityscapes labelIds
    objects: list[SceneObject]
    subset: int  # index into config.regimes, EMPTY_SUBSET for an object-free image


def background_layout(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Sky, a skyline of buildings and trees, a sidewalk band, the road: labelIds [H, W]."""
    labels = np.full((height, width), LABEL_ID_BY_NAME["sky"], dtype=np.uint8)
    horizon = int(height * rng.uniform(0.42, 0.55))
    x = 0
    while x < width:
        block = max(2, int(width * rng.uniform(0.06, 0.22)))
        top = max(0, horizon - int(height * rng.uniform(0.12, 0.38)))
        name = "building" if rng.random() < 0.7 else "vegetation"
        labels[top:horizon, x: x + block] = LABEL_ID_BY_NAME[name]
        x += block
    road_top = min(height - 1, horizon + int(height * rng.uniform(0.06, 0.14)))
    labels[horizon:road_top] = LABEL_ID_BY_NAME["sidewalk"]
    labels[road_top:] = LABEL_ID_BY_NAME["road"]
    for _ in range(int(rng.integers(0, 4))):  # bushes straddling the sidewalk
        bush = ShapeDraft("ellipse", width * rng.uniform(0.05, 0.15), height * rng.uniform(0.06, 0.14))
        centre = [rng.uniform(0, width), horizon + rng.uniform(-0.05, 0.05) * height]
        placed = rasterize(bush.polygon() + centre, height, width)
        placed.region(labels)[placed.mask] = LABEL_ID_BY_NAME["vegetation"]
    return labels


def jittered_palette(config: StudyConfig, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Class colours for this image (keyed by labelId), each shifted by a random per-image offset."""
    palette = {**BACKGROUND_PALETTE, **{c: OBJECT_PALETTE[c] for c in config.object_classes}}
    return {LABEL_ID_BY_NAME[name]: np.array(rgb, float) + rng.normal(0, config.colour_jitter, 3)
            for name, rgb in palette.items()}


def paint_background(labels: np.ndarray, palette: dict[int, np.ndarray]) -> np.ndarray:
    lut = np.zeros((256, 3))
    for label_id, rgb in palette.items():
        lut[label_id] = rgb
    return lut[labels]


def placed_with_windows(draft: ShapeDraft, rule: ShapeRule, rng: np.random.Generator, height: int, width: int,
                        near: tuple[float, float, float] | None = None) -> tuple[Placed, list[Placed]]:
    """Place a shape (and its glass windows, clipped to it so they never spill outside)."""
    draft = fit_inside(draft, height, width)
    vertices = place(draft.polygon(), rng, height, width, near)
    centre = (vertices.max(axis=0) + vertices.min(axis=0)) / 2
    shape = rasterize(vertices, height, width)
    windows = [rasterize(w.polygon() + centre + [dx, dy], height, width).clipped_to(shape)
               for w, dx, dy in window_drafts(draft, rule, rng)]
    return shape, windows


def add_shadows(image: np.ndarray, drafts: list[ShapeDraft], rule: ShapeRule, config: StudyConfig,
                rng: np.random.Generator, glass: np.ndarray) -> None:
    """Clutter: the other regimes' geometry as darkened (slightly tinted) background, label unchanged."""
    height, width = image.shape[:2]
    for draft in drafts:
        placed, windows = placed_with_windows(draft, rule, rng, height, width)
        factor = _uniform(rng, config.shadow_range) * (1 + rng.normal(0, config.shadow_tint, 3))
        region = placed.region(image)
        region[placed.mask] *= factor
        for window in windows:
            window.region(image)[window.mask] = glass


def add_puddles(image: np.ndarray, drafts: list[ShapeDraft], rng: np.random.Generator, glass: np.ndarray) -> None:
    """Glass blobs on the background, labelled as the background under them (see ShapeRule.puddle_share)."""
    height, width = image.shape[:2]
    for draft in drafts:
        placed = rasterize(place(fit_inside(draft, height, width).polygon(), rng, height, width), height, width)
        placed.region(image)[placed.mask] = glass


def add_decoys(image: np.ndarray, drafts: list[ShapeDraft], rule: ShapeRule, config: StudyConfig,
               rng: np.random.Generator, palette: dict[int, np.ndarray], glass: np.ndarray) -> None:
    """Clutter in ``decoy`` mode: the other regimes' geometry painted like objects, label unchanged."""
    height, width = image.shape[:2]
    for draft in drafts:
        placed, windows = placed_with_windows(draft, rule, rng, height, width)
        colour = palette[LABEL_ID_BY_NAME[_draw_class(config, rng)]] + rng.normal(0, config.instance_jitter, 3)
        placed.region(image)[placed.mask] = colour
        for window in windows:
            window.region(image)[window.mask] = glass


def _draw_class(config: StudyConfig, rng: np.random.Generator) -> str:
    weights = np.array(config.class_weights) / sum(config.class_weights)
    return config.object_classes[int(rng.choice(len(weights), p=weights))]


def place_objects(drafts: list[ShapeDraft], rule: ShapeRule, config: StudyConfig,
                  rng: np.random.Generator) -> list[SceneObject]:
    """Objects do not overlap, so each COCO polygon is exactly its visible pixels."""
    height, width = config.height, config.width
    occupied = np.zeros((height, width), dtype=bool)
    crowd = rule.crowd_probability > 0 and rng.random() < rule.crowd_probability
    crowd_count = int(rng.integers(rule.crowd_size[0], rule.crowd_size[1] + 1)) if crowd else 0
    crowd_class = _draw_class(config, rng)
    radius = rule.crowd_radius * height
    crowd_centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius), radius)
    encoding = "rle" if rule.windows > 0 else "polygon"
    objects = []
    for i, draft in enumerate(drafts):
        in_crowd = i < crowd_count
        class_name = crowd_class if in_crowd else _draw_class(config, rng)
        for _ in range(MAX_PLACEMENT_TRIES):
            placed, windows = placed_with_windows(draft, rule, rng, height, width, crowd_centre if in_crowd else None)
            if placed.mask.any() and not placed.region(occupied)[placed.mask].any():
                placed.region(occupied)[placed.mask] = True
                caps = rule.caps * draft.height if rule.kind == "bar" else 0.0
                objects.append(SceneObject(class_name, placed, windows, 0 if in_crowd else -1, encoding, caps))
                break
    return objects


def paint_objects(image: np.ndarray, labels: np.ndarray, objects: list[SceneObject], palette: dict[int, np.ndarray],
                  config: StudyConfig, rng: np.random.Generator, glass: np.ndarray) -> None:
    for obj in objects:
        label_id = LABEL_ID_BY_NAME[obj.class_name]
        colour = palette[label_id] + rng.normal(0, config.instance_jitter, 3)
        if obj.caps > 0:  # a bar's body is glass, whatever its class
            obj.placed.region(image)[obj.placed.mask] = glass
        obj.placed.region(image)[obj.painted()] = colour
        obj.placed.region(labels)[obj.placed.mask] = label_id
        for window in obj.windows:  # glass is part of its object: labelled as the object
            window.region(image)[window.mask] = glass
            window.region(labels)[window.mask] = label_id


def finish_image(image: np.ndarray, config: StudyConfig, rng: np.random.Generator) -> np.ndarray:
    """Photometric nuisances shared by every regime: gain, white balance, illumination ramp, noise."""
    height, width = image.shape[:2]
    gain = _uniform(rng, config.gain_range) * (1 + rng.uniform(-config.white_balance, config.white_balance, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (np.cos(angle) * (xx / width - 0.5) + np.sin(angle) * (yy / height - 0.5)) * 2 * config.illumination
    image = image * gain * (1 + ramp[..., None])
    grain = rng.normal(0, config.mottling, (height // 4 + 1, width // 4 + 1, 3)).astype(np.float32)
    mottling = np.stack([np.asarray(Image.fromarray(grain[..., c]).resize((width, height), Image.BILINEAR))
                         for c in range(3)], axis=-1)
    image = image + mottling + rng.normal(0, config.pixel_noise, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate_scene(config: StudyConfig, subset: int, rng: np.random.Generator) -> Scene:
    """One image of regime ``subset`` (or with no objects at all for EMPTY_SUBSET)."""
    height, width = config.height, config.width
    if config.background == "road":
        labels = np.full((height, width), LABEL_ID_BY_NAME["road"], dtype=np.uint8)
    else:
        labels = background_layout(rng, height, width)
    palette = jittered_palette(config, rng)
    glass = np.array(GLASS_COLOUR, float) + rng.normal(0, config.colour_jitter, 3)
    image = paint_background(labels, palette)
    budget = _uniform(rng, config.object_fraction) * height * width
    object_drafts: list[ShapeDraft] = []
    decoys = config.clutter == "decoy"
    for index, rule in enumerate(config.regimes):
        if index == subset:
            object_drafts = fill_budget(rule, budget * rule.object_share, rng, height)
            if rule.puddle_share > 0:
                add_puddles(image, fill_budget(PUDDLE, budget * rule.puddle_share, rng, height), rng, glass)
        elif config.clutter == "none":
            continue
        elif decoys:
            add_decoys(image, fill_budget(rule, budget * config.decoy_fraction, rng, height), rule, config, rng,
                       palette, glass)
        else:
            add_shadows(image, fill_budget(rule, budget, rng, height), rule, config, rng, glass)
    objects = place_objects(object_drafts, config.regimes[subset], config, rng) if subset >= 0 else []
    paint_objects(image, labels, objects, palette, config, rng, glass)
    return Scene(finish_image(image, config, rng), labels, objects, subset)


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
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} is not empty; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
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
