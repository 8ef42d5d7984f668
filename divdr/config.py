"""Frozen dataclass configs: model sizes, gates, budget, clustering and resource losses, and the presets.

YAML lives only at the edges (experiment files, tune spaces); here everything is typed and
validated on construction, so a bad value fails where it is made, with its name in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args, get_type_hints

GateKind = str  # a registered gate family: "soft" (DR) or "gumbel" (DRNets); see divdr.gates
ClusterDistance = Literal["l2", "squared_l2"]
KMeansStart = Literal["warm", "fresh"]
OnUnstable = Literal["pause", "hold"]
Membership = Literal["nearest", "kmeans"]
Correctness = Literal["pixels", "image"]

NUM_SCALES = 4  # 1/4, 1/8, 1/16, 1/32 (DR paper, Fig. 2)
# DivDR's Layer17 (COCO): the last layer gets a fifth cell at 1/64, so the backbone ends in the
# five levels of FPN's P2-P6 (see ModelConfig.final_scales).
FPN_SCALES = 5


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class TemperatureConfig:
    """DRNets' two-stage temperature schedule for the Gumbel-Softmax gates (Sec. 3.3, 4.1).

    Stage 1 (the first ``pretrain_fraction`` of training) holds tau at ``pretrain`` so every branch
    is trained; stage 2 resets tau to ``start`` and anneals it exponentially to ``final`` at the end
    of training. Defaults are the paper's CIFAR-10 values: tau = 3 in pre-training, then 1.0 annealed
    to 0.5; both stages run equally long (1200 epochs each), hence ``pretrain_fraction = 0.5``.
    """

    pretrain: float = 3.0
    start: float = 1.0
    final: float = 0.5
    pretrain_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("pretrain", "start", "final"):
            value = getattr(self, name)
            _require(value > 0, f"gate.temperature.{name} must be > 0, got {value}")
        _require(self.final <= self.start,
                 f"gate.temperature.final must be <= gate.temperature.start (annealing lowers tau), "
                 f"got final={self.final}, start={self.start}")
        _require(0 <= self.pretrain_fraction <= 1,
                 f"gate.temperature.pretrain_fraction must be in [0, 1], got {self.pretrain_fraction}")


@dataclass(frozen=True)
class GateConfig:
    """Which gate family weighs each cell's paths [up, keep, down].

    ``soft``: DR's soft conditional gate (Sec. 3.2), max(0, tanh). ``gumbel``: DRNets' RouterNet
    whose importance weights are recalibrated with Gumbel-Softmax at temperature tau in training,
    and at inference keep the top-k branches whose weights add up to ``threshold`` (rescaled to
    sum to 1, the others exactly 0). ``bias_init`` is the soft gate's; ``threshold``,
    ``max_branches``, ``skip_branch`` and ``temperature`` are the gumbel gate's (ignored by the
    soft gate).

    ``enabled=False`` keeps every path open with weight 1 and no gate modules: the paper's
    "Network-Fix" (DR Table 3).
    """

    kind: GateKind = "soft"
    enabled: bool = True
    small_gate: bool = True  # official Layer16 configs: bilinear-downsample the gate input by 4
    bias_init: float = 1.5  # official GATE_INIT_BIAS: tanh(1.5) = 0.905, every path starts open
    threshold: float = 0.8  # DRNets' T: the paper's results are "-T-0.8"
    max_branches: int = 0  # optional cap on k at inference; 0 = as many as the threshold needs
    # DRNets' fast-forward branch: a 4th router output "skip the cell" (the input passes through,
    # DR's drop-cell). Off, the branches are the cell's paths only and the cell operation always runs.
    skip_branch: bool = False
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    # Not in the papers: each gate normalises what it looks at per image and per channel (zero mean,
    # unit variance over the map, no learned affine) before its own layers, so a global change of
    # brightness or colour balance, which shifts and scales the early features of the whole image,
    # cannot move the route. The cell operation still sees the raw input.
    input_norm: bool = False
    # Not in the papers (soft gates): the slope, relative to tanh', of the gradient a closed gate gets
    # (0 = the paper: max(0, tanh) has none). A path whose gate is closed for every image gets no gradient
    # from the task, the budget or eq. 2, so it can never reopen; on the premise study the per-image
    # budget closed the path one regime needed, for good (docs/2026-11-26-premise-study.md). The
    # forward, and so the zeros that let inference skip paths, are unchanged.
    closed_gradient: float = 0.0

    def __post_init__(self) -> None:
        from divdr.gates import GATE_FAMILIES  # the registry (a gate family registers itself there)

        _require(self.kind in GATE_FAMILIES,
                 f"gate.kind must be {' or '.join(map(repr, GATE_FAMILIES))}, got {self.kind!r}")
        _require(0 < self.threshold <= 1, f"gate.threshold must be in (0, 1], got {self.threshold}")
        _require(0 <= self.closed_gradient <= 1,
                 f"gate.closed_gradient must be in [0, 1] (0 = the paper's gate), got {self.closed_gradient}")
        _require(isinstance(self.max_branches, int) and self.max_branches >= 0,
                 f"gate.max_branches must be an integer >= 0 (0 = no cap), got {self.max_branches!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A DR network: stem, routing space of ``layers`` layers and base width ``channels``, decoder."""

    layers: int = 16
    channels: int = 64
    num_classes: int = 19
    gate: GateConfig = field(default_factory=GateConfig)
    # The official code puts one gated cell at 1/4 right after the stem (the "initial layer").
    # DR's Layer16 A-space (DivDR Fig. 4) has 61 x 3 = 183 dims, i.e. without it. The cell exists
    # either way; this only says whether its 3 gate values are part of A(x).
    init_cell_in_a_space: bool = False
    # Scales of the last layer. 4: DR's segmentation space. 5: DivDR's Layer17 for COCO ("another
    # 5-stage layer to keep consistent with FPN, bringing 17 layers in total"): Layer16's 16 layers,
    # now all with up/down paths, then a 17th layer of 5 cells (1/4 .. 1/64; the 1/64 cell is fed
    # by the 1/32 cell's down path). Cells: 61 + 5 = 66, A-space 66 x 3 = 198, the paper's figure,
    # with the same A(x) convention as Layer16 (initial cell left out). The other reading that also
    # gives 198, 17 four-scale layers (65 cells) plus the initial cell, is
    # ``layers=17, final_scales=4, init_cell_in_a_space=True``.
    final_scales: int = NUM_SCALES
    # Normalisation layers: "batch" (BN, the paper's) or "group" (GroupNorm, not in the paper): with
    # BN an image's A(x) in training depends on its batch and differs from its eval-mode A(x); with
    # GroupNorm it does not (counted like BN in the FLOPs: one op per element).
    norm: str = "batch"
    # A fixed route (not in the papers): the scales a one-route network may use, e.g. (0,) for the
    # 1/4 column or (2,) for the 1/16 column (see divdr.routing.route_paths). Every other path is
    # closed for good (weight 0, never computed); the gates, if enabled, weigh the open ones. () =
    # the whole routing space. The controlled study's one-route experts are built with it.
    route: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(self.norm in ("batch", "group"), f"model.norm must be 'batch' or 'group', got {self.norm!r}")
        _require(all(isinstance(s, int) and 0 <= s < self.final_scales for s in self.route)
                 and len(set(self.route)) == len(self.route),
                 f"model.route must list distinct scales in 0..{self.final_scales - 1}, got {self.route}")
        _require(self.layers >= 3, f"model.layers must be >= 3 (all four scales appear at layer 2), got {self.layers}")
        _require(self.channels >= 2 and self.channels % 2 == 0,
                 f"model.channels must be an even integer >= 2, got {self.channels}")
        _require(self.num_classes >= 1, f"model.num_classes must be >= 1, got {self.num_classes}")
        _require(self.final_scales in (NUM_SCALES, FPN_SCALES),
                 f"model.final_scales must be {NUM_SCALES} (DR) or {FPN_SCALES} (Layer17, FPN levels), "
                 f"got {self.final_scales}")
        # the 1/64 cell is fed by the 1/32 cell of the layer before, which exists from layer 2 on
        _require(self.final_scales == NUM_SCALES or self.layers >= 4,
                 f"model.final_scales={FPN_SCALES} needs model.layers >= 4 (the layer before the last "
                 f"must hold the 1/32 cell), got {self.layers}")

    @property
    def cells_per_layer(self) -> tuple[int, ...]:
        """``[2, 3, 4] + [4] * (L - 3)``: layer l has the scales 0 .. min(l + 1, 3); with
        ``final_scales=5`` the last layer has 5 (1/4 .. 1/64)."""
        counts = tuple(min(layer + 2, NUM_SCALES) for layer in range(self.layers))
        return (*counts[:-1], FPN_SCALES) if self.final_scales == FPN_SCALES else counts

    @property
    def num_scales(self) -> int:
        """Scales of the backbone's output features (those of the last layer)."""
        return self.cells_per_layer[-1]

    @property
    def routing_cells(self) -> int:
        return sum(self.cells_per_layer)

    @property
    def a_dim(self) -> int:
        """Dimension of the gate activation vector A(x): 3 slots [up, keep, down] per cell."""
        return 3 * (self.routing_cells + int(self.init_cell_in_a_space))


