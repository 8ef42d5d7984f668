import itertools
from pathlib import Path

import pytest

from divdr.config import ConfigError
from pipeline.config import resolve, with_absolute_paths, with_smoke
from pipeline.schedule import kmeans_trigger_steps

REPO = Path(__file__).resolve().parents[2]


def test_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("clustering:\n  k: 4\n  alpha: 0.5\ntrain:\n  steps: 30\n  crop: [64, 96]\n")
    cfg = resolve("DR-B", path, ["clustering.k=2", "model.channels=16"])
    assert cfg.preset == "DR-B" and cfg.budget.weight == 0.5 and cfg.budget.mu == 0.1
    assert cfg.clustering.k == 2 and cfg.clustering.alpha == 0.5 and cfg.clustering.weight == 0.0
    assert cfg.train.steps == 30 and cfg.train.crop == (64, 96) and cfg.model.channels == 16
    assert cfg.run_name == "DR-B-seed0"
    flat = cfg.flat()
    assert flat["clustering.k"] == 2 and flat["model.gate.small_gate"] is True


def test_divdr_preset_turns_clustering_on():
    assert resolve("DivDR-A").clustering.weight > 0
    assert resolve("DivDR-Raw").budget.weight == 0


@pytest.mark.parametrize(("override", "message"), [
    ("clustering.k=0", "clustering.k must be >= 1"),
    ("clustering.alpha=-1", "clustering.alpha must be >= 0"),
    ("budget.weight=-0.1", "budget.weight"),
    ("clustering.weight=-2", "lambda2"),
    ("trian.steps=3", "unknown key"),
    ("train.stepz=3", "stepz"),
    ("store.mode=sometimes", "store.mode"),
    ("preset=DR-Z", "unknown preset"),
    ("model_size=huge", "unknown model size"),
    ("train.crop=[16,16]", "train.crop"),
    ("novalue", "key=value"),
    ("train.lr=abc", "train.lr must be a number"),
    ("clustering.k=2.5", "clustering.k must be an integer"),
    ("model.gate.enabled=3", "must be true or false"),
    ("train.crop=5", "train.crop must be a list"),
])
def test_invalid_values_rejected_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(None, None, [override])


@pytest.mark.parametrize(("override", "message"), [
    ("clustering.k=1", r"clustering\.k must be >= 2 when the clustering loss is on"),
    ("train.steps=inf", r"train\.steps must be a finite number, got 'inf'"),
    ("train.steps=.nan", r"train\.steps must be a finite number, got nan"),
    ("train.steps=1e400", r"train\.steps must be a finite number"),
    ("train.lr=inf", r"train\.lr must be a finite number, got 'inf'"),
    ("train.lr=-.inf", r"train\.lr must be a finite number, got -inf"),
    ("train.grad_clip=nan", r"train\.grad_clip must be a finite number"),
    ("scaling.cpus_per_worker=.inf", r"scaling\.cpus_per_worker must be a finite number"),
    ("train.crop=[a,b]", r"train\.crop\[0\] must be a number, got 'a' \(in train\.crop = \['a', 'b'\]\)"),
    ("train.crop=[64.5,64]", r"train\.crop\[0\] must be an integer, got 64\.5"),
    ("train.crop=[64,.inf]", r"train\.crop\[1\] must be a finite number"),
    ("detection.anchor_sizes=[a,b,c,d,e]", r"detection\.anchor_sizes\[0\] must be a number, got 'a'"),
    ("model.route=[x]", r"model\.route\[0\] must be a number, got 'x'"),
])
def test_non_finite_numbers_and_bad_list_items_rejected_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("DivDR-A", None, [override])


@pytest.mark.parametrize(("override", "message"), [
    ("clustering=5", r"clustering must be a mapping, got int: 5"),
    ("model=[1]", r"model must be a mapping, got list: \[1\]"),
    ("preset=[DR-A]", r"preset must be a string, got \['DR-A'\]"),
    ("model_size=[1]", r"model_size must be a string, got \[1\]"),
    ("name=[1]", r"name must be a string, got \[1\]"),
])
def test_a_section_or_a_name_given_a_value_of_the_wrong_kind_is_rejected_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(None, None, [override])


