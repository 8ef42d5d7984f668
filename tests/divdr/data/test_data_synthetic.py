"""The generated controlled study: determinism, manifest, balance, regime geometry, CLI, cache."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from divdr import cli
from divdr.config import ConfigError
from divdr.data import scenes as scenes_module
from divdr.data import synthetic
from divdr.data.cityscapes import CityscapesSegmentation
from divdr.data.labels import CITYSCAPES_LABELS, LABEL_ID_BY_NAME
from divdr.data.manifest import SUBSET_MANIFEST, read_subset_manifest
from divdr.data.scenes import generate_scene
from divdr.data.study import DEFAULT_REGIMES, LARGE, StudyConfig, study_config
from divdr.data.synthetic import ensure_default_dataset, generate, split_records

from .conftest import SMALL

TINY_STUDY = StudyConfig(height=48, width=96, n_train=3, n_val=3, seed=5)
OBJECT_IDS = [LABEL_ID_BY_NAME[c] for c in TINY_STUDY.object_classes]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["seg", "det"])
def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path, kind: str) -> None:
    generate(TINY_STUDY, tmp_path / "a", kind)
    generate(TINY_STUDY, tmp_path / "b", kind)
    generate(replace(TINY_STUDY, seed=6), tmp_path / "c", kind)
    first, again, other = (tree_bytes(tmp_path / name) for name in "abc")
    assert first == again
    pngs = [name for name in first if name.endswith(".png")]
    assert len(pngs) >= 6
    assert all(first[name] != other[name] for name in pngs if name in other)


def test_manifest_lists_every_image_with_its_regime(small_seg_study: Path) -> None:
    manifest = read_subset_manifest(small_seg_study / SUBSET_MANIFEST)
    images = {p.relative_to(small_seg_study).as_posix() for p in small_seg_study.glob("leftImg8bit/*/*/*.png")}
    assert set(manifest) == images
    for path, entry in manifest.items():
        assert path.split("/")[1] == entry.split
        assert entry.subset_name == SMALL.regimes[entry.subset].name
    for split in ("train", "val"):
        counts = Counter(e.subset for e in manifest.values() if e.split == split)
        assert set(counts) == set(range(SMALL.num_subsets))
        assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize(("n", "k", "expected"), [(7, 3, [3, 2, 2]), (240, 3, [80, 80, 80]), (9, 4, [3, 2, 2, 2])])
def test_subsets_are_balanced(n: int, k: int, expected: list[int]) -> None:
    records = split_records(study_config(k, n_train=n), "train")
    assert sorted(Counter(r.subset for r in records).values(), reverse=True) == expected


def test_file_names_and_cities_do_not_reveal_the_subset() -> None:
    records = split_records(StudyConfig(), "train")
    for city in StudyConfig().train_cities:
        subsets = Counter(r.subset for r in records if r.city == city)
        assert len(subsets) == 3 and min(subsets.values()) >= 10
    in_order = [r.subset for r in records]  # file order (hence sample ids) is not a regime pattern
    assert in_order != sorted(in_order) and in_order != [i % 3 for i in range(len(records))]


def test_labels_use_the_cityscapes_table(small_seg_study: Path) -> None:
    table_ids = {label_id for label_id, _, _ in CITYSCAPES_LABELS}
    for path in small_seg_study.glob("gtFine/*/*/*_labelIds.png"):
        ids = np.asarray(Image.open(path))
        assert ids.dtype == np.uint8 and set(np.unique(ids).tolist()) <= table_ids
        assert np.isin(ids, OBJECT_IDS).any()  # every image of a regime has objects


def scenes(regime: int, count: int = 6, config: StudyConfig | None = None) -> list[scenes_module.Scene]:
    config = config or StudyConfig()
    return [generate_scene(config, regime, np.random.default_rng([99, regime, i])) for i in range(count)]


def component_stats(scene: scenes_module.Scene) -> tuple[int, float, float]:
    """Object count, mean object area and mean elongation (longest side / area**0.5) of a scene."""
    areas = [obj.placed.mask.sum() for obj in scene.objects]
    elongation = [max(obj.placed.mask.shape) / np.sqrt(a) for obj, a in zip(scene.objects, areas, strict=True)]
    return len(areas), float(np.mean(areas)), float(np.mean(elongation))


def test_regimes_have_their_geometry() -> None:
    large, tiny, thin = ([component_stats(s) for s in scenes(r)] for r in range(3))
    assert all(n <= 3 for n, _, _ in large) and all(n >= 30 for n, _, _ in tiny)
    assert all(5 <= n <= 30 for n, _, _ in thin)
    assert min(a for _, a, _ in large) > 20 * max(a for _, a, _ in tiny)
    assert min(e for _, _, e in thin) > 2 * max(e for _, _, e in large + tiny)
    windows = [len(obj.windows) for s in scenes(0) for obj in s.objects]
    assert min(windows) >= 1  # large objects carry glass patches


def test_every_image_holds_every_geometry_and_the_same_object_area() -> None:
    """Budget matching: each regime's objects cover the same fraction of the image in expectation."""
    fractions = [[np.isin(s.label_ids, OBJECT_IDS).mean() for s in scenes(r, 10)] for r in range(3)]
    means = [float(np.mean(f)) for f in fractions]
    assert max(means) / min(means) < 1.2, means
    lo, hi = StudyConfig().object_fraction
    assert all(0.7 * lo < m < hi for m in means)