@dataclass(frozen=True)
class BudgetConfig:
    """DR eq. 9: ``weight * (C_expected / C_max - mu)^2``, switched on late in training.

    The official code (dynamic4seg.py) turns it on at 40% of training (UNUPDATE_RATE) and
    ramps its weight linearly over the next 2% of training.
    """

    weight: float = 0.0  # lambda (DR) / lambda1 (DivDR)
    mu: float = 0.1
    start_fraction: float = 0.4
    warmup_fraction: float = 0.02
    # Not in the paper: the square per image, then the batch mean, so *every* image must meet mu
    # (the official code squares the batch mean: images may trade cost with one another).
    per_image: bool = False
    # Not in the paper: a ceiling instead of a target, ``max(0, C/C_max - mu)^2``. The paper's square
    # also pushes a route cheaper than mu to spend more; with ``per_image`` that pulls every image
    # towards one cost, the opposite of routes that cost what their subset needs. Once a route is
    # under mu the budget leaves it alone.
    one_sided: bool = False
    # Not in the paper: the budget stops at this fraction of training (1.0 = never, the paper): it
    # shapes the routes, and once eq. 2 holds them its squeeze on the paths one subset keeps can be
    # lifted (paths closed for the other subset stay closed: a closed max(0, tanh) gate gets no
    # gradient). Neither option kept the premise study's regimes in every seed
    # (docs/2026-11-26-premise-study.md, "What keeps the regimes late").
    end_fraction: float = 1.0

    def __post_init__(self) -> None:
        _require(self.weight >= 0, f"budget.weight (lambda1) must be >= 0, got {self.weight}")
        _require(0 <= self.mu <= 1, f"budget.mu must be in [0, 1], got {self.mu}")
        _require(0 <= self.start_fraction <= 1, f"budget.start_fraction must be in [0, 1], got {self.start_fraction}")
        _require(self.warmup_fraction >= 0, f"budget.warmup_fraction must be >= 0, got {self.warmup_fraction}")
        _require(self.end_fraction == 1 or self.start_fraction < self.end_fraction < 1,
                 f"budget.end_fraction must be in (budget.start_fraction, 1], got {self.end_fraction} "
                 f"(start_fraction {self.start_fraction})")