@pytest.mark.parametrize(("override", "message"), [
    ("data.loader_workers=-1", r"data\.loader_workers must be between 0 \(load in the training process\) and 64"),
    ("data.loader_workers=1000", r"data\.loader_workers must be between 0 .* and 64, got 1000"),
    ("data.loader_workers=1.5", r"data\.loader_workers must be an integer, got 1\.5"),
    ("data.pin_memory=sometimes", r"data\.pin_memory must be true, false or null .*, got 'sometimes'"),
    ("data.pin_memory=1", r"data\.pin_memory must be true, false or null .*, got 1"),
    ("data.persistent_workers=2", r"data\.persistent_workers must be true or false, got 2"),
    ("data.prefetch_factor=0", r"data\.prefetch_factor must be >= 1, got 0"),
])
def test_loader_settings_rejected_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(None, None, [override])


def test_loader_settings_from_a_file_and_from_set(tmp_path):
    default = resolve(None, None, []).data
    assert (default.loader_workers, default.pin_memory, default.persistent_workers, default.prefetch_factor) == (
        2, None, True, 2)
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  loader_workers: 0\n  pin_memory: true\n  prefetch_factor: 4\n")
    data = resolve(None, path, ["data.persistent_workers=false"]).data
    assert (data.loader_workers, data.pin_memory, data.persistent_workers, data.prefetch_factor) == (0, True, False, 4)
    assert resolve(None, path, ["data.pin_memory=null"]).data.pin_memory is None
    assert resolve(None, path, []).flat()["data.loader_workers"] == 0


def test_learning_rate_must_be_finite_even_when_built_directly():
    from pipeline.config import TrainConfig

    with pytest.raises(ConfigError, match=r"train\.lr must be finite and > 0, got inf"):
        TrainConfig(lr=float("inf"))


def test_bad_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        resolve(None, tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve(None, path)


def test_yaml_spellings_are_forgiven():
    cfg = resolve(None, None, ["train.lr=1e-3", "clustering.k=4.0"])  # "1e-3" is a string to YAML 1.1
    assert cfg.train.lr == 0.001 and cfg.clustering.k == 4 and isinstance(cfg.clustering.k, int)


def test_smoke_overrides_resolve():
    cfg = resolve(None, None, [], base=with_smoke({}))
    assert cfg.model_size == "micro" and cfg.train.steps <= 20


def test_kmeans_schedule_fixed_and_annealed():
    assert kmeans_trigger_steps(200, 50) == [50, 100, 150]
    annealed = kmeans_trigger_steps(400, 20, every_final=100)
    gaps = [b - a for a, b in itertools.pairwise(annealed)]
    assert annealed[0] == 20 and gaps == sorted(gaps) and gaps[-1] > gaps[0]


def test_gumbel_presets_set_the_gate_family_and_the_regulariser():
    drnet = resolve("DRNet-A")
    assert drnet.model.gate.kind == "gumbel" and drnet.resource.weight == 0.1 and drnet.budget.weight == 0
    assert resolve("DivDRNet-A").clustering.weight > 0
    dr = resolve("DR-A")
    assert dr.model.gate.kind == "soft" and dr.resource.weight == 0 and dr.budget.weight == 0.8
    # the gate family is a model setting like any other: an override beats the preset
    mixed = resolve("DR-A", None, ["model.gate.kind=gumbel", "model.gate.temperature.final=0.3"])
    assert mixed.model.gate.kind == "gumbel" and mixed.model.gate.temperature.final == 0.3
    assert resolve("DRNet-A", None, ["model.gate.kind=soft"]).model.gate.kind == "soft"
    flat = drnet.flat()
    assert flat["resource.weight"] == 0.1 and flat["model.gate.temperature.pretrain"] == 3.0


@pytest.mark.parametrize(("override", "message"), [
    ("model.gate.kind=magic", "gate.kind must be 'soft' or 'gumbel'"),
    ("model.gate.threshold=0", "gate.threshold"),
    ("model.gate.temperature.start=-1", "gate.temperature.start"),
    ("model.gate.temperature.tau=1", "tau"),
    ("resource.weight=-1", "resource.weight"),
    ("resource.correct=boxes", "resource.correct"),
    ("resource.strength=1", "strength"),
])
def test_gumbel_fields_validated_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("DRNet-A", None, [override])


def test_overrides_never_leak_into_the_smoke_defaults():
    from pipeline.config import SMOKE_OVERRIDES

    before = repr(SMOKE_OVERRIDES)
    resolve(None, None, ["train.lr=0.5", "clustering.k=5"], base=with_smoke({}))
    assert repr(SMOKE_OVERRIDES) == before
    assert resolve(None, None, [], base=with_smoke({})).train.lr != 0.5


def test_store_can_be_disabled_for_dr_only():
    assert resolve("DR-A").store.enabled
    assert not resolve("DR-A", overrides=["store.enabled=false"]).store.enabled
    with pytest.raises(ConfigError, match=r"store\.enabled=false needs clustering\.weight"):
        resolve("DivDR-A", overrides=["store.enabled=false"])


CITYSCAPES_PRESETS = {"layer16": "DivDR-A", "network-fix": "DR-Raw", "dr-a": "DR-A", "dr-b": "DR-B", "dr-c": "DR-C",
                      "dr-raw": "DR-Raw", "divdr-a": "DivDR-A", "divdr-raw": "DivDR-Raw"}


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_experiment_file_resolves(path):
    cfg = resolve(None, path, [])
    if path.parent.name == "cityscapes":
        assert cfg.model_size == "layer16" and cfg.train.crop == (768, 768) and cfg.train.lr == 0.05
        assert cfg.train.steps == 180000 and cfg.train.batch_size * cfg.scaling.workers == 8
        assert cfg.preset == CITYSCAPES_PRESETS[path.stem]
    if path.parent.name == "coco":
        assert cfg.model_size == "layer17" and cfg.train.lr == 0.02 and cfg.detection.min_size == 800
        assert cfg.task == {"layer17-detection": "detection", "layer17-instance": "instance"}[path.stem]


def test_an_experiment_file_extends_another_and_a_cycle_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("model_size: tiny\ntrain: {steps: 50, lr: 0.01}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\npreset: DR-B\ntrain: {steps: 70}\n")
    cfg = resolve(None, tmp_path / "child.yaml", ["train.batch_size=2"])
    assert (cfg.model_size, cfg.preset, cfg.train.steps, cfg.train.lr, cfg.train.batch_size) == ("tiny", "DR-B", 70,
                                                                                                  0.01, 2)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="levels of extends"):
        resolve(None, tmp_path / "loop.yaml", [])
    (tmp_path / "bad.yaml").write_text("extends: [a]\n")
    with pytest.raises(ConfigError, match="extends must name a file"):
        resolve(None, tmp_path / "bad.yaml", [])