def test_decoys_are_painted_like_objects_and_labelled_background() -> None:
    """``clutter="decoy"``: the other geometries look like objects, so only the regime tells them apart."""
    config = replace(StudyConfig(), clutter="decoy")
    rng = np.random.default_rng(0)
    palette = scenes_module.jittered_palette(config, rng)
    image = np.zeros((config.height, config.width, 3))
    drafts = scenes_module.fill_budget(DEFAULT_REGIMES[1], 0.05 * image.size / 3, rng, config.height)
    scenes_module.add_decoys(image, drafts, DEFAULT_REGIMES[1], config, rng, palette, np.zeros(3))
    painted = image[image.any(axis=-1)]
    objects = np.stack([palette[LABEL_ID_BY_NAME[c]] for c in config.object_classes])
    nearest = np.linalg.norm(painted[:, None] - objects[None], axis=-1).min(axis=1)
    assert len(painted) > 0 and nearest.max() < 6 * config.instance_jitter  # object colours
    decoy_scenes = scenes(2, 4, config)
    assert all(5 <= n <= 30 and e > 3 for n, _, e in map(component_stats, decoy_scenes))  # still thin objects
    for scene in decoy_scenes:  # labels: the regime's objects only, never the decoys
        labelled = np.isin(scene.label_ids, OBJECT_IDS)
        assert labelled.sum() == sum(int(obj.placed.mask.sum()) for obj in scene.objects)


def test_crowds_group_objects_of_one_class() -> None:
    config = StudyConfig(regimes=(LARGE, replace(DEFAULT_REGIMES[1], crowd_probability=1.0)))
    scene = scenes(1, 1, config)[0]
    crowd = [obj for obj in scene.objects if obj.group >= 0]
    assert len(crowd) >= DEFAULT_REGIMES[1].crowd_size[0] and len({obj.class_name for obj in crowd}) == 1


def test_seg_study_loads_with_the_cityscapes_loader(small_seg_study: Path) -> None:
    study = json.loads((small_seg_study / "study.json").read_text())
    assert study["kind"] == "seg" and study["config"]["seed"] == SMALL.seed
    val = CityscapesSegmentation(small_seg_study, "val")
    assert len(val) == SMALL.n_val and {val[i]["subset"] for i in range(len(val))} <= {0, 1, 2}


