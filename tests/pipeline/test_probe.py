"""pipeline/probe.py on activation files written by the end-of-run analysis (no Ray, no training)."""

import numpy as np
import pytest

from divdr.evaluation import InferenceResult
from pipeline.analysis import activations_table
from pipeline.probe import main, probe_run, read_activations


def _result(acts: np.ndarray, subsets: np.ndarray) -> InferenceResult:
    n = len(acts)
    gflops = 0.1 + 0.1 * subsets.astype(np.float64)  # subset s costs 0.1 * (s + 1)
    return InferenceResult(sample_ids=np.arange(n), files=[f"img{i}.png" for i in range(n)], subsets=subsets,
                           activations=acts.astype(np.float32), gates=np.zeros((n, 1, 3), np.float32),
                           real_gflops=gflops, real_gflops_reference=gflops * 10, confusion=None)


def _write_run(run_dir, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (run_dir / "artifacts").mkdir(parents=True)
    for split in ("train", "val"):
        subsets = np.repeat([0, 1], 20)
        acts = np.c_[subsets + rng.normal(0, 0.1, 40), rng.normal(0, 5, 40)]  # the subset is a minor direction
        clusters = (acts[:, 1] > 0).astype(np.int64)  # clusters split along the dominant, unrelated one
        (run_dir / "artifacts" / f"activations_{split}.parquet").write_bytes(
            activations_table(_result(acts, subsets), clusters, split))


def test_probe_separates_present_but_not_dominant_subsets(tmp_path):
    _write_run(tmp_path / "run", seed=0)
    row = probe_run(tmp_path / "run")
    assert row["probe"] == 1.0 and row["share"] < 0.1 and row["recovery"] < 0.8
    assert row["gflops_by_subset"] == pytest.approx([0.1, 0.2])
    assert sum(row["val_cluster_sizes"]) == 40
    assert np.isnan(row["miou"]) and row["miou_by_subset"] == []  # no result.json: nothing invented


def test_the_row_carries_the_runs_miou_by_subset(tmp_path, capsys):
    import json

    _write_run(tmp_path / "run", seed=0)
    (tmp_path / "run" / "result.json").write_text(json.dumps({"miou": 0.8, "miou_by_subset": [0.7, 0.85]}))
    main([str(tmp_path / "run")])
    assert "| run | 0.800 (0.700 / 0.850) | " in capsys.readouterr().out
    (tmp_path / "run" / "result.json").write_text('{"miou": 0.8,')  # cut short
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run")])
    assert "run/result.json is not valid JSON" in capsys.readouterr().err


def test_cli_prints_a_row_per_run_and_names_a_missing_folder(tmp_path, capsys):
    names = ["s[variant=x]-seed0", "s[variant=x]-seed1", "other"]
    for seed, name in enumerate(names):
        _write_run(tmp_path / name, seed=seed)
    rows = main([str(tmp_path / name) for name in names])
    printed = capsys.readouterr().out
    assert set(rows) == set(names) and "| other | " in printed
    assert "| s[variant=x] | 2 | " in printed  # a sweep's seeds summarised per setting
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "missing/artifacts/activations_train.parquet not found" in capsys.readouterr().err


def test_runs_of_the_same_name_under_two_folders_keep_a_row_each(tmp_path, capsys):
    """The same preset and seed under two --out folders: labelled by folder, summarised per folder."""
    for out, seed in (("papers", 0), ("membership", 1)):
        _write_run(tmp_path / out / "main-DivDR-A-seed0", seed=seed)
    rows = main([str(tmp_path / out / "main-DivDR-A-seed0") for out in ("papers", "membership")])
    assert set(rows) == {"papers/main-DivDR-A-seed0", "membership/main-DivDR-A-seed0"}
    printed = capsys.readouterr().out
    assert "| papers/main-DivDR-A | 1 | " in printed and "| membership/main-DivDR-A | 1 | " in printed


def test_brightness_eta2_says_what_the_clusters_follow(tmp_path):
    """Images whose brightness is set by their cluster: eta^2 between clusters is ~1, between subsets ~0."""
    from PIL import Image

    run_dir = tmp_path / "run"
    _write_run(run_dir, seed=0)
    val = read_activations(run_dir, "val")
    rng = np.random.default_rng(1)
    for image, cluster in zip(val["image"], val["cluster"], strict=True):
        grey = 60 + 120 * int(cluster) + rng.integers(0, 5)
        Image.fromarray(np.full((8, 8, 3), grey, np.uint8)).save(tmp_path / image)
    row = probe_run(run_dir, data=tmp_path)
    assert row["brightness_eta2_clusters"] > 0.99 and row["brightness_eta2_subsets"] < 0.2


def test_brightness_of_a_sixteen_bit_image_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from pipeline.probe import brightness

    Image.fromarray(np.full((4, 6), 32896, np.uint16)).save(tmp_path / "grey16.png")  # 128 * 257
    assert brightness(tmp_path, np.array(["grey16.png"])).tolist() == [128.0]


def test_by_gate_shows_which_values_vary_within_the_subsets(tmp_path, capsys):
    """The fake run's A(x): value 0 separates the subsets, value 1 is large noise inside them."""
    _write_run(tmp_path / "run", seed=0)
    main([str(tmp_path / "run"), "--by-gate", "2"])
    printed = capsys.readouterr().out
    assert "run: share 0.0" in printed and "1 of 2 values hold half of the within-subset variance" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| A[")]
    assert rows[0].startswith("| A[1] | 1.000 |") and rows[1].startswith("| A[0] | 0.000 |")  # no config.yaml: A[i]
    assert float(rows[1].split(" | ")[3]) > 0.9  # value 0 varies mostly between the subsets


def test_curves_plots_and_prints_what_the_runs_logged(tmp_path, capsys):
    import json

    for seed, name in enumerate(["dr-seed0", "divdr-seed0"]):
        _write_run(tmp_path / name, seed=seed)
        lines = [{"step": 50, "metrics": {"loss/task": 1.0}}]  # training metrics: not curves
        lines += [{"step": step, "metrics": {"val/subset_variance_share": step / 1000 + seed / 10,
                                             "val/subset_probe": 0.9, "val/recovery": 0.5 + seed / 4,
                                             "val/miou_subset0": 0.6, "val/miou_subset1": 0.7,
                                             "val/gflops_subset0": 1.0, "val/gflops_subset1": 1.1}}
                  for step in (100, 200)]
        text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 3'  # cut short while writing
        (tmp_path / name / "metrics.jsonl").write_text(text)
    png = tmp_path / "curves.png"
    main([str(tmp_path / "dr-seed0"), str(tmp_path / "divdr-seed0"), "--curves", str(png)])
    printed = capsys.readouterr().out
    assert png.stat().st_size > 10_000
    assert "share:\n| step | dr-seed0 | divdr-seed0 |" in printed and "| 200 | 0.200 | 0.300 |" in printed
    assert "| 100 | 0.500 | 0.750 |" in printed  # recovery
    (tmp_path / "dr-seed0" / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "dr-seed0"), "--curves", str(png)])
    assert "holds no learning curves: train with --set train.eval_every=N" in capsys.readouterr().err
