"""Drawing one scene of a controlled study (``divdr.data.study``): shape drafts, their raster, the image.

A scene is drawn from its own random stream (``divdr.data.synthetic.scene_rng``): background layout and
palette, the objects of its regime (rescaled to the image's object budget), the clutter of the other
regimes, the photometric nuisances. Rasterisation goes through pycocotools itself, so a COCO polygon read
back from the exported JSON decodes to exactly the pixels drawn.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from divdr.data.labels import LABEL_ID_BY_NAME
from divdr.data.study import (
    BACKGROUND_PALETTE,
    GLASS_COLOUR,
    OBJECT_PALETTE,
    PUDDLE,
    ShapeRule,
    StudyConfig,
)

MAX_PLACEMENT_TRIES = 40
ELLIPSE_VERTICES = 20
# Vertices sit on a 1/8-pixel grid: exact in binary floating point and in JSON, so pycocotools
# rasterises a polygon read back from the JSON to exactly the pixels drawn here.
POLYGON_GRID = 8


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