@pytest.mark.parametrize(("make", "field"), [
    (lambda: StudyConfig(height=16), "study size"),
    (lambda: StudyConfig(regimes=()), "regimes"),
    (lambda: StudyConfig(regimes=(LARGE, LARGE)), "names must be unique"),
    (lambda: StudyConfig(object_classes=("car", "tree")), "object_classes"),
    (lambda: StudyConfig(class_weights=(1.0,)), "class_weights"),
    (lambda: StudyConfig(object_fraction=(0.2, 0.1)), "object_fraction"),
    (lambda: replace(LARGE, windows=1.0), "regime 'large': windows"),
    (lambda: replace(LARGE, kind="star"), "regime 'large': kind"),
    (lambda: StudyConfig(clutter="smoke"), "clutter must be"),
    (lambda: StudyConfig(decoy_fraction=1.0), "decoy_fraction must be in"),
    (lambda: study_config(0), "subsets must be in 1..4"),
    (lambda: study_config(5), "subsets must be in 1..4"),
])
def test_bad_parameters_name_the_field(make, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make()


def test_generate_refuses_a_non_empty_folder_and_unknown_kind(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        generate(TINY_STUDY, tmp_path)
    with pytest.raises(ConfigError, match="kind must be"):
        generate(TINY_STUDY, tmp_path / "new", "panoptic")  # type: ignore[arg-type]


def test_make_data_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seg"
    assert cli.main(["make-data", "--out", str(out), "--n-train", "4", "--n-val", "2", "--size", "48x96",
                     "--seed", "3", "--subsets", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote seg study to {out}" in printed and "train: 4 images (large 2, tiny 2)" in printed
    assert CityscapesSegmentation(out, "train")[0]["image"].shape == (3, 48, 96)
    det = tmp_path / "det"
    assert cli.main(["make-data", "--kind", "det", "--out", str(det), "--n-train", "2", "--n-val", "1",
                     "--size", "48x96"]) == 0
    assert (det / "annotations" / "instances_val.json").is_file() and (det / SUBSET_MANIFEST).is_file()
    assert cli.main(["make-data", "--out", str(tmp_path / "x"), "--size", "48by96"]) == 2
    assert "--size" in capsys.readouterr().err
    other = tmp_path / "other-rule"  # another subset rule: regimes picked by name, in that order
    assert cli.main(["make-data", "--out", str(other), "--n-train", "3", "--n-val", "1", "--size", "48x96",
                     "--regimes", "medium,tiny,large"]) == 0
    assert "train: 3 images (medium 1, tiny 1, large 1)" in capsys.readouterr().out
    assert cli.main(["make-data", "--out", str(tmp_path / "y"), "--regimes", "large,huge"]) == 2
    assert "['huge'] unknown; choose from large, tiny, thin, medium" in capsys.readouterr().err


def test_ensure_default_dataset_generates_once_keyed_by_parameters(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = ensure_default_dataset(tmp_path, TINY_STUDY)
    assert root.parent == tmp_path and root.name.startswith("synthetic-seg-")
    assert len(CityscapesSegmentation(root, "train")) == TINY_STUDY.n_train
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind

    def fail(*_: object) -> None:
        raise AssertionError("regenerated a cached study")

    monkeypatch.setattr(synthetic, "generate", fail)
    assert ensure_default_dataset(tmp_path, TINY_STUDY) == root
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path))
    assert ensure_default_dataset(config=TINY_STUDY) == root
    monkeypatch.undo()
    other = ensure_default_dataset(tmp_path, replace(TINY_STUDY, seed=6))
    assert other != root and other.is_dir()


def test_interrupted_generation_is_not_mistaken_for_a_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic.write_seg_study

    def crash(config: StudyConfig, out: Path) -> None:
        real(replace(config, n_val=0), out)  # half the files written ...
        raise KeyboardInterrupt  # ... then the user presses Ctrl-C

    monkeypatch.setattr(synthetic, "write_seg_study", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_dataset(tmp_path, TINY_STUDY)
    assert not any(p.name.startswith("synthetic-") for p in tmp_path.iterdir())
    monkeypatch.undo()
    root = ensure_default_dataset(tmp_path, TINY_STUDY)
    assert len(CityscapesSegmentation(root, "val")) == TINY_STUDY.n_val


def test_default_cache_location_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path / "c"))
    assert synthetic.cache_root() == tmp_path / "c"
    monkeypatch.delenv(synthetic.CACHE_ENV)
    assert synthetic.cache_root() == Path("~/.cache/divdr").expanduser()


def test_object_components_are_compact_in_tiny_and_thin_regimes() -> None:
    """The label maps themselves tell the regimes apart: the information is in spatial structure."""
    def median_component(scene: scenes_module.Scene) -> float:
        components, count = ndimage.label(np.isin(scene.label_ids, OBJECT_IDS))
        return float(np.median(np.bincount(components.ravel())[1:])) if count else 0.0
    large, tiny = (min(median_component(s) for s in scenes(0)), max(median_component(s) for s in scenes(1)))
    assert large > 10 * tiny


@pytest.mark.parametrize(("argument", "value"), [("--n-train", "0"), ("--n-val", "0"), ("--n-train", "-3"),
                                                 ("--n-val", "two"), ("--seed", "-1")])
def test_make_data_refuses_counts_below_one_and_negative_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               argument: str, value: str) -> None:
    args = {"--n-train": "2", "--n-val": "1", "--seed": "0", argument: value}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["make-data", "--out", str(tmp_path / "out"), "--size", "48x96",
                  *(item for pair in args.items() for item in pair)])
    assert exit_info.value.code == 2
    assert f"argument {argument}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_make_data_argument_errors_name_the_argument_and_value(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["make-data", "--out", str(tmp_path / "out"), "--n-train", "0"])
    assert "argument --n-train: must be an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["make-data", "--out", str(tmp_path / "out"), "--seed", "-1"])
    assert "argument --seed: must be an integer >= 0, got '-1'" in capsys.readouterr().err
    assert cli.main(["make-data", "--out", str(tmp_path / "out"), "--size", "0x96"]) == 2
    assert "--size must be positive, got '0x96'" in capsys.readouterr().err


def test_make_data_names_an_output_path_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert cli.main(["make-data", "--out", str(out), "--n-train", "1", "--n-val", "1", "--size", "48x96"]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'file'} is a file, not a folder" in err, err
    with pytest.raises(ConfigError, match=r"is a file, not a folder"):
        generate(TINY_STUDY, tmp_path / "file")