@dataclass(frozen=True)
class ClusteringConfig:
    """DivDR eq. 2 and the K-means alternation (Sec. 4, supplementary 7.1)."""

    weight: float = 0.0  # lambda2; 0 = DR (the clusters are still computed, for measurement)
    k: int = 3
    alpha: float = 0.0
    # DivDR eq. 2 as printed uses the plain L2 distance in the exponent while sigma^2 is a mean
    # squared distance; the magnet loss it adapts uses squared distances in both places.
    distance: ClusterDistance = "l2"
    update_every: int = 50  # K-means every N iterations (paper: 50; <= 100 works)
    # optional annealing of the K-means period: update_every grows linearly to this by the end
    update_every_final: int = 0  # 0 = fixed period
    # Not in the paper: equal-size clusters (SwAV's Sinkhorn-Knopp equipartition inside K-means)
    # against collapse onto one dominant cluster; assumes subsets of similar size.
    balanced: bool = False
    # Not in the paper (which applies eq. 2 from the first K-means on): the clustering loss is 0 before
    # ``start_fraction`` of training, then its weight ramps linearly to lambda2 over ``warmup_fraction``
    # (like the budget loss), so eq. 2 first acts on a partition of routes that have formed.
    start_fraction: float = 0.0
    warmup_fraction: float = 0.0
    # K-means initialisation at each update: "warm" from the previous centres (cluster k stays cluster
    # k; SPEC) or "fresh" (k-means++ every time: a partition found early cannot lock in).
    kmeans_start: KMeansStart = "warm"
    # Not in the paper: a floor under the sigma^2 of eq. 2 (0 = none, the paper's K-means variance).
    # Eq. 2 divides distances by 2 sigma^2, and sigma^2 is the within-cluster variance that the loss
    # itself shrinks: on the premise study it fell from ~0.3 to 0.007, the pull grew ~40x and the
    # clusters collapsed onto two routes. With a floor the hinge is met once clusters are
    # 2 * alpha * floor apart, and the pull stops growing.
    sigma2_min: float = 0.0
    # Not in the paper: eq. 2 uses a centre version only when its partition differs from the previous
    # version's in at most this fraction of the points, up to a relabelling of the clusters; otherwise
    # eq. 2 pauses until the next version (0 = off: every version is used). On the premise study the
    # regimes are K-means' partition of A(x) in almost every update, but now and then a cell's gates
    # switch, and for one or two updates which images have switched is the best partition (seed 2:
    # recovery 0.99 at step 1400, 0.70 at step 1500 where eq. 2 started, 0.62-0.98 after): eq. 2 then pulls
    # towards a partition that is gone 50 steps later. A partition that persists is used; a flip is not.
    stable_max_change: float = 0.0
    # What eq. 2 does with a version whose partition changed more than ``stable_max_change``: "pause"
    # (no clustering loss until a version agrees with the one before it) or "hold" (keep pulling towards
    # the last version that persisted: its centres and sigma^2). On the premise study a pause also came
    # where the regimes' routes drifted together (changes of 0.05-0.08 over 2-3 updates), and the drift
    # went on without eq. 2 against it until the regimes merged (seed 1: Inter 1.2 -> 0.13).
    on_unstable: OnUnstable = "pause"
    # Which centre is an image's own in eq. 2: "nearest" to its A(x) now (the paper's mu(x)), or "kmeans":
    # the cluster the last K-means update put it in (with ``on_unstable: hold``, the last update that
    # persisted), as magnet loss [35] assigns its points; an image K-means has not seen uses the nearest.
    # Not in the paper. With "nearest", an image whose routes cross the midpoint between two centres is
    # pulled on into the other cluster, so eq. 2 completes a switch of routes it should resist; with
    # "kmeans" it is pulled back to its cluster until K-means moves it (premise study, twelfth session).
    membership: Membership = "nearest"

    def __post_init__(self) -> None:
        _require(self.weight >= 0, f"clustering.weight (lambda2) must be >= 0, got {self.weight}")
        _require(0 <= self.stable_max_change < 1,
                 f"clustering.stable_max_change must be in [0, 1) (0 = off), got {self.stable_max_change}")
        _require(self.sigma2_min >= 0, f"clustering.sigma2_min must be >= 0, got {self.sigma2_min}")
        _require(self.k >= 1, f"clustering.k must be >= 1, got {self.k}")
        # With one centre eq. 2 has no other centre to push from: the loss is identically 0 and "DivDR"
        # would silently train as DR. (K = 1 with lambda2 = 0 only measures; Inter is then NaN.)
        _require(not (self.weight > 0 and self.k < 2),
                 f"clustering.k must be >= 2 when the clustering loss is on (clustering.weight (lambda2) = "
                 f"{self.weight} > 0), got {self.k}: with one cluster eq. 2 is identically 0")
        _require(self.alpha >= 0, f"clustering.alpha must be >= 0, got {self.alpha}")
        # With two centres the own centre is the nearest, so eq. 2 is max(0, alpha - positive) = 0 when
        # alpha = 0: "DivDR" would silently train as DR.
        _require(not (self.weight > 0 and self.k == 2 and self.alpha == 0),
                 "clustering.alpha = 0 with clustering.k = 2 makes the clustering loss identically 0 "
                 "(the own centre is always the nearer one); set clustering.alpha > 0 (e.g. 1.0)")
        _require(self.distance in ("l2", "squared_l2"),
                 f"clustering.distance must be 'l2' or 'squared_l2', got {self.distance!r}")
        _require(self.update_every >= 1, f"clustering.update_every must be >= 1, got {self.update_every}")
        _require(self.update_every_final >= 0,
                 f"clustering.update_every_final must be >= 0, got {self.update_every_final}")
        _require(0 <= self.start_fraction <= 1,
                 f"clustering.start_fraction must be in [0, 1], got {self.start_fraction}")
        _require(self.warmup_fraction >= 0, f"clustering.warmup_fraction must be >= 0, got {self.warmup_fraction}")
        _require(self.on_unstable in ("pause", "hold"),
                 f"clustering.on_unstable must be 'pause' or 'hold', got {self.on_unstable!r}")
        _require(self.membership in ("nearest", "kmeans"),
                 f"clustering.membership must be 'nearest' or 'kmeans', got {self.membership!r}")
        _require(self.kmeans_start in ("warm", "fresh"),
                 f"clustering.kmeans_start must be 'warm' or 'fresh', got {self.kmeans_start!r}")


