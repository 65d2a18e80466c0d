"""Write tests/golden/golden.npz: numbers of nll, evaluate, compare and the training loss at fixed seeds.

Run once before a refactor (``python tests/golden/make_golden.py``); ``tests/test_golden.py``
then checks that the package still produces the same numbers.  The cases are defined in
``golden_cases.py`` so the generator and the test compute exactly the same things.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from golden_cases import CASES  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    out = {}
    for name, fn in CASES.items():
        for key, value in fn().items():
            out[f"{name}/{key}"] = np.asarray(value, dtype=np.float64)
            print(f"{name}/{key}: {np.asarray(value).ravel()[:3]}")
    np.savez(Path(__file__).with_name("golden.npz"), **out)


if __name__ == "__main__":
    main()
