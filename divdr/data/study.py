"""What a generated controlled study is: its regimes ("hidden subsets") and everything that shapes its images.

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

import math
from dataclasses import dataclass
from typing import Literal

from divdr.config import ConfigError

ShapeKind = Literal["blob", "line", "bar"]
Clutter = Literal["shadow", "decoy", "none"]
Background = Literal["street", "road"]
MIN_IMAGE_SIDE = 32  # the coarsest routing scale is 1/32

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