def test_the_premise_file_is_its_base_with_the_studys_options():
    divdr = resolve(None, REPO / "configs" / "premise.yaml", [])
    by_hand = resolve(None, REPO / "configs" / "premise-base.yaml", [
        "clustering.sigma2_min=0.25", "model.gate.input_norm=true", "clustering.kmeans_start=warm",
        "clustering.stable_max_change=0.05", "budget.mu=0.25", "clustering.membership=kmeans",
        "clustering.on_unstable=hold"])
    assert divdr == by_hand  # the commands of the study's entry reproduce what the file trains


def test_init_from_and_storage_path_are_made_absolute_against_the_launch_directory(tmp_path):
    """Ray's workers and Tune's trials run in other directories: a relative model path is resolved where the
    command was given; an absolute one and none are left as they are."""
    relative = resolve("DR-A", None, ["train.init_from=runs/dr/artifacts/model.pt"])
    assert with_absolute_paths(relative, tmp_path).train.init_from == str(tmp_path / "runs/dr/artifacts/model.pt")
    absolute = resolve("DR-A", None, [f"train.init_from={tmp_path / 'm.pt'}"])
    assert with_absolute_paths(absolute, Path("/elsewhere")) == absolute
    assert with_absolute_paths(resolve("DR-A"), tmp_path) == resolve("DR-A")
    storage = with_absolute_paths(resolve("DR-A", None, ["storage.path=ckpt", "name=x"]), tmp_path).storage.path
    assert storage == str(tmp_path / "ckpt")
    assert with_absolute_paths(resolve("DR-A", None, ["storage.path=s3://b/p"]), tmp_path).storage.path == "s3://b/p"
    cached = resolve("DR-A", None, ["train.compile=true", "train.compile_cache=cache"])
    assert with_absolute_paths(cached, tmp_path).train.compile_cache == str(tmp_path / "cache")


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.compile_cache=compiled"], "only used with train.compile: true"),
    (["train.compile=true", "train.compile_cache=s3://bucket/compiled"], "must be a folder"),
])
def test_a_compile_cache_needs_compilation_and_a_folder(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve("DR-A", None, overrides)