@dataclass(frozen=True)
class ResourceConfig:
    """DRNets' resource regulariser (eq. 8): ``weight * 1[correct] * log E[R]``, an alternative to
    DR's budget loss. E[R] is the expected routing cost relative to everything open (the same
    C(Space)/C_max as the budget loss): normalising shifts log E[R] by a constant and leaves its
    gradient unchanged.

    "Correct" for segmentation (eq. 8 is for classification): ``pixels`` applies eq. 8 to every
    pixel, each with its own 1[y_hat = y] and its image's E[R], and averages over the image: the
    indicator becomes the image's pixel accuracy. ``image`` counts an image as correct when its
    pixel accuracy reaches ``image_accuracy`` (not a paper figure). The paper adds the term in the
    fine-tuning stage: from ``start_fraction`` on (= the temperature schedule's pretrain_fraction).
    """

    weight: float = 0.0  # lambda of eq. 8 ("DRNet-R-lambda"; the paper's main results use 0.1)
    start_fraction: float = 0.5
    correct: Correctness = "pixels"
    image_accuracy: float = 0.9

    def __post_init__(self) -> None:
        _require(self.weight >= 0, f"resource.weight (lambda of DRNets eq. 8) must be >= 0, got {self.weight}")
        _require(0 <= self.start_fraction <= 1,
                 f"resource.start_fraction must be in [0, 1], got {self.start_fraction}")
        _require(self.correct in ("pixels", "image"),
                 f"resource.correct must be 'pixels' or 'image', got {self.correct!r}")
        _require(0 < self.image_accuracy <= 1, f"resource.image_accuracy must be in (0, 1], got {self.image_accuracy}")


