"""Golden numbers: nll, evaluate, compare and training give the same values as when the
fixture was made (``tests/golden/make_golden.py``), so refactoring cannot change a result."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from golden_cases import CASES  # noqa: E402

GOLDEN = np.load(Path(__file__).parent / "golden" / "golden.npz")


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_numbers_as_the_golden_file(name):
    got = {f"{name}/{k}": np.asarray(v, dtype=np.float64) for k, v in CASES[name]().items()}
    want = {k: GOLDEN[k] for k in GOLDEN.files if k.startswith(name + "/")}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-10, atol=1e-12, err_msg=key)
