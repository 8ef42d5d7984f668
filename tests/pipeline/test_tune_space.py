from pathlib import Path

import pytest

from divdr.config import ConfigError
from pipeline.report import aggregate, write_report
from pipeline.tune_space import load_space, parse_space, trial_config

SPACES = sorted((Path(__file__).resolve().parents[2] / "tune_spaces").glob("*.yaml"))


def test_every_shipped_space_loads():
    names = {load_space(p).name for p in SPACES}
    assert {"k", "alpha", "lambda2", "presets"} <= names


def test_trial_config_applies_base_params_and_seed():
    space = parse_space({"name": "t", "preset": "DivDR-A", "base": {"model_size": "micro", "train": {"steps": 7},
                                                                  "clustering": {"alpha": 1.0}},
                         "grid": {"clustering.k": [2, 4]}})
    cfg = trial_config(space, {"clustering.k": 4}, seed=2, name="x")
    assert cfg.clustering.k == 4 and cfg.train.seed == 2 and cfg.train.steps == 7 and cfg.run_name == "x"
    assert cfg.clustering.weight > 0  # from the DivDR-A preset
    dr = trial_config(parse_space({"name": "p", "grid": {"preset": ["DR-C"]}}), {"preset": "DR-C"}, seed=0)
    assert dr.preset == "DR-C" and dr.budget.mu == 0.2


