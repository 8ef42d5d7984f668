"""Tune spaces: a small YAML schema for the paper's ablations, validated when loaded.

```yaml
name: k                      # sweep name (MLflow parent run, output folder)
description: DivDR Table 3   # free text
preset: DivDR-A              # base preset of every trial (a grid over `preset` overrides it)
seeds: 3                     # every setting is trained with seeds 0 .. seeds-1 (mean +- std)
metric: miou                 # the metric the report sorts by (max)
config: ../configs/premise.yaml  # optional: an experiment file (relative to this file) under `base`
base:                        # experiment overrides shared by all trials (same keys as --set / YAML files)
  model_size: tiny
  train: {steps: 900}
grid:                        # every combination of these values is a setting
  clustering.k: [2, 3, 4]
sample:                      # optional: random draws, `num_samples` settings
  clustering.alpha: {loguniform: [0.01, 1.0]}   # or {uniform: [lo, hi]} or {choice: [a, b]}
variants:                    # optional: named bundles of overrides, one setting each (x grid x sample):
  default: {}                #   one-lever-at-a-time ablations ("each lever on and off")
  no-budget: {budget.weight: 0.0}
num_samples: 1
max_concurrent: 0            # 0 = as many as the cluster's CPUs allow
scheduler:                   # optional: stop bad trials early on their periodic val/<metric>
  asha: {grace_period: 300, reduction_factor: 3}   # or median: {grace_period: 300}
```

A scheduler acts on what trials report while they train: every ``train.eval_every`` steps (required),
``val/<metric>`` is reported to Tune under ``<metric>`` with ``step`` as its time. Population-based
training is not offered: it would restart one trial from another's checkpoint, and a DivDR trial's
state is also its centroid store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from divdr.config import PRESETS, ConfigError
from pipeline.columns import REPORT_METRICS
from pipeline.config import deep_merge, from_dict, load_experiment, load_yaml, set_dotted

DISTRIBUTIONS = ("uniform", "loguniform", "choice")
# what each top-level key holds, checked before anything reads it (a list where a mapping belongs
# would otherwise fail deep inside, as a bare AttributeError)
TOP_KEY_TYPES: dict[str, tuple[type, str]] = {
    "name": (str, "a string"), "description": (str, "a string"), "preset": (str, "a string"),
    "seeds": (int, "an integer >= 1"), "metric": (str, "a string"), "config": (str, "a string (a path)"),
    "base": (dict, "a mapping of experiment overrides (the keys of an experiment file)"),
    "grid": (dict, "a mapping of dotted keys to lists of values"),
    "sample": (dict, "a mapping of dotted keys to distributions"),
    "variants": (dict, "a mapping of variant names to mappings of dotted keys to values"),
    "num_samples": (int, "an integer >= 1"), "max_concurrent": (int, "an integer >= 0"),
    "scheduler": (dict, "a mapping with one key, asha or median, to its settings"),
}
SCHEDULERS = {"asha": ("grace_period", "reduction_factor"), "median": ("grace_period", "min_samples_required")}
TOP_KEYS = set(TOP_KEY_TYPES)
VARIANT_KEY = "variant"  # the swept parameter that names a variant


@dataclass(frozen=True)
class TuneSpace:
    name: str
    description: str = ""
    preset: str = "DivDR-A"
    seeds: int = 3
    metric: str = "miou"
    config: str = ""  # the experiment file merged under ``base`` (already merged into ``base`` when loaded)
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    sample: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 1
    max_concurrent: int = 0
    scheduler: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def swept(self) -> list[str]:
        return [*([VARIANT_KEY] if self.variants else []), *self.grid, *self.sample]


def _fail(source: str, message: str) -> None:
    raise ConfigError(f"tune space {source}: {message}")


def parse_space(data: Any, source: str = "<dict>") -> TuneSpace:
    if not isinstance(data, dict):
        _fail(source, f"must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        _fail(source, f"unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    if not data.get("name"):
        _fail(source, "'name' is required")
    for key, value in data.items():
        _check_top_type(source, key, value)
    for section in ("grid", "sample"):
        for key in data.get(section) or {}:
            _check_dotted(source, section, key)
    for variant, overrides in (data.get("variants") or {}).items():
        if not isinstance(variant, str) or not variant:
            _fail(source, f"variants key {variant!r} must be a name (a string)")
        for key in overrides if isinstance(overrides, dict) else ():
            _check_dotted(source, f"variants.{variant}", key)
    space = TuneSpace(**{k: v for k, v in data.items() if v is not None})
    if space.preset not in PRESETS:
        _fail(source, f"preset {space.preset!r} is not one of {sorted(PRESETS)}")
    if not isinstance(space.seeds, int) or space.seeds < 1:
        _fail(source, f"seeds must be an integer >= 1, got {space.seeds!r}")
    if space.metric not in REPORT_METRICS:
        _fail(source, f"metric {space.metric!r} is not one of {list(REPORT_METRICS)}")
    if not isinstance(space.num_samples, int) or space.num_samples < 1:
        _fail(source, f"num_samples must be an integer >= 1, got {space.num_samples!r}")
    if not isinstance(space.max_concurrent, int) or space.max_concurrent < 0:
        _fail(source, f"max_concurrent must be an integer >= 0, got {space.max_concurrent!r}")
    for key, values in space.grid.items():
        if not isinstance(values, list) or not values:
            _fail(source, f"grid.{key} must be a non-empty list, got {values!r}")
    for key, spec in space.sample.items():
        _check_distribution(source, key, spec)
    for variant, overrides in space.variants.items():
        if not isinstance(overrides, dict):
            _fail(source, f"variants.{variant} must be a mapping of dotted keys to values, got {overrides!r}")
        swept = sorted(set(overrides) & (set(space.grid) | set(space.sample)))
        if swept:
            _fail(source, f"variants.{variant} sets {swept}, which the grid or sample also sweeps")
    overlap = set(space.grid) & set(space.sample)
    if overlap:
        _fail(source, f"{sorted(overlap)} appear in both grid and sample")
    _check_scheduler(source, space)
    _check_trials(source, space)
    return space


def _check_scheduler(source: str, space: TuneSpace) -> None:
    if not space.scheduler:
        return
    if len(space.scheduler) != 1 or next(iter(space.scheduler)) not in SCHEDULERS:
        _fail(source, f"scheduler must have one key, one of {sorted(SCHEDULERS)}, got {space.scheduler!r}")
    kind, settings = next(iter(space.scheduler.items()))
    settings = settings or {}
    if not isinstance(settings, dict):
        _fail(source, f"scheduler.{kind} must be a mapping of settings, got {settings!r}")
    for key, value in settings.items():
        if key not in SCHEDULERS[kind]:
            _fail(source, f"scheduler.{kind}: unknown setting {key!r}; known: {list(SCHEDULERS[kind])}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            _fail(source, f"scheduler.{kind}.{key} must be a number > 0, got {value!r}")
    if trial_config(space, {}, seed=0).train.eval_every <= 0:
        _fail(source, "a scheduler acts on the trials' periodic evaluation: set train.eval_every in base")


def _check_top_type(source: str, key: str, value: Any) -> None:
    expected, described = TOP_KEY_TYPES[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, expected)):
        _fail(source, f"{key} must be {described}, got {value!r}")


def _check_dotted(source: str, where: str, key: Any) -> None:
    if not isinstance(key, str) or not all(key.split(".")):
        _fail(source, f"{where} key {key!r} must be a dotted key such as clustering.k")


def _check_distribution(source: str, key: str, spec: Any) -> None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        _fail(source, f"sample.{key} must be one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, "
                      f"{{choice: [...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            _fail(source, f"sample.{key}.choice must be a non-empty list, got {args!r}")
        return
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
            and args[0] < args[1]):
        _fail(source, f"sample.{key}.{kind} must be [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        _fail(source, f"sample.{key}.loguniform needs low > 0, got {args!r}")


def _check_trials(source: str, space: TuneSpace) -> None:
    """Resolve one trial per grid value (and each distribution's bounds) so a bad key or value
    fails at load time, naming the key, not hours into the sweep."""
    probes: list[dict[str, Any]] = [{}, *({VARIANT_KEY: v} for v in space.variants)]
    for key, values in space.grid.items():
        probes += [{key: v} for v in values]
    for key, spec in space.sample.items():
        _, args = next(iter(spec.items()))
        probes += [{key: v} for v in args]
    for probe in probes:
        try:
            trial_config(space, probe, seed=0)
        except ConfigError as err:
            _fail(source, f"{probe or 'base'}: {err}")


def trial_config(space: TuneSpace, params: dict[str, Any], seed: int, name: str = ""):
    """The ExperimentConfig of one trial: preset <- base <- variant <- swept values <- seed."""
    tree = yaml.safe_load(yaml.safe_dump(space.base)) or {}
    tree.setdefault("preset", space.preset)
    params = dict(params)
    if VARIANT_KEY in params:
        variant = params.pop(VARIANT_KEY)
        if variant not in space.variants:
            raise ConfigError(f"unknown variant {variant!r}; the space has {sorted(space.variants)}")
        for key, value in space.variants[variant].items():
            set_dotted(tree, key, value)
    for key, value in params.items():
        set_dotted(tree, key, value)
    set_dotted(tree, "train.seed", seed)
    if name:
        tree["name"] = name
    return from_dict(tree)


def load_space(path: Path) -> TuneSpace:
    """A tune space from YAML; its ``config`` experiment file (a path relative to the space's folder)
    is loaded here and ``base`` applied over it, so every trial starts from that file."""
    data = load_yaml(path)
    if data.get("config"):
        for key in ("config", "base"):  # read here, before parse_space checks the rest
            _check_top_type(str(path), key, data.get(key))
        experiment = Path(path).parent / data["config"]
        data = {**data, "base": deep_merge(load_experiment(experiment), data.get("base") or {})}
    return parse_space(data, str(path))
