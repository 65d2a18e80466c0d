"""Untrusted files: nothing the package reads can run code, exhaust memory or load half a file.

- pickles that would execute code are refused, and the code never runs;
- ``.npz`` spectra and results holding pickled object arrays are refused;
- forged safetensors headers and forged ``.npz`` members are refused before allocating;
- truncated checkpoints, results and spectra are refused with a ``ValueError`` naming the file;
- every file the package writes goes through a temporary name and a rename;
- a scan of the source (AST) finds no unsafe loader and no direct write.
"""

import ast
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import itdiffusion as itd
from itdiffusion import fileio as _io
from itdiffusion.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from itdiffusion.denoisers import load_state_dict

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "itdiffusion"


# --------------------------------------------------------------------------- #
# Files to attack
# --------------------------------------------------------------------------- #


class RunsCommand:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class CallsExec:
    """Unpickling this runs Python code that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def small_spectrum() -> itd.GaussianSpectrum:
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return itd.GaussianSpectrum.from_data(x)


@pytest.fixture(scope="module")
def results() -> itd.Results:
    spec = small_spectrum()
    model = itd.ITDiffusion(spec.denoise, spec)
    grid = itd.DiscreteGrid(-1.0, 1.0, 5)
    x = grid.round(torch.rand(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1)
    return itd.evaluate(model, [x], n_points=8, discrete=grid, dequantize=True, per_sample_curves=True)


def small_checkpoint() -> Checkpoint:
    torch.manual_seed(0)  # module initialisation only
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    return Checkpoint(model_state=net.state_dict(), optimizer_state=opt.state_dict(), epoch=3, meta={"note": "x"})


def rewrite_npz(path: Path, **replace) -> None:
    """Rewrite an ``.npz`` with some arrays replaced (object arrays are pickled by numpy)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(replace)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def assert_refused(call, path: Path, *, match: str | None = None) -> str:
    """``call()`` raises a one-line ``ValueError`` that names ``path`` (and matches ``match``)."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert path.name in message, message
    if match is not None:
        assert match.lower() in message.lower(), message
    return message


# --------------------------------------------------------------------------- #
# Pickles that would run code
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("payload", [RunsCommand, CallsExec])
@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle 0", "pickle 2", "pickle 5"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_pickle_that_would_run_code_is_refused(tmp_path, payload, writer, suffix):
    marker = tmp_path / "marker"
    path = tmp_path / f"evil{suffix}"
    obj = {"weight": torch.zeros(2), "surprise": payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    elif writer == "torch.save legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"weight": [0.0], "surprise": payload(marker)}, fh, protocol=int(writer[-1]))
    message = assert_refused(lambda: load_state_dict(path), path)
    assert "\n" not in message and "refus" in message
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_or_npz_is_refused(tmp_path):
    marker = tmp_path / "marker"
    for name in ("evil.safetensors", "evil.npz"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(RunsCommand(marker)))
        if name.endswith(".safetensors"):
            assert_refused(lambda: load_state_dict(path), path)
            assert_refused(lambda: load_checkpoint(path), path)
        else:
            assert_refused(lambda: itd.GaussianSpectrum.load(path), path, match="pickle")
            assert_refused(lambda: itd.Results.load(path), path, match="pickle")
    assert not marker.exists()


# --------------------------------------------------------------------------- #
# .npz and JSON results with pickled objects
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("key", ["mean", "log_eigs", "meta", "extra"])
def test_spectrum_npz_with_pickled_objects_is_refused(tmp_path, key):
    marker = tmp_path / "marker"
    path = tmp_path / "spectrum.npz"
    small_spectrum().save(path)
    rewrite_npz(path, **{key: np.array([RunsCommand(marker), 1.0], dtype=object)})
    assert_refused(lambda: itd.GaussianSpectrum.load(path), path, match="pickle")
    assert not marker.exists()


@pytest.mark.parametrize("key", ["logsnr", "curve/mmse", "term/discrete/nll", "meta"])
@pytest.mark.parametrize("given", ["json", "npz"])
def test_results_with_pickled_objects_are_refused(tmp_path, results, key, given):
    marker = tmp_path / "marker"
    path = tmp_path / "results.json"
    results.save(path)
    itd.Results.load(path)  # the untouched file loads
    rewrite_npz(path.with_suffix(".npz"), **{key: np.array([CallsExec(marker)], dtype=object)})
    target = path if given == "json" else path.with_suffix(".npz")
    assert_refused(lambda: itd.Results.load(target), path.with_suffix(".npz"), match="pickle")
    assert not marker.exists()


def test_spectrum_arrays_of_the_wrong_kind_are_refused(tmp_path):
    path = tmp_path / "spectrum.npz"
    small_spectrum().save(path)
    for bad in (np.zeros(3, dtype=np.complex128), np.array(["a", "b", "c"]), np.zeros(3, dtype="V8")):
        rewrite_npz(path, mean=bad)
        assert_refused(lambda: itd.GaussianSpectrum.load(path), path, match="mean")


def test_results_metadata_of_the_wrong_kind_is_refused(tmp_path, results):
    path = tmp_path / "results.json"
    for meta in ([1, 2], {"format": "itdiffusion.results", "version": 1, "shifts": [1]}, "text"):
        results.save(path)
        rewrite_npz(path.with_suffix(".npz"), meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        assert_refused(lambda: itd.Results.load(path), path.with_suffix(".npz"))
    results.save(path)
    path.write_text(json.dumps({"format": "something.else"}))
    assert_refused(lambda: itd.Results.load(path), path, match="something.else")
    path.write_text("[1, 2]")
    assert_refused(lambda: itd.Results.load(path), path)


def test_npz_that_is_not_an_archive_is_refused_clearly(tmp_path):
    single = tmp_path / "single.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros(3))
    assert_refused(lambda: itd.GaussianSpectrum.load(single), single, match=".npy")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    assert_refused(lambda: itd.GaussianSpectrum.load(text), text, match="not an .npz")


# --------------------------------------------------------------------------- #
# Forged headers: safetensors and .npz
# --------------------------------------------------------------------------- #

CKPT_META = {"itdiffusion": json.dumps({"format": "itdiffusion.checkpoint", "version": 1, "epoch": 0})}


def safetensors_bytes(header, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tensor(offsets, shape=(4,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


FORGED_SAFETENSORS = {
    "offsets beyond the file": safetensors_bytes({"__metadata__": CKPT_META, "model/w": tensor([0, 16])}, bytes(8)),
    "offsets past a short file": safetensors_bytes({"__metadata__": CKPT_META, "model/w": tensor([0, 2**40])}, bytes(16)),
    "overlapping tensors": safetensors_bytes(
        {"__metadata__": CKPT_META, "model/a": tensor([0, 8], (2,)), "model/b": tensor([4, 12], (2,))}, bytes(12)),
    "duplicate offsets": safetensors_bytes(
        {"__metadata__": CKPT_META, "model/a": tensor([0, 16]), "model/b": tensor([0, 16])}, bytes(16)),
    "absurd header length": safetensors_bytes(b"{}", length=2**62),
    "header length past the end": safetensors_bytes(b"{}", length=1000),
    "non-JSON header": safetensors_bytes(b"not json at all!"),
    "header is a list": safetensors_bytes([1, 2, 3]),
    "invalid UTF-8 header": safetensors_bytes(b"\xff\xfe\xfd\xfc"),
    "huge shape, tiny data": safetensors_bytes(
        {"__metadata__": CKPT_META, "model/w": tensor([0, 16], (2**40, 2**20))}, bytes(16)),
    "huge shape, matching offsets": safetensors_bytes(
        {"__metadata__": CKPT_META, "model/w": tensor([0, 2**62], (2**30, 2**30))}, bytes(16)),
    "shape overflowing 64 bits": safetensors_bytes(
        {"__metadata__": CKPT_META, "model/w": tensor([0, 16], (2**63, 2**63))}, bytes(16)),
    "negative dimension": safetensors_bytes({"__metadata__": CKPT_META, "model/w": tensor([0, 16], (-1,))}, bytes(16)),
    "unknown dtype": safetensors_bytes({"__metadata__": CKPT_META, "model/w": tensor([0, 16], dtype="X9")}, bytes(16)),
    "empty file": b"",
    "shorter than the length field": b"\x01\x02\x03",
}


@pytest.mark.parametrize("case", sorted(FORGED_SAFETENSORS))
def test_forged_safetensors_header_is_refused(tmp_path, case):
    path = tmp_path / "forged.safetensors"
    path.write_bytes(FORGED_SAFETENSORS[case])
    assert "\n" not in assert_refused(lambda: load_checkpoint(path), path)
    assert "\n" not in assert_refused(lambda: load_state_dict(path), path)


FORGED_CHECKPOINT_META = {
    "no metadata": None,
    "metadata not JSON": "{{",
    "metadata a list": "[1, 2]",
    "another format": json.dumps({"format": "someone.else", "version": 1, "epoch": 0}),
    "future version": json.dumps({"format": "itdiffusion.checkpoint", "version": 99, "epoch": 0}),
    "no epoch": json.dumps({"format": "itdiffusion.checkpoint", "version": 1}),
    "epoch a string": json.dumps({"format": "itdiffusion.checkpoint", "version": 1, "epoch": "x"}),
    "optimizer a list": json.dumps({"format": "itdiffusion.checkpoint", "version": 1, "epoch": 0, "optimizer": [1]}),
    "optimizer without groups": json.dumps({"format": "itdiffusion.checkpoint", "version": 1, "epoch": 0,
                                            "optimizer": {"scalars": {}}}),
    "optimizer scalar name": json.dumps({"format": "itdiffusion.checkpoint", "version": 1, "epoch": 0,
                                         "optimizer": {"param_groups": [], "scalars": {"noslash": 1}}}),
}


@pytest.mark.parametrize("case", sorted(FORGED_CHECKPOINT_META))
def test_forged_checkpoint_metadata_is_refused(tmp_path, case):
    from safetensors.torch import save

    meta = FORGED_CHECKPOINT_META[case]
    tensors = {"model/w": torch.zeros(2), "optim/bad/exp_avg": torch.zeros(2)}
    path = tmp_path / "forged.safetensors"
    path.write_bytes(save(tensors, metadata=None if meta is None else {"itdiffusion": meta}))
    assert_refused(lambda: load_checkpoint(path), path)


def _npz_member(shape, descr="<f8", payload=b"") -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue() + payload


@pytest.mark.parametrize(
    "members",
    [
        {"mean.npy": _npz_member((2**45,), payload=bytes(16))},  # would allocate 256 TiB
        {"mean.npy": _npz_member((2**31, 2**31), payload=bytes(16))},
        {"mean.npy": _npz_member((3,), payload=bytes(8))},  # data cut short
        {"mean.npy": _npz_member((3,), descr="|O", payload=pickle.dumps([1, 2, 3]))},
        {"mean.npy": b"\x93NUMPY\x09\x00garbage"},  # unknown .npy version
        {"mean.npy": b"\x93NUMPY\x01\x00\x20\x00{'descr': '<f8', 'fortran_order'  \n"},  # broken header
        {"notes.txt": b"hello"},  # not an array
    ],
    ids=["huge-1d", "huge-2d", "short-data", "object-dtype", "npy-version", "broken-header", "foreign-member"],
)
def test_forged_npz_members_are_refused_before_allocating(tmp_path, members):
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert_refused(lambda: _io.load_npz(path), path)
    assert_refused(lambda: itd.GaussianSpectrum.load(path), path)
    assert_refused(lambda: itd.Results.load(path), path)


def test_npz_zip_bomb_and_duplicates_are_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mean.npy", _npz_member((2**22,), payload=bytes(8 * 2**22)))  # 32 MiB of zeros
    # Claim a far larger uncompressed size than deflate can produce from these bytes.
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).infolist()[0]
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 2**32 - 1)  # uncompressed size in the central directory
    struct.pack_into("<I", data, info.header_offset + 22, 2**32 - 1)  # and in the local header
    path.write_bytes(bytes(data))
    assert_refused(lambda: _io.load_npz(path), path)

    dup = tmp_path / "dup.npz"
    with zipfile.ZipFile(dup, "w") as archive:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            archive.writestr("mean.npy", _npz_member((1,), payload=bytes(8)))
            archive.writestr("mean.npy", _npz_member((1,), payload=bytes(8)))
    assert_refused(lambda: _io.load_npz(dup), dup, match="twice")


def test_a_flipped_byte_in_npz_data_is_detected(tmp_path):
    path = tmp_path / "spectrum.npz"
    small_spectrum().save(path)
    data = bytearray(path.read_bytes())
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename == "log_eigs.npy")
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len  # the member's bytes: .npy header, then data
    data[start + info.file_size - 3] ^= 0xFF  # inside the last float of the array
    path.write_bytes(bytes(data))
    assert_refused(lambda: itd.GaussianSpectrum.load(path), path)


# --------------------------------------------------------------------------- #
# Truncated files
# --------------------------------------------------------------------------- #


def cut_points(size: int) -> list[int]:
    return sorted({0, 1, 4, 7, 8, 9, 30, size // 3, size // 2, size - 100, size - 22, size - 2, size - 1} & set(range(size)))


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, small_checkpoint())
    full = path.read_bytes()
    loaded = load_checkpoint(path)
    assert loaded.epoch == 3 and loaded.meta == {"note": "x"}
    for cut in cut_points(len(full)):
        path.write_bytes(full[:cut])
        assert_refused(lambda: load_checkpoint(path), path)
        assert_refused(lambda: load_state_dict(path), path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_pytorch_weights_are_refused(tmp_path, legacy):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(300.0), "b": torch.ones(3)}, path, _use_new_zipfile_serialization=not legacy)
    full = path.read_bytes()
    assert set(load_state_dict(path)) == {"w", "b"}
    for cut in cut_points(len(full)):
        path.write_bytes(full[:cut])
        assert_refused(lambda: load_state_dict(path), path)
    path.write_bytes(b"definitely not a pickle or a zip archive")
    assert_refused(lambda: load_state_dict(path), path)


def test_truncated_spectrum_is_refused(tmp_path):
    path = tmp_path / "spectrum.npz"
    small_spectrum().save(path)
    full = path.read_bytes()
    for cut in cut_points(len(full)):
        path.write_bytes(full[:cut])
        assert_refused(lambda: itd.GaussianSpectrum.load(path), path)


def test_truncated_results_are_refused(tmp_path, results):
    path = tmp_path / "results.json"
    results.save(path)
    npz, text = path.with_suffix(".npz").read_bytes(), path.read_bytes()
    for cut in cut_points(len(npz)):
        path.with_suffix(".npz").write_bytes(npz[:cut])
        assert_refused(lambda: itd.Results.load(path), path.with_suffix(".npz"))
    path.with_suffix(".npz").write_bytes(npz)
    for cut in cut_points(len(text)):
        if not text[:cut].strip() or not text[cut:].strip():
            continue  # nothing left, or only the trailing newline cut (still complete JSON)
        path.write_bytes(text[:cut])
        assert_refused(lambda: itd.Results.load(path), path)
    path.write_bytes(b"")
    assert_refused(lambda: itd.Results.load(path), path)
    path.write_bytes(text)
    loaded = itd.Results.load(path)
    assert loaded.summary() == results.summary()


# --------------------------------------------------------------------------- #
# Atomic writes
# --------------------------------------------------------------------------- #


def _writers(results):
    def figure(path):
        pytest.importorskip("matplotlib")
        from itdiffusion.reporting.plots import plot_mse

        plot_mse(results, path)

    return {
        "spectrum.npz": lambda path: small_spectrum().save(path),
        "results.json": lambda path: results.save(path),
        "ckpt.safetensors": lambda path: save_checkpoint(path, small_checkpoint()),
        "mse.png": figure,
    }


@pytest.mark.parametrize("name", ["spectrum.npz", "results.json", "ckpt.safetensors", "mse.png"])
def test_writes_are_atomic(tmp_path, monkeypatch, results, name):
    """A crash before the rename leaves the old file (and no temporary file) behind."""
    write = _writers(results)[name]
    path = tmp_path / name
    write(path)  # a complete first version
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    renamed = []

    def crash(src, dst):
        renamed.append((Path(src), Path(dst)))
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(_io.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write(path)
    (tmp, target), = renamed
    assert target in (path, path.with_suffix(".npz"))  # results write their arrays first
    assert tmp.parent == path.parent and tmp.name != target.name  # written under another name first
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # old contents intact, temporary file removed


def test_atomic_write_failure_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "data.bin"
    _io.write_atomic(path, lambda fh: fh.write(b"old"))

    def half(fh):
        fh.write(b"new but")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _io.write_atomic(path, half)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["data.bin"]


# --------------------------------------------------------------------------- #
# Source scan
# --------------------------------------------------------------------------- #

# Direct writes that are allowed, keyed by (file, enclosing function, call): why each is safe.
WRITE_ALLOWED = {
    ("fileio.py", "write_atomic", "os.fdopen"): "the temporary file of write_atomic itself",
    ("fileio.py", "save_npz_atomic", "np.savez"): "writes into write_atomic's temporary file handle",
    ("plots.py", "save_figure", "fig.savefig"): "renders into an in-memory buffer, then write_atomic",
    ("guard.py", "acquire", "os.open"): "the run's lock file beside its output (holds only a process id)",
    ("runlog.py", "__init__", "open"): "the training log's append-only CSV (first rewritten atomically to the rows "
                                        "of the checkpoint's epochs; a last line cut by a kill is dropped on resume)",
}
# Calls that write a file when given a path (checked unless allow-listed above).
WRITING_CALLS = {
    "torch.save", "np.save", "np.savez", "np.savez_compressed", "numpy.save", "numpy.savez",
    "numpy.savez_compressed", "save_file", "safetensors.torch.save_file", "json.dump", "pickle.dump",
    "shutil.copy", "shutil.copyfile", "shutil.copy2", "shutil.move", "os.fdopen",
}
WRITING_METHODS = {"write_text", "write_bytes", "savefig", "to_csv", "tofile"}
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    if isinstance(node, ast.Call):
        return _dotted(node.func) + "()"
    return ""


def _keyword(call: ast.Call, name: str):
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _write_mode(call: ast.Call) -> str | None:
    mode = call.args[1] if len(call.args) > 1 else _keyword(call, "mode")
    if mode is None:
        return None
    if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
        return mode.value if any(c in mode.value for c in "wax+") else None
    return "<non-constant mode>"


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: Path):
        self.rel = path.relative_to(PACKAGE).as_posix()
        self.name = path.name
        self.problems: list[str] = []
        self.functions: list[str] = []
        self.restricted_classes: list[bool] = []
        self.aliases: dict[str, str] = {}  # local name -> "module" or "module.attr"

    def report(self, node: ast.AST, what: str) -> None:
        self.problems.append(f"{self.rel}:{node.lineno}: {what}")

    # --- imports: remember what names refer to
    def visit_Import(self, node):
        for alias in node.names:
            self.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
            if alias.name.split(".")[0] in UNSAFE_MODULES - {"pickle"}:
                self.report(node, f"imports {alias.name}, which unpickles")
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if (node.module or "").split(".")[0] in UNSAFE_MODULES and alias.name in ("load", "loads", "Unpickler"):
                if not (alias.name == "Unpickler" and node.module == "pickle"):
                    self.report(node, f"imports {node.module}.{alias.name}")
        self.generic_visit(node)

    def resolve(self, node: ast.AST) -> str:
        name = _dotted(node)
        head, _, rest = name.partition(".")
        full = self.aliases.get(head, head)
        full = {"numpy": "np"}.get(full, full)
        return f"{full}.{rest}" if rest else full

    # --- scopes
    def visit_FunctionDef(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        bases = {self.resolve(b) for b in node.bases}
        is_unpickler = bool(bases & {"pickle.Unpickler", "_pickle.Unpickler"})
        if is_unpickler:
            overrides = any(isinstance(b, ast.FunctionDef) and b.name == "find_class" for b in node.body)
            if not overrides:
                self.report(node, f"class {node.name} subclasses pickle.Unpickler without restricting find_class")
        self.restricted_classes.append(is_unpickler)
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()
        self.restricted_classes.pop()

    # --- calls
    def visit_Call(self, node):
        name = self.resolve(node.func)
        short = _dotted(node.func)
        where = self.functions[-1] if self.functions else "<module>"
        in_restricted = any(self.restricted_classes)
        if name == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
            self.report(node, "torch.load without weights_only=True")
        if name == "np.load":
            flag = _keyword(node, "allow_pickle")
            if flag is not None and not _is_const(flag, False):
                self.report(node, "np.load with allow_pickle other than False")
        module, _, attr = name.rpartition(".")
        if module.split(".")[0] in UNSAFE_MODULES and attr in ("load", "loads") and not in_restricted:
            self.report(node, f"{name} outside a restricted unpickler")
        if name in ("pickle.Unpickler", "Unpickler") and not in_restricted:
            self.report(node, "an unrestricted pickle.Unpickler")
        if name == "torch.serialization.load" or name.endswith("_legacy_load"):
            self.report(node, f"{name}")
        # writes
        if name in ("open", "io.open", "builtins.open"):
            mode = _write_mode(node)
            if mode is not None and (self.name, where, "open") not in WRITE_ALLOWED:
                self.report(node, f"open(..., {mode!r}) outside _io.write_atomic")
        elif name in ("os.open",):
            if (self.name, where, name) not in WRITE_ALLOWED:
                self.report(node, "os.open (write through _io.write_atomic)")
        elif name in WRITING_CALLS or short in WRITING_CALLS:
            if (self.name, where, short) not in WRITE_ALLOWED and (self.name, where, name) not in WRITE_ALLOWED:
                self.report(node, f"{short} writes a file outside _io.write_atomic")
        elif isinstance(node.func, ast.Attribute) and node.func.attr in WRITING_METHODS:
            if (self.name, where, short) not in WRITE_ALLOWED:
                self.report(node, f"{short} writes a file outside _io.write_atomic")
        self.generic_visit(node)


def scan(path: Path) -> list[str]:
    scanner = _Scanner(path)
    scanner.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return scanner.problems


def test_source_has_no_unsafe_loader_and_no_direct_write():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    problems = [p for f in files for p in scan(f)]
    assert not problems, "\n".join(problems)


def test_every_allow_listed_write_still_exists():
    """An allow-list entry whose call is gone should be removed (so the list stays honest)."""
    for (file, function, call), _reason in WRITE_ALLOWED.items():
        source = next(PACKAGE.rglob(file)).read_text(encoding="utf-8")
        tree = ast.parse(source)
        found = any(
            isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name == function
            and any(isinstance(c, ast.Call) and _dotted(c.func) == call for c in ast.walk(fn))
            for fn in ast.walk(tree)
        )
        assert found, (file, function, call)


SCANNER_CASES = {
    "import torch\ntorch.load('x')": "weights_only",
    "import torch\ntorch.load('x', weights_only=False)": "weights_only",
    "import torch\nflag = True\ntorch.load('x', weights_only=flag)": "weights_only",
    "import torch as t\nt.load('x')": "weights_only",
    "from torch import load\nload('x')": "weights_only",
    "import numpy as np\nnp.load('x', allow_pickle=True)": "allow_pickle",
    "import numpy\nnumpy.load('x', allow_pickle=True)": "allow_pickle",
    "import pickle\npickle.load(open('x', 'rb'))": "pickle.load",
    "import pickle\npickle.loads(b'')": "pickle.loads",
    "import pickle as p\np.loads(b'')": "pickle.loads",
    "from pickle import loads\nloads(b'')": "pickle.loads",
    "import pickle\npickle.Unpickler(f).load()": "Unpickler",
    "import pickle\nclass U(pickle.Unpickler):\n    pass": "find_class",
    "import dill": "dill",
    "open('x', 'w')": "open",
    "open('x', mode='wb')": "open",
    "open('x', 'a')": "open",
    "from pathlib import Path\nPath('x').write_text('y')": "write_text",
    "import numpy as np\nnp.save('x.npy', a)": "np.save",
    "import torch\ntorch.save(obj, 'x.pt')": "torch.save",
    "from safetensors.torch import save_file\nsave_file(t, 'x')": "save_file",
    "import json\njson.dump(obj, fh)": "json.dump",
    "fig.savefig('x.png')": "savefig",
}
SCANNER_ALLOWED = [
    "import torch\ntorch.load('x', map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load('x', allow_pickle=False)",
    "import numpy as np\nnp.load('x')",
    "open('x')\nopen('x', 'rb')\nopen('x', encoding='utf-8')",
    "import pickle\n"
    "class Restricted(pickle.Unpickler):\n"
    "    def find_class(self, module, name):\n"
    "        raise pickle.UnpicklingError(name)\n"
    "    @classmethod\n"
    "    def read(cls, fh):\n"
    "        return cls(fh).load()\n"
    "def batch(fh):\n"
    "    return Restricted(fh).load()\n",
    "from pickle import Unpickler\nclass R(Unpickler):\n    def find_class(self, m, n):\n        raise ValueError(n)\n",
]


@pytest.mark.parametrize("source", sorted(SCANNER_CASES))
def test_scanner_catches_unsafe_code(source):
    path = PACKAGE / "_scanner_probe.py"  # scanned as if it were in the package, never written there
    scanner = _Scanner(path)
    scanner.visit(ast.parse(source))
    assert scanner.problems and any(SCANNER_CASES[source].lower() in p.lower() for p in scanner.problems), scanner.problems


@pytest.mark.parametrize("source", SCANNER_ALLOWED)
def test_scanner_allows_safe_code(source):
    scanner = _Scanner(PACKAGE / "_scanner_probe.py")
    scanner.visit(ast.parse(source))
    assert not scanner.problems, scanner.problems
