"""Property-based adversarial tests (hypothesis) over command-line arguments and file contents.

The fixed cases of test_bad_input.py say what one input must give; these say what *every*
input must give: a command either works or refuses with exit status 2 and one line (naming
the flag when the flag is what is wrong), never a traceback, never a file left behind; a
reader either returns what was written or raises a one-line ValueError.
"""

import math
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import itdiffusion as itd
from itdiffusion import fileio
from itdiffusion.cli import main
from itdiffusion.denoisers import load_state_dict

FAST = settings(max_examples=60, deadline=None, derandomize=True,  # the same cases every run: CI never flakes
                 suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "1e10", "1e-300", "-0", "0x10", "1_000", "٣", "nan", "-inf", "1e400", "2**8", "10.",
                     "--", "-1", "3.5", "1 2"]),
    st.text(max_size=8),
)

# (command prefix, flag, a check that says whether the value is in the flag's documented range)
def _integer(lo: int, hi: int):
    """Integer flags take integers written as integers ('10', not '10.' or '1e1')."""
    return lambda v: re.fullmatch(r"[+-]?[0-9]+", v) is not None and lo <= int(v) <= hi


FLAGS = [
    ("eval", "--points", _integer(1, 10**7)),
    ("eval", "--batch-size", _integer(1, 2**24)),
    ("eval", "--seed", _integer(0, 2**63 - 1)),
    ("eval", "--clip", lambda v: 1 <= float(v) <= 700),
    ("eval", "--limit", _integer(1, 10**9)),
    ("finetune", "--epochs", _integer(1, 10**6)),
    ("finetune", "--lr", lambda v: 0 < float(v) <= 1),
    ("finetune", "--clip", lambda v: 1 <= float(v) <= 700),
    ("finetune", "--ema", lambda v: 0 < float(v) < 1),
    ("finetune", "--grad-accum", _integer(1, 2**24)),
]


def _in_range(check, value: str) -> bool | None:
    """True/False where the value is plainly a number in/out of range; None where it is not a plain number."""
    try:
        float(value)
    except ValueError:
        return None
    if value.strip() != value or "_" in value or not value.isascii():
        return None
    try:
        return bool(check(value))
    except (ValueError, OverflowError):
        return False


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


def _argv(command: str, flag: str, value: str, out) -> list[str]:
    missing = str(out / "no-such-spectrum.npz")  # the run stops at this after the flags are accepted
    base = {"eval": ["eval", "--model", "small-unet", "--data", "digits", "--spectrum", missing,
                     "--out", str(out / "r.json")],
            "finetune": ["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", missing,
                         "--out", str(out / "run")],
            }[command]
    return base + ["--quiet", "--device", "cpu", f"{flag}={value}"]


@pytest.mark.parametrize("command,flag,check", FLAGS, ids=[f"{c}{f}" for c, f, _ in FLAGS])
@FAST
@given(value=NUMBERS)
def test_every_value_of_a_numeric_flag_is_accepted_or_refused_in_one_line(command, flag, check, value, root, capfd):
    out = root / f"{command}-{flag.strip('-')}"  # the flag itself must not be in the path
    out.mkdir(exist_ok=True)
    capfd.readouterr()
    code = main(_argv(command, flag, value, out))
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2, (value, err)
    assert len(err) == 1 and "Traceback" not in err[0], (value, err)
    in_range = _in_range(check, value)
    if in_range is False:
        assert flag in err[0], (value, err)  # refused for the flag, and the message says which
    elif in_range is True:
        assert flag not in err[0] and "no such" in err[0], (value, err)  # accepted; stopped at the missing file
    assert sorted(os.listdir(out)) == [], os.listdir(out)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One valid file of each kind this package reads back."""
    root = tmp_path_factory.mktemp("files")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    spectrum = itd.GaussianSpectrum.from_data(x)
    spectrum.save(root / "s.npz")
    mix = itd.GaussianMixture(torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                              torch.ones(1, dtype=torch.float64))
    itd.evaluate(itd.ITDiffusion(mix, spectrum), [x[:4]], n_points=4).save(root / "r.json")
    np.save(root / "d.npy", np.random.default_rng(0).integers(0, 256, (4, 1, 4, 4), dtype=np.uint8))
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2), "b": torch.zeros(2)}, str(root / "w.safetensors"))
    return root


READERS = {
    "s.npz": lambda p: itd.GaussianSpectrum.load(p),
    "r.json": lambda p: itd.Results.load(p),
    "r.npz": lambda p: itd.Results.load(p.with_suffix(".json")),
    "d.npy": lambda p: fileio.load_npy(p),
    "w.safetensors": lambda p: load_state_dict(p),
}


def _damage(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "splice":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(max_size=64)) + data[i:]
    return draw(st.binary(max_size=512))


@pytest.mark.parametrize("name", sorted(READERS))
@FAST
@given(data=st.data())
def test_a_damaged_file_reads_back_or_is_refused_in_one_line(name, written, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("damaged")
    for f in written.iterdir():  # the pair (r.json, r.npz) travels together
        (folder / f.name).write_bytes(f.read_bytes())
    target = folder / name
    target.write_bytes(_damage(target.read_bytes(), data.draw))
    try:
        READERS[name](target)
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        assert message and "\n" not in message.strip(), message
