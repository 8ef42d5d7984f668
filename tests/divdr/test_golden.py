"""The training forward and backward give what they gave before the cell was rewritten for speed (#20)."""

import json

import pytest

from tests.divdr.golden import CASES, GOLDEN, training_signatures


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_outputs_and_gradients_unchanged(case):
    expected = json.loads(GOLDEN.read_text())[case]
    found = training_signatures(CASES[case])
    assert sorted(found) == sorted(expected)
    for name, (total, magnitude, projection) in expected.items():
        scale = max(magnitude, 1e-12)
        got = found[name]
        assert got[0] == pytest.approx(total, abs=1e-9 * scale), name
        assert got[1] == pytest.approx(magnitude, rel=1e-9, abs=1e-9), name
        assert got[2] == pytest.approx(projection, abs=1e-9 * scale), name
