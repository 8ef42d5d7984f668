"""Experiment configuration: a preset, a YAML file of overrides, then ``--set key=value`` overrides.

Everything resolves into one frozen ``ExperimentConfig``; unknown keys and invalid values are
rejected with the key's dotted path in the message. YAML stays here, at the edge.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from divdr.config import (
    BudgetConfig,
    ClusteringConfig,
    ConfigError,
    ModelConfig,
    ResourceConfig,
    config_from_dict,
    get_model_config,
    get_preset,
)
from divdr.detection import DETECTION_TASKS, DetectionConfig

StoreMode = Literal["streaming", "refresh"]
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")
TASKS = ("segmentation", *DETECTION_TASKS)  # detection: Faster R-CNN; instance: Mask R-CNN (issue 6)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation as the DR paper (SGD, momentum 0.9, wd 1e-4, poly 0.9), scaled down by default."""

    steps: int = 600
    batch_size: int = 8  # per worker
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    grad_clip: float = 5.0  # official GRAD_CLIP
    crop: tuple[int, int] = (128, 128)
    scale_min: float = 0.5
    scale_max: float = 2.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    eval_every: int = 0  # 0 = evaluate at the end only
    # Not in the papers: the gates' learning rate is lr x this (their own parameter group), so routes
    # can form within a short schedule while the rest of the network trains at the paper's rate.
    gate_lr_scale: float = 1.0
    # Speed (docs/benchmarks.md, "The training step"); none changes what a step computes beyond rounding.
    # fp32, or autocast in bf16 / fp16 (fp16 with a GradScaler); the budget and eq. 2 stay in float32.
    precision: Precision = "fp32"
    # Regional compilation: each cell's training forward through torch.compile (divdr.cells.compile_cells);
    # the first steps take longer (one graph per kind of cell), evaluation stays in eager mode.
    compile: bool = False
    # With train.compile: a folder of torch's portable compile caches (torch.compiler.save_cache_artifacts), a file
    # per network, input size, precision and device model (pipeline.loop.compile_cache_file). The run's file is
    # loaded before the first step and written by rank 0 after it when anything was compiled afresh. Point the runs,
    # trials and workers of a project at one folder (on shared storage for a cluster) and only the first of each
    # network compiles (docs/benchmarks.md, "Compile time"). "" = torch's own cache only, which is per machine
    # (/tmp/torchinductor_<user>): a re-run there is already warm, a fresh node is not.
    compile_cache: str = ""
    channels_last: bool = False  # the network's tensors in NHWC, what GPU convolutions prefer
    # The whole step (forward, losses, backward, clipping, fused SGD) captured once in a CUDA graph and replayed:
    # one launch per step instead of thousands (pipeline/cuda_graph.py; GPUs, segmentation, fp32 or bf16; with
    # several workers two graphs per step, the gradients all-reduced between them).
    cuda_graph: bool = False
    # Each layer's cells (one per scale) on CUDA streams side by side, forward and backward
    # (divdr.backbone.set_scale_streams); nothing on a CPU. Detection and instance tasks too.
    scale_streams: bool = False
    # Triton kernels for the bilinear resizes, the per-image weighting of the paths and each cell's ReLU with its keep
    # path, forward and backward (divdr.fused); CUDA tensors only, nothing on a CPU. The same values up to float32
    # rounding. Use it with train.cuda_graph: a Triton launch costs more host time than an aten one.
    fused_kernels: bool = False
    # A model file (<run>/artifacts/model.pt) whose weights start the network, e.g. fine-tuning a network
    # trained on every image on one subset (pipeline/oracle.py --set train.init_from=...). "" = random initialisation.
    # A run resumed from its own checkpoint takes the checkpoint's weights. A relative path is taken from the
    # directory the command runs in; on a cluster the file must be readable from every worker (shared storage).
    init_from: str = ""

    def __post_init__(self) -> None:
        _require(self.precision in PRECISIONS,
                 f"train.precision must be {' or '.join(map(repr, PRECISIONS))}, got {self.precision!r}")
        _require(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(math.isfinite(self.lr) and self.lr > 0, f"train.lr must be finite and > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(len(self.crop) == 2 and all(int(c) >= 32 for c in self.crop),
                 f"train.crop must be [height, width] >= 32, got {self.crop}")
        _require(0 < self.scale_min <= self.scale_max,
                 f"train.scale_min/scale_max must satisfy 0 < min <= max, got {self.scale_min}, {self.scale_max}")
        for name in ("log_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        _require(self.gate_lr_scale > 0, f"train.gate_lr_scale must be > 0, got {self.gate_lr_scale}")
        _require(not self.compile_cache or self.compile,
                 f"train.compile_cache ({self.compile_cache}) is only used with train.compile: true")
        _require(not is_uri(self.compile_cache),
                 f"train.compile_cache must be a folder (on storage every worker mounts), got {self.compile_cache}")
        _require(not (self.cuda_graph and self.precision == "fp16"),
                 "train.cuda_graph cannot run with train.precision: fp16 (its GradScaler reads the overflow flag "
                 "on the host at every step); use bf16, which needs no scaling")


@dataclass(frozen=True)
class WorkersConfig:
    """Ray Train workers. On CPU DDP uses gloo, on GPU nccl."""

    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 1  # per worker; 2-core machines oversubscribe otherwise
    max_failures: int = 0  # FailureConfig: restarts from the last checkpoint

    def __post_init__(self) -> None:
        _require(self.workers >= 1, f"scaling.workers must be >= 1, got {self.workers}")
        _require(self.cpus_per_worker > 0, f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        _require(self.torch_threads >= 1, f"scaling.torch_threads must be >= 1, got {self.torch_threads}")
        _require(self.max_failures >= -1, f"scaling.max_failures must be >= -1, got {self.max_failures}")


@dataclass(frozen=True)
class StoreConfig:
    """The centroid store: what it keeps and when it clusters."""

    # false = no centroid store at all: no streaming, no K-means, no clusters measured during
    # training (DR presets only: the clustering loss needs the store's centres). For benchmarks.
    enabled: bool = True
    mode: StoreMode = "streaming"  # or "refresh": recompute every A(x) before each K-means
    # The workers switch to centre version v at step v * update_every + switch_lag: K-means runs
    # while they train, and every rank switches at the same step by construction.
    switch_lag: int = 2
    max_in_flight: int = 8  # activation sends a worker may have unanswered before it waits
    # streaming: A(x) waits on the training device and goes to the store every send_every steps and at
    # the step before each K-means (copying it every step would make a GPU step wait for the last one)
    send_every: int = 10
    float16: bool = True  # store A(x) in half precision (values lie in [0, 1))
    kmeans_iterations: int = 20
    # Intra (a diagnostic) is O(n^2) per cluster: ~90 s at COCO's 118k images. The store estimates
    # it from at most this many points per cluster (unbiased; 0 = exact over every point).
    intra_sample: int = 2048
    snapshot_every: int = 1  # snapshot after every n-th K-means update

    def __post_init__(self) -> None:
        _require(self.mode in ("streaming", "refresh"),
                 f"store.mode must be 'streaming' or 'refresh', got {self.mode!r}")
        _require(self.switch_lag >= 1, f"store.switch_lag must be >= 1, got {self.switch_lag}")
        _require(self.max_in_flight >= 1, f"store.max_in_flight must be >= 1, got {self.max_in_flight}")
        _require(self.send_every >= 1, f"store.send_every must be >= 1, got {self.send_every}")
        _require(self.kmeans_iterations >= 1, f"store.kmeans_iterations must be >= 1, got {self.kmeans_iterations}")
        _require(self.intra_sample == 0 or self.intra_sample >= 2,
                 f"store.intra_sample must be 0 (exact) or >= 2, got {self.intra_sample}")
        _require(self.snapshot_every >= 1, f"store.snapshot_every must be >= 1, got {self.snapshot_every}")


MAX_LOADER_WORKERS = 64  # per training process: more is a typo, not a machine


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # "" = the embedded default (generated on first use into the cache)
    eval_batch_size: int = 4
    max_train_images: int = 0  # 0 = all (smoke runs use a few)
    max_val_images: int = 0
    # COCO layout (detection tasks): images in {root}/{split}, annotations/instances_{split}.json;
    # "train" / "val" for the generated study, "train2017" / "val2017" for COCO itself
    train_split: str = "train"
    val_split: str = "val"
    # The training DataLoader (pipeline/train_data.py). Each image's augmentation is drawn from a seed of
    # its own (train.seed, epoch, sample id), so these change how fast batches come, never which.
    loader_workers: int = 2  # processes preparing batches beside each training process; 0 = in it
    pin_memory: bool | None = None  # page-locked batches (fast, asynchronous copies); null = on with CUDA
    persistent_workers: bool = True  # the loader's processes live from epoch to epoch (loader_workers > 0)
    prefetch_factor: int = 2  # batches each loader process prepares ahead (loader_workers > 0)

    def __post_init__(self) -> None:
        _require(self.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _require(self.max_train_images >= 0, f"data.max_train_images must be >= 0, got {self.max_train_images}")
        _require(self.max_val_images >= 0, f"data.max_val_images must be >= 0, got {self.max_val_images}")
        _require(0 <= self.loader_workers <= MAX_LOADER_WORKERS,
                 f"data.loader_workers must be between 0 (load in the training process) and {MAX_LOADER_WORKERS}, "
                 f"got {self.loader_workers}")
        _require(self.pin_memory is None or isinstance(self.pin_memory, bool),
                 f"data.pin_memory must be true, false or null (on when training on a CUDA device), "
                 f"got {self.pin_memory!r}")
        _require(self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # "" = a local SQLite store under the run's output folder
    # MLflow experiment: each entry point names its own ("single runs", "main job", "sweep <space>", "oracle")
    experiment: str = "single runs"


@dataclass(frozen=True)
class StorageConfig:
    """Where Ray Train persists checkpoints: "" = ``<out>/ray_results``; on a cluster a shared
    location every node reaches (``s3://bucket/prefix``, an NFS path)."""

    path: str = ""


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = ""  # run name; "" = derived from the preset
    preset: str = "DivDR-A"
    model_size: str = "small"
    task: str = "segmentation"  # or "detection" / "instance" (COCO layout, torchvision heads)
    model: ModelConfig = field(default_factory=lambda: get_model_config("small"))
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    resource: ResourceConfig = field(default_factory=ResourceConfig)  # DRNets eq. 8 (gumbel presets)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: WorkersConfig = field(default_factory=WorkersConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)  # FPN and R-CNN heads (detection tasks)

    def __post_init__(self) -> None:
        check_run_name(self.run_name)
        _require(not self.train.cuda_graph or self.scaling.use_gpu,
                 "train.cuda_graph captures the step in a CUDA graph: it needs scaling.use_gpu: true")
        _require(not self.train.cuda_graph or self.task == "segmentation",
                 f"train.cuda_graph needs batches of one shape (task segmentation); task {self.task!r} has images "
                 "and targets of varying sizes")
        _require(not (self.train.cuda_graph and self.clustering.membership == "kmeans"),
                 "train.cuda_graph cannot run with clustering.membership: kmeans (each step looks its images' "
                 "clusters up by sample id on the host); use membership: nearest or train.cuda_graph: false")

    @property
    def run_name(self) -> str:
        return self.name or f"{self.preset}-seed{self.train.seed}"

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for config.yaml, MLflow params and printing: credentials in a tracking URI are
        masked (the runtime uses ``tracking.uri`` itself)."""
        tree = _plain(dataclasses.asdict(self))
        tree["tracking"]["uri"] = redact_uri(self.tracking.uri)
        return tree

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten(self.to_dict())


# names the output folder holds beside the runs (deleting a run of that name would delete them)
RESERVED_RUN_NAMES = ("ray_results", "mlartifacts", "mlflow.db", "mlruns")
MAX_RUN_NAME = 200


def check_run_name(name: str) -> None:
    """A run name is a folder name under ``--out``, never a path: ``--fresh`` deletes ``<out>/<name>``."""
    problem = None
    if not name.strip() or name != name.strip():
        problem = "it is empty or starts or ends with a space"
    elif name in (".", "..") or name.startswith("."):
        problem = "it names a hidden or parent folder"
    elif any(sep in name for sep in ("/", "\\", "\0")) or any(ord(c) < 32 for c in name):
        problem = "it holds a path separator or a control character"
    elif name.startswith("-"):
        problem = "it starts with '-'"
    elif name in RESERVED_RUN_NAMES:
        problem = f"the output folder keeps {name!r} for all runs"
    elif len(name) > MAX_RUN_NAME:
        problem = f"it is longer than {MAX_RUN_NAME} characters"
    if problem:
        raise ConfigError(f"run name {name!r} is not a valid name: {problem}. A run name is one folder name "
                          "under --out (letters, digits, '-', '_', '.', '[', ']', '=' ...), never a path")


def redact_uri(uri: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``: what may be printed or saved."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None and not (parts.username and "@" in parts.netloc):
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***" if parts.password is not None else "***"
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested configuration as dotted keys -> values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


SECTIONS = {f.name for f in dataclasses.fields(ExperimentConfig)}


def is_uri(root: str | Path) -> bool:
    return "://" in str(root)


def absolute_root(root: str | Path, cwd: Path | None = None) -> str:
    """A data root (or any file location) as every process should read it: a URI (s3://, gs://, file://)
    as given, a path made absolute against ``cwd`` (default: this process's working directory)."""
    return str(root) if is_uri(root) else str(((cwd or Path.cwd()) / root).resolve())


def with_absolute_paths(cfg: ExperimentConfig, cwd: Path | None = None) -> ExperimentConfig:
    """``cfg`` with ``train.init_from``, ``train.compile_cache`` and ``storage.path`` made absolute against
    ``cwd`` (default: this process's): Ray's workers and Tune's trials run in other working directories,
    where a relative path names something else or nothing. URIs and absolute paths stay as given."""
    def absolute(path: str) -> str:
        return path if not path or Path(path).is_absolute() else absolute_root(path, cwd)

    train = dataclasses.replace(cfg.train, init_from=absolute(cfg.train.init_from),
                                compile_cache=absolute(cfg.train.compile_cache))
    return dataclasses.replace(cfg, train=train,
                               storage=dataclasses.replace(cfg.storage, path=absolute(cfg.storage.path)))


def with_data_root(cfg: ExperimentConfig, root: str | Path) -> ExperimentConfig:
    """``cfg`` reading its data from ``root`` (a path made absolute, or a URI): ``data.root`` is the one
    place a run's dataset is named, from the entry point to every worker."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=absolute_root(root)))


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value parsed as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from err
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree[a][b] = value`` for ``key = "a.b"``, making the sections on the way."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1], 1):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[:depth])!r} holds {child!r}, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new tree: ``update`` over ``base``. Nothing is shared with either input, so later
    ``--set`` edits can never leak into module-level defaults such as SMOKE_OVERRIDES."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read experiment file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"experiment file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"experiment file {path} must hold a mapping, got {type(data).__name__}")
    return data


EXTENDS_KEY = "extends"
MAX_EXTENDS_DEPTH = 8


def load_experiment(path: Path, depth: int = 0) -> dict[str, Any]:
    """An experiment file; ``extends: other.yaml`` (relative to the file) is loaded first and this file's
    keys applied over it, so a family of settings (the presets on one schedule) shares one file."""
    data = load_yaml(path)
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"experiment file {path}: {EXTENDS_KEY} must name a file, got {parent!r}")
    if depth >= MAX_EXTENDS_DEPTH:
        raise ConfigError(f"experiment file {path}: more than {MAX_EXTENDS_DEPTH} levels of {EXTENDS_KEY} "
                          "(a cycle?)")
    return deep_merge(load_experiment(Path(path).parent / parent, depth + 1), data)


def resolve(preset: str | None = None, file: Path | None = None, overrides: list[str] = (),
            base: dict[str, Any] | None = None) -> ExperimentConfig:
    """Preset defaults <- ``base`` <- YAML file <- ``--set`` overrides, validated."""
    tree: dict[str, Any] = dict(base or {})
    if file is not None:
        tree = deep_merge(tree, load_experiment(file))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    if preset is not None:
        tree["preset"] = preset
    return from_dict(tree)


def from_dict(tree: dict[str, Any]) -> ExperimentConfig:
    """Build from a plain (possibly partial) dict: the preset fills the gate family and the
    budget/clustering/resource defaults, ``model_size`` fills the model defaults, and the remaining
    keys override them (``model.gate.kind`` included)."""
    unknown = sorted(set(tree) - SECTIONS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; known sections: {sorted(SECTIONS)}")
    for key in ("name", "preset", "model_size", "task"):  # looked up by name: a list would fail unhashable
        _require(isinstance(tree.get(key, ""), str), f"{key} must be a string, got {tree.get(key)!r}")
    preset = get_preset(tree.get("preset", ExperimentConfig.preset))
    size = tree.get("model_size", ExperimentConfig.model_size)
    sized = get_model_config(size)
    sized = dataclasses.replace(sized, gate=dataclasses.replace(sized.gate, kind=preset.gate))
    model = _override(sized, tree.get("model"), "model")
    parts = {
        "budget": _override(preset.budget, tree.get("budget"), "budget"),
        "clustering": _override(preset.clustering, tree.get("clustering"), "clustering"),
        "resource": _override(preset.resource, tree.get("resource"), "resource"),
    }
    task = tree.get("task", ExperimentConfig.task)
    _require(task in TASKS, f"task must be one of {list(TASKS)}, got {task!r}")
    for name, cls in _SECTION_TYPES.items():
        section = tree.get(name) or {}
        if name == "detection" and task != "segmentation" and not (tree.get("data") or {}).get("root"):
            section = deep_merge(EMBEDDED_STUDY_DETECTION, section)  # the embedded study's scale
        parts[name] = config_from_dict(cls, section, where=name)
    _require(parts["store"].enabled or parts["clustering"].weight == 0,
             f"store.enabled=false needs clustering.weight (lambda2) = 0, got {parts['clustering'].weight}: "
             "the clustering loss trains against the store's centres")
    _require(task == "segmentation" or parts["resource"].weight == 0,
             f"resource.weight (DRNets eq. 8) must be 0 for task {task!r}: its 1[correct] is defined for "
             f"segmentation pixels only; got {parts['resource'].weight} (preset {preset.name})")
    return ExperimentConfig(name=str(tree.get("name", "")), preset=preset.name, model_size=size, task=task,
                            model=model, **parts)


_SECTION_TYPES = {"train": TrainConfig, "scaling": WorkersConfig, "store": StoreConfig, "data": DataConfig,
                  "tracking": TrackingConfig, "storage": StorageConfig, "detection": DetectionConfig}



# Detection heads for the embedded study (128x256 images, objects of 5-70 px, median 8 px), used for
# task detection / instance when no data.root is given; with a data.root (COCO) DetectionConfig's
# defaults are the paper's and torchvision's (shorter edge 800, anchors 32-512, FPN 256). Images stay
# at their own size; anchors 8-128 on P2-P6; narrower FPN and heads keep a CPU step under a second.
EMBEDDED_STUDY_DETECTION: dict[str, Any] = {
    "anchor_sizes": [8, 16, 32, 64, 128], "min_size": 128, "max_size": 256, "fpn_channels": 64,
    "representation_size": 256, "mask_head_layers": [64, 64], "rpn_batch_size_per_image": 128,
    "box_batch_size_per_image": 128,
}


def _override(default: Any, section: dict[str, Any] | None, where: str) -> Any:
    if not section:
        return default
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(section).__name__}: {section!r}")
    base = dataclasses.asdict(default)
    merged = deep_merge(base, section)
    # validate keys against the dataclass (nested sections included)
    return config_from_dict(type(default), merged, where=where)


SMOKE_OVERRIDES: dict[str, Any] = {
    "model_size": "micro",
    "train": {"steps": 12, "batch_size": 2, "crop": [64, 64], "log_every": 2, "checkpoint_every": 6},
    "clustering": {"update_every": 4, "k": 2, "alpha": 1.0},  # alpha > 0: with K = 2, eq. 2 is 0 otherwise
    "store": {"switch_lag": 1, "kmeans_iterations": 5},
    # a few tiny images: loader processes would only add their start to every smoke run (and processes to
    # every Ray worker); tests/pipeline/test_train_data.py trains with them
    "data": {"max_train_images": 16, "max_val_images": 6, "eval_batch_size": 2, "loader_workers": 0},
}


def with_smoke(tree: dict[str, Any]) -> dict[str, Any]:
    return deep_merge(tree, SMOKE_OVERRIDES)

