"""The run tables (pipeline/columns.py): one row per run, mean +- std per group of seeds."""

from pipeline.columns import REPORT_METRICS, format_seed_table, format_table


def test_segmentation_table_formats_each_metric_and_marks_missing_ones():
    table = format_table({"DR-A": {"miou": 0.7104, "gflops_real": 0.0467, "gflops_real_1024x2048": 2.98,
                                   "inter": 1.1612, "intra": 0.9721, "recovery": 0.35, "cluster_sizes": [1, 25, 34]},
                          "bare": {}})
    header, rule, dr, bare = table.splitlines()
    assert header.startswith("| run | mIoU | GFLOPs (eval size) | GFLOPs @1024x2048 |")
    assert rule == "|" + "---|" * 8
    assert dr == "| DR-A | 0.710 | 0.047 | 3.0 | 1.161 | 0.972 | 0.350 | [1, 25, 34] |"
    assert bare == "| bare | nan | nan | nan | nan | nan | nan | None |"


def test_detection_runs_get_coco_columns():
    table = format_table({"det": {"bbox/AP": 0.337, "bbox/AP50": 0.719, "gflops_real_800x800": 0.861}})
    header, _, row = table.splitlines()
    assert "| bbox AP | AP50 | AP75 | segm AP |" in header and "GFLOPs @800x800" in header
    assert row.startswith("| det | 0.337 | 0.719 | nan | nan | nan | 0.86 |")


def test_seed_table_gives_mean_and_std_per_group():
    runs = {"DR-A": [{"miou": 0.70, "recovery": 0.5}, {"miou": 0.72, "recovery": 0.7}],
            "DivDR-A": [{"miou": 0.60, "recovery": 1.0}]}
    header, _, dr, div = format_seed_table(runs).splitlines()
    assert header.startswith("| run | seeds | mIoU |") and "val cluster sizes" not in header
    assert dr.startswith("| DR-A | 2 | 0.710 ± 0.010 |") and "| 0.600 ± 0.100 |" in dr
    assert div.startswith("| DivDR-A | 1 | 0.600 ± 0.000 |") and "| nan |" in div  # a metric no run has


def test_reports_aggregate_the_numeric_columns():
    assert REPORT_METRICS == ("miou", "gflops_real", "gflops_real_1024x2048", "inter", "intra", "recovery")
