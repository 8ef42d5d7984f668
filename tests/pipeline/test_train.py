"""pipeline/train.py without Ray: the summary table."""

from pipeline.train import format_table


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