@pytest.mark.parametrize(("space", "message"), [
    ({"grid": {}}, "'name' is required"),
    ({"name": "x", "grdi": {}}, "unknown key"),
    ({"name": "x", "preset": "DR-Z"}, "preset 'DR-Z'"),
    ({"name": "x", "seeds": 0}, "seeds must be"),
    ({"name": "x", "metric": "accuracy"}, "metric 'accuracy'"),
    ({"name": "x", "grid": {"clustering.k": 3}}, "grid.clustering.k must be a non-empty list"),
    ({"name": "x", "grid": {"clustering.k": [3, 0]}}, "clustering.k must be >= 1"),
    ({"name": "x", "grid": {"clustering.kk": [2]}}, "unknown key"),
    ({"name": "x", "sample": {"clustering.alpha": {"normal": [0, 1]}}}, "sample.clustering.alpha must be one of"),
    ({"name": "x", "sample": {"clustering.alpha": {"loguniform": [0, 1]}}}, "needs low > 0"),
    ({"name": "x", "sample": {"clustering.alpha": {"uniform": [2, 1]}}}, "low < high"),
    ({"name": "x", "sample": {"clustering.alpha": {"uniform": [-2, 1]}}}, "clustering.alpha must be >= 0"),
    ({"name": "x", "base": {"train": {"stepz": 3}}}, "stepz"),
    ({"name": "x", "variants": {"v": 3}}, "variants.v must be a mapping"),
    ({"name": "x", "variants": {"v": {"clustering.alpha": -1}}}, "variant.: 'v'.*clustering.alpha must be >= 0"),
    ({"name": "x", "variants": {"v": {"clustering.k": 4}}, "grid": {"clustering.k": [3]}}, "also sweeps"),
    ({"name": "x", "grid": {"clustering.k": [2, 3]}}, "identically 0"),  # DivDR-A, alpha 0, K = 2
])
def test_invalid_spaces_rejected_with_the_culprit(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(space, "test.yaml")


def test_report_mean_std_over_seeds(tmp_path):
    space = parse_space({"name": "r", "base": {"clustering": {"alpha": 1.0}}, "grid": {"clustering.k": [2, 3]}})
    rows = [
        {"setting": "clustering.k=2", "param:clustering.k": 2, "miou": 0.5, "gflops_real": 1.0, "inter": 1, "intra": 1},
        {"setting": "clustering.k=2", "param:clustering.k": 2, "miou": 0.7, "gflops_real": 1.0, "inter": 1, "intra": 1},
        {"setting": "clustering.k=3", "param:clustering.k": 3, "miou": 0.9, "gflops_real": 2.0, "inter": 2, "intra": 0},
    ]
    table = {r["setting"]: r for r in aggregate(rows)}
    assert table["clustering.k=2"]["miou_mean"] == pytest.approx(0.6)
    assert table["clustering.k=2"]["miou_std"] == pytest.approx(0.1)
    assert table["clustering.k=2"]["seeds"] == 2
    report = write_report(space, rows, tmp_path)
    lines = report["markdown"].splitlines()
    assert lines[4].startswith("| clustering.k=3 | 1 | 0.900 ± 0.000")  # sorted by the metric
    assert (tmp_path / "report.csv").exists() and (tmp_path / "metrics_vs_clustering_k.png").stat().st_size > 0


def test_gates_space_compares_both_families_with_and_without_clustering():
    space = load_space(next(p for p in SPACES if p.name == "gates.yaml"))
    kinds = {}
    for preset in space.grid["preset"]:
        cfg = trial_config(space, {"preset": preset}, seed=0)
        kinds[(cfg.model.gate.kind, cfg.clustering.weight > 0)] = preset
        assert (cfg.resource.weight > 0) == (cfg.model.gate.kind == "gumbel")
    assert set(kinds) == {("soft", False), ("soft", True), ("gumbel", False), ("gumbel", True)}


def test_variants_are_named_bundles_of_overrides_crossed_with_the_grid(tmp_path):
    space = parse_space({"name": "v", "preset": "DivDR-A", "grid": {"clustering.k": [2, 3]},
                         "base": {"clustering": {"alpha": 0.5}},
                         "variants": {"default": {}, "dr": {"preset": "DR-A"},
                                      "refresh": {"store.mode": "refresh", "clustering.alpha": 1.0}}})
    assert space.swept == ["variant", "clustering.k"]
    cfg = trial_config(space, {"variant": "refresh", "clustering.k": 3}, seed=1)
    assert cfg.store.mode == "refresh" and cfg.clustering.alpha == 1.0 and cfg.clustering.k == 3
    assert trial_config(space, {"variant": "dr", "clustering.k": 2}, seed=0).clustering.weight == 0
    assert trial_config(space, {"variant": "default", "clustering.k": 2}, seed=0).store.mode == "streaming"
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        trial_config(space, {"variant": "nope"}, seed=0)
    rows = [{"setting": f"variant={v}", "param:variant": v, "miou": 0.5, "cluster_sizes": "[1, 2]"}
            for v in ("default", "dr")]
    report = write_report(space, rows, tmp_path)
    assert "| variant=dr | 1 |" in report["markdown"] and "[1,2]" in report["markdown"]


def test_a_space_starts_from_its_experiment_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "exp.yaml").write_text(
        "model_size: micro\ntrain: {steps: 9, batch_size: 3}\nclustering: {k: 2, alpha: 1.0}\n")
    space_file = tmp_path / "spaces" / "s.yaml"
    space_file.parent.mkdir()
    space_file.write_text("name: s\nconfig: ../configs/exp.yaml\nbase: {train: {steps: 5}}\n"
                          "variants: {DR-A: {preset: DR-A}, DivDR-A: {}}\n")
    space = load_space(space_file)
    cfg = trial_config(space, {"variant": "DR-A"}, seed=1)
    # the file's values, then base over them, then the variant
    assert cfg.model_size == "micro" and cfg.train.batch_size == 3 and cfg.train.steps == 5
    assert cfg.preset == "DR-A" and cfg.clustering.k == 2
    space_file.write_text("name: s\nconfig: ../configs/missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_space(space_file)


@pytest.mark.parametrize(("space", "message"), [
    ({"name": "x", "grid": [1, 2]}, r"grid must be a mapping .*, got \[1, 2\]"),
    ({"name": "x", "grid": "a"}, r"grid must be a mapping .*, got 'a'"),
    ({"name": "x", "base": 5}, r"base must be a mapping .*, got 5"),
    ({"name": "x", "base": [1]}, r"base must be a mapping .*, got \[1\]"),
    ({"name": "x", "sample": [1]}, r"sample must be a mapping .*, got \[1\]"),
    ({"name": "x", "variants": [1]}, r"variants must be a mapping .*, got \[1\]"),
    ({"name": 5}, r"name must be a string, got 5"),
    ({"name": "x", "description": 5}, r"description must be a string, got 5"),
    ({"name": "x", "preset": ["a"]}, r"preset must be a string, got \['a'\]"),
    ({"name": "x", "config": 5}, r"config must be a string \(a path\), got 5"),
    ({"name": "x", "seeds": True}, r"seeds must be an integer >= 1, got True"),
    ({"name": "x", "grid": {5: [1]}}, r"grid key 5 must be a dotted key such as clustering\.k"),
    ({"name": "x", "grid": {"clustering..k": [3]}}, r"grid key 'clustering\.\.k' must be a dotted key"),
    ({"name": "x", "sample": {5: {"uniform": [0, 1]}}}, r"sample key 5 must be a dotted key"),
    ({"name": "x", "variants": {5: {}}}, r"variants key 5 must be a name \(a string\)"),
    ({"name": "x", "variants": {"v": {5: 1}}}, r"variants\.v key 5 must be a dotted key"),
    ({"name": "x", "base": {"train": 5}}, r"base: cannot set 'train\.seed': 'train' holds 5, not a section"),
    ({"name": "x", "variants": {"v": {"train": 5}}},
     r"'variant': 'v'.*cannot set 'train\.seed': 'train' holds 5, not a section"),
    ({"name": "x", "base": {"clustering": {"alpha": 1.0}}, "grid": {"clustering": [5]}},
     r"\{'clustering': 5\}: clustering must be a mapping, got int: 5"),
    ({"name": "x", "base": {"train": {"steps": "inf"}}}, r"base: train\.steps must be a finite number"),
    ({"name": "x", "sample": {"clustering.alpha": {"uniform": [0, float("inf")]}}},
     r"clustering\.alpha must be a finite number"),
])
def test_malformed_spaces_name_the_file_and_the_key(space, message):
    with pytest.raises(ConfigError, match=r"^tune space test\.yaml: ") as info:
        parse_space(space, "test.yaml")
    assert info.match(message)


def test_a_malformed_base_over_an_experiment_file_names_the_file(tmp_path):
    (tmp_path / "exp.yaml").write_text("model_size: micro\n")
    space_file = tmp_path / "s.yaml"
    space_file.write_text("name: s\nconfig: exp.yaml\nbase: 5\n")
    with pytest.raises(ConfigError, match=rf"tune space {space_file}: base must be a mapping .*, got 5"):
        load_space(space_file)
    space_file.write_text("name: s\nconfig: [exp.yaml]\n")
    with pytest.raises(ConfigError, match=rf"tune space {space_file}: config must be a string"):
        load_space(space_file)