@dataclass(frozen=True)
class Preset:
    """A row of DR Table 4 / DivDR Tables 1-5 / DRNets Table 3: the gate family and the loss
    weights that define a method."""

    name: str
    budget: BudgetConfig
    clustering: ClusteringConfig
    resource: ResourceConfig = field(default_factory=ResourceConfig)
    gate: GateKind = "soft"


# DivDR sweeps lambda2; 0.5 is a starting point for the DivDR presets, not a paper figure.
DEFAULT_DIVDR_LAMBDA2 = 0.5
# DRNets' main results are "DRNet-R-0.1-T-0.8" (Table 1): regularisation strength 0.1.
DEFAULT_DRNET_LAMBDA = 0.1

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("DR-A", BudgetConfig(weight=0.8, mu=0.1), ClusteringConfig(weight=0.0)),
        Preset("DR-B", BudgetConfig(weight=0.5, mu=0.1), ClusteringConfig(weight=0.0)),
        Preset("DR-C", BudgetConfig(weight=0.5, mu=0.2), ClusteringConfig(weight=0.0)),
        Preset("DR-Raw", BudgetConfig(weight=0.0), ClusteringConfig(weight=0.0)),
        Preset("DivDR-A", BudgetConfig(weight=0.8, mu=0.1), ClusteringConfig(weight=DEFAULT_DIVDR_LAMBDA2)),
        Preset("DivDR-Raw", BudgetConfig(weight=0.0), ClusteringConfig(weight=DEFAULT_DIVDR_LAMBDA2)),
        # DRNets' gate family on the same routing space, with eq. 8 instead of the budget loss
        Preset("DRNet-A", BudgetConfig(weight=0.0), ClusteringConfig(weight=0.0),
               ResourceConfig(weight=DEFAULT_DRNET_LAMBDA), gate="gumbel"),
        Preset("DivDRNet-A", BudgetConfig(weight=0.0), ClusteringConfig(weight=DEFAULT_DIVDR_LAMBDA2),
               ResourceConfig(weight=DEFAULT_DRNET_LAMBDA), gate="gumbel"),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# Model sizes. layer16/layer33 are the paper's (C=64); the small ones train in minutes on 2 CPU cores.
