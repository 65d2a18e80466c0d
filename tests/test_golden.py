"""Golden numbers: nll, evaluate, compare and training give the same values as when the
fixture was made (``tests/golden/make_golden.py``), so refactoring cannot change a result."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from golden_cases import CASES  # noqa: E402

GOLDEN = np.load(Path(__file__).parent / "golden" / "golden.npz")

# Trained float32 weights differ in the last bits with the order of CPU reductions (thread count):
# one float32 ulp after a few optimiser steps. Every other number is float64 arithmetic.
FLOAT32_KEYS = {"training_run/weights": dict(rtol=1e-6, atol=1e-9)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_numbers_as_the_golden_file(name):
    got = {f"{name}/{k}": np.asarray(v, dtype=np.float64) for k, v in CASES[name]().items()}
    want = {k: GOLDEN[k] for k in GOLDEN.files if k.startswith(name + "/")}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        tol = FLOAT32_KEYS.get(key, dict(rtol=1e-10, atol=1e-12))
        np.testing.assert_allclose(got[key], value, err_msg=key, **tol)
