"""pipeline/report.py: sweep plots."""

from pipeline.report import integer_ticks


def test_integer_parameters_get_their_own_values_as_ticks():
    assert integer_ticks([4, 2, 3, 2]) == [2, 3, 4]  # K: never 2.25 clusters
    assert integer_ticks([0.1, 1]) is None  # alpha, lambda2: matplotlib's own ticks
    assert integer_ticks([True, False]) is None
    assert integer_ticks(["DR-A", "DivDR-A"]) is None
    assert integer_ticks([]) is None