MODEL_SIZES: dict[str, ModelConfig] = {
    "layer16": ModelConfig(layers=16, channels=64),
    "layer33": ModelConfig(layers=33, channels=64),
    # DivDR's COCO backbone (Tables 3-5): 66 cells, A-space 198 (see ModelConfig.final_scales)
    "layer17": ModelConfig(layers=17, channels=64, final_scales=FPN_SCALES),
    "small": ModelConfig(layers=8, channels=32),
    "tiny": ModelConfig(layers=6, channels=16),
    "micro": ModelConfig(layers=3, channels=8),
}


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_SIZES:
        raise ConfigError(f"unknown model size {name!r}; choose one of {sorted(MODEL_SIZES)}")
    return replace(MODEL_SIZES[name], **overrides) if overrides else MODEL_SIZES[name]


def _number(value: Any, expected: type, where: str) -> int | float:
    """``value`` as an ``expected`` (int or float) number. Non-finite values are refused: no field here
    means anything by inf or nan (``float('inf')`` would train at an infinite learning rate, and
    ``int(inf)`` raises a bare OverflowError)."""
    given = value  # named in the message as written (a YAML string stays a string)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {given!r}")
    if expected is int:
        if float(value) != int(value):
            raise ConfigError(f"{where} must be an integer, got {given!r}")
        return int(value)
    return float(value)


def _tuple_item_type(cls: type, name: str) -> type | None:
    """The element type of a ``tuple[int, ...]`` / ``tuple[int, int]`` field (None if not one type)."""
    item_types = {t for t in get_args(get_type_hints(cls).get(name)) if t is not Ellipsis}
    return item_types.pop() if len(item_types) == 1 else None


def _coerce(value: Any, default: Any, where: str, item_type: type | None = None) -> Any:
    """Check a value against the type of the field's default; YAML spellings are forgiven
    (``1e30`` is a string to YAML 1.1, lists stand for tuples, 2 for 2.0). ``item_type``: a tuple
    field's element type, each element checked like a field of that type."""
    expected = type(default)
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if expected in (int, float):
        return _number(value, expected, where)
    if expected is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if item_type not in (int, float):
            return tuple(value)
        try:
            return tuple(_number(item, item_type, f"{where}[{i}]") for i, item in enumerate(value))
        except ConfigError as err:
            raise ConfigError(f"{err} (in {where} = {value!r})") from None
    if expected is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def config_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build a (nested) frozen dataclass from a plain dict, rejecting unknown keys by name.

    Every config class here has defaults for all fields, so missing keys take the default.
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(known)}")
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        if hasattr(default, "__dataclass_fields__"):
            kwargs[name] = config_from_dict(type(default), value, f"{where}.{name}")
        else:
            item_type = _tuple_item_type(cls, name) if isinstance(default, tuple) else None
            kwargs[name] = _coerce(value, default, f"{where}.{name}", item_type)
    try:
        return cls(**kwargs)
    except TypeError as err:  # e.g. a wrong type that dataclasses cannot take
        raise ConfigError(f"invalid value in {where}: {err}") from err
