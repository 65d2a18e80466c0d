"""Safe weight loading: no code runs from a file, and mismatches are reported compactly."""

import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from itdiffusion.denoisers import load_into, load_state_dict

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "itdiffusion"


def small_module() -> torch.nn.Module:
    torch.manual_seed(0)  # module initialisation only
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


class CreatesFile:
    """Unpickling this calls open(path, "w"), i.e. creates a file: code runs at load time."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------- #
# Refusing pickles that run code
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"weight": torch.zeros(2), "surprise": CreatesFile(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"weight": [0.0, 0.0], "surprise": CreatesFile(marker)}, f, protocol=int(writer[-1]))
    with pytest.raises(ValueError) as info:
        load_state_dict(path)
    assert not marker.exists()
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "refusing" in message
    if writer != "pickle protocol 4":  # protocol 4 is refused before any global is read
        assert "open'" in message  # names what the pickle would have imported


def test_non_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no state dict"):
        load_state_dict(tmp_path / "list.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_state_dict(tmp_path / "weights.npz")
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.pt")


def test_no_unsafe_loading_calls_in_package():
    """Every torch.load passes weights_only=True; nothing unpickles through numpy or pickle."""
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "allow_pickle=True" not in source, path.name
        assert not re.search(r"\bpickle\.loads?\(", source), path.name


# --------------------------------------------------------------------------- #
# Formats and containers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_formats_round_trip(tmp_path, suffix):
    state = small_module().state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    loaded = load_state_dict(path)
    assert list(loaded) == list(state) or sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value)
    target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    assert load_into(target, loaded, source=str(path)) is target
    assert torch.equal(target[2].weight, state["2.weight"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "step": 10},
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    ],
    ids=["state_dict", "model+module.", "compiled"],
)
def test_common_containers_are_unwrapped(tmp_path, wrap):
    state = small_module().state_dict()
    torch.save(wrap(state), tmp_path / "ckpt.pt")
    loaded = load_state_dict(tmp_path / "ckpt.pt")
    assert sorted(loaded) == sorted(state)


# --------------------------------------------------------------------------- #
# Compact mismatch reports
# --------------------------------------------------------------------------- #


def test_mismatch_message_is_compact():
    module = small_module()
    state = dict(module.state_dict())
    del state["0.bias"]
    state["2.weight"] = torch.zeros(5, 3)
    for i in range(10):
        state[f"extra.{i}.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        load_into(module, state, source="ckpt.pt")
    message = str(info.value)
    assert "ckpt.pt" in message and "Sequential" in message
    assert "1 missing: 0.bias" in message
    assert "10 unexpected: extra.0.weight, extra.1.weight, extra.2.weight, ... (+7 more)" in message
    assert "1 shape mismatches: 2.weight: file [5, 3] vs model [2, 3]" in message
    assert "extra.9" not in message and len(message) < 400
    assert torch.count_nonzero(module[2].weight) > 0  # nothing was loaded
