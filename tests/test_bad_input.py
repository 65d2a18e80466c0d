"""Bad input, as a table: every command and the public Python entry points.

Each CLI case runs ``itd ...`` in this process and must exit with status 2, print exactly
one line on stderr that names the problem (the expected text is in the table), print no
traceback, and leave nothing behind: its output folder stays empty and the fixture files
(the inputs, some of which are earlier outputs such as a run directory or a partial
evaluation) are unchanged.  Each Python case must raise ``ValueError`` (or an
``OSError`` for a missing file) whose message is one line holding the expected text.

The number of cases is printed at the end of the test session (see ``conftest.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itdiffusion.cli import main

SRC = Path(__file__).resolve().parent.parent / "src"
RUN_ARGS = ["--quiet", "--device", "cpu"]


# ----------------------------------------------------------------------------- fixtures
def _png(path: Path, size=(8, 8), mode="L", seed=0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def _folder(path: Path, n: int, **kwargs) -> Path:
    path.mkdir(parents=True)
    for i in range(n):
        _png(path / f"c{i % 2}_{i:03d}.png", seed=i, **kwargs)
    return path


def _forged_npy(path: Path) -> None:
    """A valid .npy header that declares 3 TB of uint8, followed by 16 bytes."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**6, 3, 1000, 1000)}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(bytes(16))


def _bump_results_version(src_json: Path, dst_json: Path, version: int) -> None:
    """Copy a results pair with its format version changed in both files."""
    from itdiffusion import fileio as _io

    meta = json.loads(src_json.read_text())
    meta["version"] = version
    dst_json.write_text(json.dumps(meta))
    arrays = _io.load_npz(src_json.with_suffix(".npz"))
    inner = json.loads(bytes(arrays["meta"]).decode())
    inner["version"] = version
    arrays["meta"] = np.frombuffer(json.dumps(inner).encode(), dtype=np.uint8)
    np.savez(dst_json.with_suffix(".npz"), **arrays)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every input of the table, built once (about 2 s: one tiny fine-tuning run, one tiny evaluation)."""
    import itdiffusion as itd
    from itdiffusion.evaluation import EvalConfig, Evaluator
    from itdiffusion.data.images import load_data

    root = tmp_path_factory.mktemp("bad-input")
    f = {"root": root}
    f["png"] = _folder(root / "png", 12)
    f["png16"] = _folder(root / "png16", 6, size=(16, 16))
    f["corrupt"] = _folder(root / "corrupt", 4)
    (f["corrupt"] / "c0_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    f["truncated_png"] = _folder(root / "truncated_png", 4)
    good = (f["truncated_png"] / "c0_000.png").read_bytes()
    (f["truncated_png"] / "c1_cut.png").write_bytes(good[: len(good) // 2])
    f["mixed"] = _folder(root / "mixed", 3)
    _png(f["mixed"] / "c0_small.png", size=(6, 6))
    f["mixed_channels"] = _folder(root / "mixed_channels", 3)
    _png(f["mixed_channels"] / "c0_colour.png", mode="RGB")
    f["empty"] = root / "empty"
    f["empty"].mkdir()
    f["no_images"] = root / "no_images"
    f["no_images"].mkdir()
    (f["no_images"] / "readme.txt").write_text("no images here")
    f["cifar_empty"] = root / "cifar_empty" / "cifar-10-batches-py"
    f["cifar_empty"].mkdir(parents=True)
    f["cifar_empty"] = f["cifar_empty"].parent

    rng = np.random.default_rng(0)
    grid8 = lambda n, c=1, s=8: rng.integers(0, 256, (n, c, s, s), dtype=np.uint8)  # noqa: E731
    on_grid = (grid8(8).astype(np.float32) / 127.5 - 1.0)
    arrays = {
        "nan": on_grid.copy(), "inf": on_grid.copy(), "range": on_grid * 3.0,
        "int300": grid8(8).astype(np.int16), "offgrid": rng.uniform(-1, 1, (80, 1, 8, 8)).astype(np.float32),
        "empty_npy": np.zeros((0, 1, 8, 8), np.float32), "vectors": rng.normal(size=(10, 5)),
        "cifar_like": grid8(4, 3, 32), "strings": np.array(["a", "b"]),
    }
    arrays["nan"][2, 0, 3, 3] = np.nan
    arrays["inf"][5, 0, 0, 1] = np.inf
    arrays["int300"][1, 0, 2, 2] = 300
    for name, value in arrays.items():
        f[name] = root / f"{name}.npy"
        np.save(f[name], value)
    f["objects"] = root / "objects.npy"
    np.save(f["objects"], np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    f["forged"] = root / "forged.npy"
    _forged_npy(f["forged"])
    f["garbage_npy"] = root / "garbage.npy"
    f["garbage_npy"].write_bytes(os.urandom(200))
    f["dir_npy"] = root / "folder.npy"
    f["dir_npy"].mkdir()
    f["text"] = root / "notes.txt"
    f["text"].write_text("not data\n")
    f["missing"] = root / "does-not-exist"

    digits = load_data("digits", "train")
    f["spec"] = root / "spectrum.npz"
    itd.GaussianSpectrum.from_data(digits.x, diagonal=True).save(f["spec"])
    f["spec16"] = root / "spectrum16.npz"
    itd.GaussianSpectrum.from_data(load_data(str(f["png16"])).x, diagonal=True).save(f["spec16"])
    f["spec_truncated"] = root / "spectrum_truncated.npz"
    f["spec_truncated"].write_bytes(f["spec"].read_bytes()[:300])
    f["spec_dir"] = root / "spectrum_dir.npz"
    f["spec_dir"].mkdir()

    f["run"] = root / "run"
    assert main(["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(f["spec"]),
                 "--out", str(f["run"]), "--epochs", "1", "--limit", "32", "--batch-size", "16", *RUN_ARGS]) == 0
    ckpt = (f["run"] / "checkpoint.safetensors").read_bytes()
    f["truncated_run"] = root / "truncated_run"
    f["truncated_run"].mkdir()
    (f["truncated_run"] / "checkpoint.safetensors").write_bytes(ckpt[: len(ckpt) * 2 // 3])
    f["truncated_ckpt"] = f["truncated_run"] / "checkpoint.safetensors"
    f["flipped_run"] = root / "flipped_run"
    f["flipped_run"].mkdir()
    flipped = bytearray(ckpt)
    flipped[-1000] ^= 0x10  # one bit of one weight: the file is otherwise perfectly valid
    (f["flipped_run"] / "checkpoint.safetensors").write_bytes(bytes(flipped))
    f["foreign"] = root / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.randn(4, 1, 3, 3), "conv.bias": torch.zeros(4)}, str(f["foreign"]))
    f["foreign_pt"] = root / "foreign.pt"
    torch.save({"state_dict": {"linear.weight": torch.randn(2, 2)}}, f["foreign_pt"])
    f["not_a_state_dict"] = root / "numbers.pt"
    torch.save([1, 2, 3], f["not_a_state_dict"])
    f["weights_txt"] = root / "weights.bin.txt"
    f["weights_txt"].write_text("weights")

    from itdiffusion.resolve import load_run

    spectrum = itd.GaussianSpectrum.load(f["spec"])
    model = itd.ITDiffusion(load_run(f["run"]).denoiser, spectrum)
    grid = itd.DiscreteGrid(-1.0, 1.0, 17)
    test = load_data("digits", "test", limit=8)
    res = itd.evaluate(model, [test.x], n_points=8, discrete=grid, dequantize=True)
    f["res"] = root / "results" / "res.json"
    res.save(f["res"])
    f["res_v2"] = root / "results" / "res_v2.json"
    _bump_results_version(f["res"], f["res_v2"], 99)
    f["res_truncated"] = root / "results" / "res_truncated.json"
    f["res_truncated"].write_text(f["res"].read_text()[:80])
    shutil.copy(f["res"].with_suffix(".npz"), f["res_truncated"].with_suffix(".npz"))
    f["res_npz_truncated"] = root / "results" / "res_npz_truncated.json"
    shutil.copy(f["res"], f["res_npz_truncated"])
    f["res_npz_truncated"].with_suffix(".npz").write_bytes(f["res"].with_suffix(".npz").read_bytes()[:1000])
    f["res_dir"] = root / "results" / "folder.json"
    f["res_dir"].mkdir()
    damaged = {"run_history_list": ("history.json", "[1, 2]"),
               "run_history_string_loss": ("history.json", '[{"epoch": 1, "train_loss": "x"}]'),
               "run_history_truncated": ("history.json", '[{"epoch": 1, "tr'),
               "run_info_no_d": ("run.json", '{"model": 1}'),
               "run_info_binary": ("run.json", "\udcff\udcfe"),
               "run_info_list": ("run.json", "[]")}
    for key, (name, text) in damaged.items():
        f[key] = root / key
        shutil.copytree(f["run"], f[key])
        (f[key] / name).write_bytes(text.encode("utf-8", "surrogateescape"))

    # A partial evaluation made with other settings, and a truncated one, beside their outputs.
    f["progress"] = root / "progress"
    f["progress"].mkdir()
    for name in ("other", "cut"):
        other = Evaluator(model, EvalConfig(n_points=4, discrete=grid))
        other.attach(f["progress"] / f"{name}.partial", {"model": "someone else's"})
        other.add_batch(test.x[:2])
        other.save_progress()
    chunk = f["progress"] / "cut.partial" / "rows-0000000000-0000000002.npz"
    chunk.write_bytes(chunk.read_bytes()[:500])
    f["other_partial_out"] = f["progress"] / "other.json"
    f["cut_partial_out"] = f["progress"] / "cut.json"
    f["done"] = f["progress"] / "done.json"
    f["done"].write_text("{}\n")
    f["nonempty"] = f["png"]
    return f


def _snapshot(root: Path) -> dict:
    """Every file and folder under ``root``, files with their size and modification time (a folder's
    own time changes when a run's lock file comes and goes beside an output; its entries are listed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.stat()
            out[path.relative_to(root).as_posix()] = (path.is_dir(), 0 if path.is_dir() else st.st_size,
                                                      0 if path.is_dir() else st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------- the CLI table
# (id, argv with {placeholders}, text the one error line must contain).  {out} is an empty
# folder of the case's own, where outputs are asked for; it must still be empty afterwards.
FT = ["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", "{spec}", "--limit", "16",
      "--epochs", "1", *RUN_ARGS]
EV = ["eval", "--model", "{run}", "--data", "digits", "--spectrum", "{spec}", "--points", "4", "--limit", "4",
      *RUN_ARGS]
def MAPS(command):  # noqa: N802 - the common arguments of itd infomap / mi / classify
    return [command, "--model", "small-unet", "--data", "digits", "--spectrum", "{spec}", "--points", "4"]


CLI_CASES = [
    # --- itd demo
    ("demo-unknown-dataset", ["demo", "--dataset", "nope", "--out", "{out}/d"], "unknown data set 'nope'"),
    ("demo-zero-epochs", ["demo", "--epochs", "0", "--out", "{out}/d"], "--epochs"),
    ("demo-negative-epochs", ["demo", "--epochs", "-3", "--out", "{out}/d"], "--epochs"),
    ("demo-out-is-a-file", ["demo", "--quick", "--out", "{text}"], "is a file"),
    # --- itd data
    ("data-cifar10-missing", ["data", "cifar10", "--from", "{missing}", "--out", "{out}/c"],
     "does-not-exist: no such file or folder"),
    ("data-cifar10-not-cifar-folder", ["data", "cifar10", "--from", "{png}", "--out", "{out}/c"], "png"),
    ("data-cifar10-empty-batches-folder", ["data", "cifar10", "--from", "{cifar_empty}", "--out", "{out}/c"],
     "data_batch_1"),
    ("data-cifar10-text-file", ["data", "cifar10", "--from", "{text}", "--out", "{out}/c"],
     "notes.txt: not a tar archive"),
    ("data-cifar10-out-not-empty", ["data", "cifar10", "--from", "{cifar_empty}", "--out", "{nonempty}"],
     "not an empty folder"),
    ("data-info-missing", ["data", "info", "--data", "{missing}"], "does-not-exist: no such file or folder"),
    ("data-info-empty-folder", ["data", "info", "--data", "{empty}"], "no png/jpg/jpeg images found"),
    ("data-info-folder-without-images", ["data", "info", "--data", "{no_images}"], "no png/jpg/jpeg images"),
    ("data-info-corrupt-png", ["data", "info", "--data", "{corrupt}"], "unreadable image file(s): c0_bad.png"),
    ("data-info-truncated-png", ["data", "info", "--data", "{truncated_png}"], "c1_cut.png"),
    ("data-info-mixed-sizes", ["data", "info", "--data", "{mixed}"], "images differ in size"),
    ("data-info-mixed-channels", ["data", "info", "--data", "{mixed_channels}"], "images differ in size or channels"),
    ("data-info-nan", ["data", "info", "--data", "{nan}"], "nan.npy: contains NaN or Inf"),
    ("data-info-inf", ["data", "info", "--data", "{inf}"], "inf.npy: contains NaN or Inf"),
    ("data-info-out-of-range", ["data", "info", "--data", "{range}"], "scaled to [-1, 1]"),
    ("data-info-int-off-grid", ["data", "info", "--data", "{int300}"], "must lie in 0..255"),
    ("data-info-empty-array", ["data", "info", "--data", "{empty_npy}"], "empty_npy.npy: no images"),
    ("data-info-not-images", ["data", "info", "--data", "{vectors}"], "expected images of shape"),
    ("data-info-strings", ["data", "info", "--data", "{strings}"], "strings.npy"),
    ("data-info-pickled-objects", ["data", "info", "--data", "{objects}"], "objects.npy: the array contains pickled objects"),
    ("data-info-forged-header", ["data", "info", "--data", "{forged}"], "forged.npy"),
    ("data-info-garbage-npy", ["data", "info", "--data", "{garbage_npy}"], "garbage.npy"),
    ("data-info-folder-named-npy", ["data", "info", "--data", "{dir_npy}"], "folder.npy"),
    ("data-info-text-file", ["data", "info", "--data", "{text}"], "expected a folder, a .npy file"),
    ("data-info-unknown-name", ["data", "info", "--data", "cifar100"], "cifar100: no such file or folder"),
    # --- itd spectrum
    ("spectrum-missing-data", ["spectrum", "--data", "{missing}", "--out", "{out}/s.npz"], "does-not-exist"),
    ("spectrum-empty-folder", ["spectrum", "--data", "{empty}", "--out", "{out}/s.npz"], "no png/jpg/jpeg"),
    ("spectrum-corrupt-png", ["spectrum", "--data", "{corrupt}", "--out", "{out}/s.npz"], "c0_bad.png"),
    ("spectrum-mixed-sizes", ["spectrum", "--data", "{mixed}", "--out", "{out}/s.npz"], "images differ in size"),
    ("spectrum-nan", ["spectrum", "--data", "{nan}", "--out", "{out}/s.npz", "--diagonal"], "NaN or Inf"),
    ("spectrum-out-is-a-folder", ["spectrum", "--data", "digits", "--out", "{out}"], "is a folder"),
    ("spectrum-too-few-images", ["spectrum", "--data", "{png}", "--out", "{out}/s.npz"], "--diagonal"),
    ("spectrum-dequantize-continuous", ["spectrum", "--data", "{offgrid}", "--out", "{out}/s.npz", "--dequantize"],
     "needs data on a grid"),
    ("spectrum-zero-samples", ["spectrum", "--data", "digits", "--out", "{out}/s.npz", "--max-samples", "0"],
     "--max-samples: expected a positive integer, got '0'"),
    ("spectrum-negative-samples", ["spectrum", "--data", "digits", "--out", "{out}/s.npz", "--max-samples", "-5"],
     "--max-samples"),
    ("spectrum-unknown-option", ["spectrum", "--data", "digits", "--out", "{out}/s.npz", "--diagnal"],
     "unrecognized arguments: --diagnal"),
    ("spectrum-missing-option", ["spectrum", "--data", "digits"], "--out"),
    # --- itd finetune
    ("finetune-missing-spectrum", [*FT, "--spectrum", "{missing}", "--out", "{out}/r"], "does-not-exist: no such file"),
    ("finetune-spectrum-is-a-folder", [*FT, "--spectrum", "{spec_dir}", "--out", "{out}/r"], "is a directory"),
    ("finetune-truncated-spectrum", [*FT, "--spectrum", "{spec_truncated}", "--out", "{out}/r"], "truncated"),
    ("finetune-results-as-spectrum", [*FT, "--spectrum", "{res_npz}", "--out", "{out}/r"],
     "expected a itdiffusion.spectrum file"),
    ("finetune-spectrum-dimension", [*FT, "--spectrum", "{spec16}", "--out", "{out}/r"],
     "the spectrum is for examples of shape (1, 16, 16)"),
    ("finetune-unknown-model", [*FT, "--model", "unet-xl", "--out", "{out}/r"], "--model 'unet-xl': not a model name"),
    ("finetune-registry-model-wrong-shape", [*FT, "--model", "ddpm-cifar10", "--out", "{out}/r"],
     "models images of shape (3, 32, 32)"),
    ("finetune-foreign-weights", [*FT, "--model", "{foreign}", "--out", "{out}/r"], "match no registry model"),
    ("finetune-foreign-pt-weights", [*FT, "--model", "{foreign_pt}", "--out", "{out}/r"], "match no registry model"),
    ("finetune-list-as-weights", [*FT, "--model", "{not_a_state_dict}", "--out", "{out}/r"], "no state dict"),
    ("finetune-truncated-checkpoint", [*FT, "--model", "{truncated_ckpt}", "--out", "{out}/r"],
     "truncated or invalid checkpoint"),
    ("finetune-truncated-run", [*FT, "--model", "{truncated_run}", "--out", "{out}/r"], "truncated"),
    ("finetune-corrupt-checkpoint", [*FT, "--model", "{flipped_run}", "--out", "{out}/r"], "corrupt checkpoint"),
    ("finetune-folder-without-model", [*FT, "--model", "{empty}", "--out", "{out}/r"], "neither a run directory"),
    ("finetune-weights-without-registry-name", [*FT, "--model", "{run}", "--weights", "{foreign}", "--out", "{out}/r"],
     "--weights goes with a registry model name"),
    ("finetune-empty-data", [*FT, "--data", "{empty}", "--out", "{out}/r"], "no png/jpg/jpeg"),
    ("finetune-corrupt-png", [*FT, "--data", "{corrupt}", "--out", "{out}/r"], "c0_bad.png"),
    ("finetune-mixed-sizes", [*FT, "--data", "{mixed}", "--out", "{out}/r"], "images differ in size"),
    ("finetune-nan", [*FT, "--data", "{nan}", "--out", "{out}/r"], "NaN or Inf"),
    ("finetune-corrupt-test-data", [*FT, "--test-data", "{corrupt}", "--out", "{out}/r"], "c0_bad.png"),
    ("finetune-test-data-other-shape", [*FT, "--test-data", "{png16}", "--out", "{out}/r"], "(1, 16, 16)"),
    ("finetune-dequantize-continuous", [*FT, "--data", "{offgrid}", "--spectrum", "{spec}", "--dequantize",
                                        "--out", "{out}/r"], "needs data on a grid"),
    ("finetune-zero-epochs", [*FT, "--epochs", "0", "--out", "{out}/r"], "--epochs: expected a positive integer"),
    ("finetune-zero-batch", [*FT, "--batch-size", "0", "--out", "{out}/r"], "--batch-size"),
    ("finetune-negative-lr", [*FT, "--lr", "-0.001", "--out", "{out}/r"], "--lr: expected a positive number"),
    ("finetune-nan-lr", [*FT, "--lr", "nan", "--out", "{out}/r"], "--lr"),
    ("finetune-zero-limit", [*FT, "--limit", "0", "--out", "{out}/r"], "--limit"),
    ("finetune-zero-test-points", [*FT, "--test-points", "0", "--out", "{out}/r"], "--test-points"),
    ("finetune-zero-grad-clip", [*FT, "--grad-clip", "0", "--out", "{out}/r"], "--grad-clip"),
    ("finetune-ema-above-one", [*FT, "--ema", "1.5", "--out", "{out}/r"],
     "--ema: expected a number strictly between 0 and 1, got '1.5'"),
    ("finetune-ema-one", [*FT, "--ema", "1", "--out", "{out}/r"], "--ema: expected a number strictly between 0 and 1"),
    ("finetune-ema-nan", [*FT, "--ema", "nan", "--out", "{out}/r"], "--ema"),
    ("finetune-zero-grad-accum", [*FT, "--grad-accum", "0", "--out", "{out}/r"],
     "--grad-accum: expected a positive integer, got '0'"),
    ("finetune-dtype-fp16", [*FT, "--dtype", "fp16", "--out", "{out}/r"], "--dtype: invalid choice: 'fp16'"),
    ("finetune-log-dir-is-a-file", [*FT, "--log-dir", "{text}", "--out", "{out}/r"], "--log-dir"),
    ("finetune-resume-with-ema", [*FT, "--limit", "32", "--ema", "0.9", "--resume", "--out", "{run}"],
     "--resume: ema differs"),
    ("finetune-resume-other-grad-accum", [*FT, "--limit", "32", "--grad-accum", "2", "--resume", "--out", "{run}"],
     "--resume: grad_accum differs"),
    ("finetune-resume-bf16", [*FT, "--limit", "32", "--dtype", "bf16", "--resume", "--out", "{run}"],
     "--resume: dtype differs"),
    ("finetune-resume-nothing", [*FT, "--resume", "--out", "{out}/r"], "nothing to resume"),
    ("finetune-existing-run", [*FT, "--out", "{run}"], "already holds a run; pass --resume"),
    ("finetune-resume-other-settings", [*FT, "--limit", "32", "--batch-size", "8", "--epochs", "2", "--resume",
                                        "--out", "{run}"], "cannot resume with different settings: batch_size 16 -> 8"),
    ("finetune-out-is-a-file", [*FT, "--out", "{text}"], "is a file"),
    ("finetune-lr-above-1", [*FT, "--limit", "32", "--batch-size", "8", "--lr", "1e30", "--out", "{out}/r"],
     "argument --lr: expected a learning rate in (0, 1]"),
    ("finetune-lr-above-1-with-a-log", [*FT, "--limit", "32", "--batch-size", "8", "--lr", "1.5", "--log-dir",
                                        "{out}/logs", "--out", "{out}/r"], "argument --lr"),
    # --- itd eval
    ("eval-out-not-json", [*EV, "--out", "{out}/r.txt"], "must name a .json file"),
    ("eval-out-is-a-folder", [*EV, "--out", "{res_dir}"], "is a folder"),
    ("eval-out-exists", [*EV, "--out", "{done}"], "exists; pass --overwrite"),
    ("eval-missing-data", [*EV, "--data", "{missing}", "--out", "{out}/r.json"], "does-not-exist"),
    # numeric flags are range-checked (no terabyte allocation, endless loop or segfault) and name the flag
    ("eval-points-1e10", [*EV, "--points", "10000000000", "--out", "{out}/r.json"], "--points: at most 10,000,000"),
    ("eval-seed-negative", [*EV, "--seed", "-1", "--out", "{out}/r.json"], "--seed: a seed must lie in"),
    ("eval-device-foo", [*EV[:-2], "--device", "foo", "--out", "{out}/r.json"], "--device 'foo' is not a torch device"),
    ("eval-device-cuda-on-cpu", [*EV[:-2], "--device", "cuda", "--out", "{out}/r.json"], "no CUDA GPU"),
    ("eval-device-meta", [*EV[:-2], "--device", "meta", "--out", "{out}/r.json"], "--device meta"),
    ("finetune-epochs-huge", [*FT, "--epochs", "100000000000000000000", "--out", "{out}/r"], "--epochs: at most"),
    ("compare-tol-tiny", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--tol", "1e-300"], "--tol must lie in"),
    ("compare-threads-huge", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--threads", "100000"],
     "--threads must be a positive integer of at most"),
    ("compare-device-foo", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--device", "foo"],
     "is not a torch device"),
    ("eval-empty-folder", [*EV, "--data", "{empty}", "--out", "{out}/r.json"], "no png/jpg/jpeg"),
    ("eval-corrupt-png", [*EV, "--data", "{corrupt}", "--out", "{out}/r.json"], "c0_bad.png"),
    ("eval-mixed-sizes", [*EV, "--data", "{mixed}", "--out", "{out}/r.json"], "images differ in size"),
    ("eval-nan", [*EV, "--data", "{nan}", "--out", "{out}/r.json"], "NaN or Inf"),
    ("eval-forged-npy", [*EV, "--data", "{forged}", "--out", "{out}/r.json"], "forged.npy"),
    ("eval-spectrum-dimension", [*EV, "--spectrum", "{spec16}", "--out", "{out}/r.json"],
     "the spectrum is for examples of shape (1, 16, 16)"),
    ("eval-model-for-other-images", [*EV, "--data", "{png16}", "--spectrum", "{spec16}", "--out", "{out}/r.json"],
     "models images of shape (1, 8, 8)"),
    ("eval-corrupt-checkpoint", [*EV, "--model", "{flipped_run}", "--out", "{out}/r.json"],
     "checkpoint.safetensors: corrupt checkpoint (its tensors do not match their SHA-256)"),
    ("eval-missing-spectrum", [*EV, "--spectrum", "{missing}", "--out", "{out}/r.json"], "no such file"),
    ("eval-unknown-model", [*EV, "--model", "ddpm-cifar100", "--out", "{out}/r.json"], "not a model name"),
    ("eval-missing-model-file", [*EV, "--model", "{missing}", "--out", "{out}/r.json"], "no such file or folder"),
    ("eval-registry-without-weights", [*EV, "--model", "ddpm-cifar10", "--data", "{cifar_like}",
                                       "--out", "{out}/r.json"], "needs --weights"),
    ("eval-checkpoint-of-other-architecture", [*EV, "--model", "ddpm-cifar10", "--weights", "{run_ckpt}",
                                               "--data", "{cifar_like}", "--out", "{out}/r.json"],
     "cannot load"),
    ("eval-weights-file-missing", [*EV, "--model", "ddpm-cifar10", "--weights", "{missing}.safetensors",
                                   "--data", "{cifar_like}", "--out", "{out}/r.json"], "no such file"),
    ("eval-weights-unknown-format", [*EV, "--model", "ddpm-cifar10", "--weights", "{weights_txt}",
                                     "--data", "{cifar_like}", "--out", "{out}/r.json"], "unknown weights format"),
    ("eval-dequantize-continuous", [*EV, "--data", "{offgrid}", "--dequantize", "--out", "{out}/r.json"],
     "offgrid.npy is continuous (not on a grid)"),
    ("eval-soft-round-continuous", [*EV, "--data", "{offgrid}", "--soft-round", "--out", "{out}/r.json"],
     "not on a grid"),
    ("eval-zero-points", [*EV, "--points", "0", "--out", "{out}/r.json"], "--points: expected a positive integer"),
    ("eval-negative-batch", [*EV, "--batch-size", "-1", "--out", "{out}/r.json"], "--batch-size"),
    ("eval-zero-limit", [*EV, "--limit", "0", "--out", "{out}/r.json"], "--limit"),
    ("eval-zero-images-per-step", [*EV, "--images-per-step", "0", "--out", "{out}/r.json"], "--images-per-step"),
    ("eval-zero-clip", [*EV, "--clip", "0", "--out", "{out}/r.json"], "argument --clip: expected a positive"),
    ("eval-tiny-clip", [*EV, "--clip", "1e-300", "--out", "{out}/r.json"], "argument --clip: expected 1 .. 700"),
    ("eval-huge-clip", [*EV, "--clip", "1e300", "--out", "{out}/r.json"], "argument --clip: expected 1 .. 700"),
    ("finetune-tiny-clip", ["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", "{spec}",
                            "--clip", "0.01", "--out", "{out}/run"], "argument --clip: expected 1 .. 700"),
    ("eval-device-empty", [*EV[:-2], "--device", "", "--out", "{out}/r.json"], "--device '' is not a torch device"),
    ("eval-device-cpu-index", [*EV[:-2], "--device", "cpu:1", "--out", "{out}/r.json"], "no device index 1"),
    ("eval-nan-clip", [*EV, "--clip", "nan", "--out", "{out}/r.json"], "--clip"),
    ("eval-infinite-clip", [*EV, "--clip", "inf", "--out", "{out}/r.json"], "argument --clip: expected a positive"),
    ("eval-negative-checkpoint-every", [*EV, "--checkpoint-every", "-1", "--out", "{out}/r.json"],
     "--checkpoint-every"),
    ("eval-partial-of-other-settings", [*EV, "--out", "{other_partial_out}"],
     "partial evaluation with other settings"),
    ("eval-truncated-partial", [*EV, "--out", "{cut_partial_out}"], "cut.partial/rows-0000000000-0000000002.npz: truncated or corrupt"),
    ("eval-resume-nothing", [*EV, "--resume", "--out", "{out}/r.json"], "nothing to resume"),
    ("eval-resume-and-fresh", [*EV, "--resume", "--fresh", "--out", "{out}/r.json"], "--fresh"),
    # --- itd report
    ("report-nothing", ["report", "--out", "{out}/rep"], "give results files"),
    ("report-missing-results", ["report", "{missing}.json", "--out", "{out}/rep"], "does-not-exist.json: no such file"),
    ("report-results-of-other-version", ["report", "{res_v2}", "--out", "{out}/rep"],
     "version 99 is not supported"),
    ("report-truncated-json", ["report", "{res_truncated}", "--out", "{out}/rep"], "truncated or invalid JSON"),
    ("report-truncated-npz", ["report", "{res_npz_truncated}", "--out", "{out}/rep"], "truncated or corrupt"),
    ("report-folder-as-results", ["report", "{res_dir}", "--out", "{out}/rep"], "folder.json is a directory"),
    ("report-spectrum-as-results", ["report", "{spec}", "--out", "{out}/rep"], "spectrum.npz"),
    ("report-image-folder-as-run", ["report", "--runs", "{png}", "--out", "{out}/rep"], "not a run directory"),
    ("report-run-history-not-records", ["report", "--runs", "{run_history_list}", "--out", "{out}/rep"],
     "history.json: damaged: record 1"),
    ("report-run-history-string-loss", ["report", "--runs", "{run_history_string_loss}", "--out", "{out}/rep"],
     "history.json: damaged"),
    ("report-run-history-truncated", ["report", "--runs", "{run_history_truncated}", "--out", "{out}/rep"],
     "history.json: unreadable"),
    ("report-run-info-without-d", ["report", "--runs", "{run_info_no_d}", "--out", "{out}/rep"],
     "run.json: damaged: no positive integer 'd'"),
    ("report-run-info-binary", ["report", "--runs", "{run_info_binary}", "--out", "{out}/rep"], "run.json: unreadable"),
    ("report-run-info-list", ["report", "--runs", "{run_info_list}", "--out", "{out}/rep"], "run.json: damaged"),
    ("report-names-count", ["report", "{res}", "--names", "a,b", "--out", "{out}/rep"], "2 names for 1 results"),
    ("report-out-is-a-file", ["report", "{res}", "--out", "{text}"], "notes.txt"),
    # --- itd compare
    ("compare-unknown-model", ["compare", "--model", "nope", "--data", "{vectors}"], "--model 'nope': not a model name"),
    ("compare-missing-data", ["compare", "--model", "gmm-exact", "--data", "{missing}.npy"], "no such file"),
    ("compare-folder-as-data", ["compare", "--model", "gmm-exact", "--data", "{dir_npy}"], "folder.npy"),
    ("compare-forged-npy", ["compare", "--model", "gmm-exact", "--data", "{forged}"], "forged.npy"),
    ("compare-pickled-objects", ["compare", "--model", "gmm-exact", "--data", "{objects}"], "objects.npy"),
    ("compare-nan", ["compare", "--model", "gmm-exact", "--data", "{nan}"], "nan.npy: contains NaN or Inf"),
    ("compare-empty-array", ["compare", "--model", "gmm-exact", "--data", "{empty_npy}"], "empty_npy.npy"),
    ("compare-text-data", ["compare", "--model", "gmm-exact", "--data", "{text}"], "must be a .npy file"),
    ("compare-zero-samples", ["compare", "--model", "gmm-exact", "--data", "sample:0"], "sample:N"),
    ("compare-unknown-method", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--methods", "it,elbo"],
     "unknown method(s) elbo"),
    ("compare-zero-points", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--n-points", "0"],
     "--n-points"),
    ("compare-negative-limit", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--limit", "-2"], "--limit"),
    ("compare-zero-dim", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--dim", "0"], "--dim"),
    ("compare-zero-components", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--components", "0"],
     "--components"),
    ("compare-negative-tol", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--tol", "-1"], "--tol"),
    ("compare-markdown-out", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--out", "{out}/t.md"],
     "--out takes the JSON path"),
    ("compare-out-is-a-folder", ["compare", "--model", "gmm-exact", "--data", "sample:4", "--methods", "it",
                                 "--n-points", "4", "--out", "{out}"], "folder"),
    ("compare-registry-wrong-shape", ["compare", "--model", "ddpm-cifar10", "--data", "{vectors}"],
     "models examples of shape (3, 32, 32)"),
    ("compare-spectrum-dimension", ["compare", "--model", "ddpm-cifar10", "--data", "{cifar_like}", "--spectrum",
                                    "{spec}", "--methods", "it", "--n-points", "2"],
     "spectrum.npz is for examples of shape (1, 8, 8)"),
    # itd infomap / mi / classify (issue 18)
    ("infomap-wrong-suffix", [*MAPS("infomap"), "--out", "{out}/m.txt"], "--out must name a .png or .pdf"),
    ("infomap-missing-spectrum", ["infomap", "--model", "small-unet", "--data", "digits", "--spectrum", "{missing}",
                                  "--out", "{out}/m.png"], "no such file"),
    ("mi-no-labels", [*MAPS("mi"), "--out", "{out}/m.png"], "has no labels"),
    ("mi-unconditional-model", [*MAPS("mi"), "--y", "3", "--out", "{out}/m.png"], "is not conditional"),
    ("classify-figure-out", [*MAPS("classify"), "--out", "{out}/c.png"], "--out must name a .json"),
    ("classify-missing-folder", ["classify", "--model", "small-unet", "--data", "{missing}", "--spectrum", "{spec}",
                                 "--out", "{out}/c.json"], "not a folder"),
    ("classify-negative-early-drop", [*MAPS("classify"), "--early-drop", "-1", "--out", "{out}/c.json"],
     "--early-drop must be a positive"),
]


def _fill(argv: list[str], f: dict, out: Path) -> list[str]:
    names = {k: str(v) for k, v in f.items()}
    names["out"] = str(out)
    names["run_ckpt"] = str(f["run"] / "checkpoint.safetensors")
    names["res_npz"] = str(f["res"].with_suffix(".npz"))
    return [a.format(**names) for a in argv]


@pytest.mark.filterwarnings("ignore:.*randomly initialised")
@pytest.mark.parametrize("argv, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli(files, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(files["root"])
    status = main(_fill(argv, files, out))
    captured = capsys.readouterr()
    err = captured.err
    assert status == 2, f"exit status {status}; stderr: {err[-2000:]}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err + captured.out
    assert lines[0].startswith("itd "), lines[0]
    assert message in lines[0], lines[0]
    assert list(out.iterdir()) == [], f"left behind: {[p.name for p in out.iterdir()]}"
    assert _snapshot(files["root"]) == before, "an input file was changed, created or deleted"


# ----------------------------------------------------------------------------- the Python table
def _py_cases():
    import itdiffusion as itd
    from itdiffusion.training.checkpoint import load_checkpoint
    from itdiffusion.denoisers import build_denoiser, load_state_dict
    from itdiffusion.evaluation import EvalConfig, Evaluator
    from itdiffusion.data.images import load_data, read_image_folder, read_npy
    from itdiffusion.resolve import load_run, resolve_model
    from itdiffusion.training.train import TrainConfig, train

    grid = itd.DiscreteGrid(-1.0, 1.0, 17)

    def model(f):
        return itd.ITDiffusion(lambda z, a: torch.zeros_like(z), itd.GaussianSpectrum.load(f["spec"]))

    def digits(n=4):
        return load_data("digits", "test", limit=n).x

    def nan_digits():
        x = digits()
        x[1, 0, 2, 2] = float("nan")
        return x

    def off_grid():
        x = digits()
        x[0, 0, 0, 0] += 0.01
        return x

    def fresh_unet(f):
        return itd.ITDiffusion(resolve_model("small-unet", spectrum=itd.GaussianSpectrum.load(f["spec"])).denoiser,
                               itd.GaussianSpectrum.load(f["spec"]))

    return [
        # spectra
        ("spectrum-from-data-nan", lambda f: itd.GaussianSpectrum.from_data(nan_digits(), diagonal=True), "NaN or Inf"),
        ("spectrum-from-data-one-sample", lambda f: itd.GaussianSpectrum.from_data(torch.zeros(1, 3)), "at least 2"),
        ("spectrum-from-data-empty", lambda f: itd.GaussianSpectrum.from_data(torch.zeros(0, 3)), "at least 2"),
        ("spectrum-from-data-too-few-for-full", lambda f: itd.GaussianSpectrum.from_data(torch.randn(5, 8)),
         "diagonal=True"),
        ("spectrum-load-missing", lambda f: itd.GaussianSpectrum.load(f["missing"]), "no such file"),
        ("spectrum-load-folder", lambda f: itd.GaussianSpectrum.load(f["spec_dir"]), "is a directory"),
        ("spectrum-load-truncated", lambda f: itd.GaussianSpectrum.load(f["spec_truncated"]), "truncated"),
        ("spectrum-load-results", lambda f: itd.GaussianSpectrum.load(f["res"].with_suffix(".npz")),
         "expected a itdiffusion.spectrum file"),
        # ITDiffusion.nll / loss
        ("nll-dimension", lambda f: model(f).nll(torch.zeros(2, 1, 16, 16), 8, seed=0), "(1, 8, 8)"),
        ("nll-nan", lambda f: model(f).nll(nan_digits(), 8, seed=0), "NaN or Inf"),
        ("nll-off-grid", lambda f: model(f).nll(off_grid(), 8, seed=0, discrete=grid), "off the declared grid"),
        ("nll-zero-points", lambda f: model(f).nll(digits(), 0, seed=0), "n_points"),
        ("nll-negative-points", lambda f: model(f).nll(digits(), -4, seed=0), "n_points"),
        ("nll-zero-batch", lambda f: model(f).nll(digits(), 8, seed=0, batch_size=0), "batch_size"),
        ("nll-empty", lambda f: model(f).nll(torch.zeros(0, 1, 8, 8), 8, seed=0), "no examples"),
        ("loss-nan", lambda f: model(f).loss(nan_digits()), "NaN or Inf"),
        ("loss-dimension", lambda f: model(f).loss(torch.zeros(2, 5)), "(1, 8, 8)"),
        ("itdiffusion-negative-clip", lambda f: itd.ITDiffusion(lambda z, a: z, itd.GaussianSpectrum.load(f["spec"]),
                                                                clip=-1.0), "clip"),
        # evaluate / Evaluator
        ("evaluate-no-examples", lambda f: itd.evaluate(model(f), [], n_points=8), "no examples"),
        ("evaluate-nan", lambda f: itd.evaluate(model(f), [nan_digits()], n_points=8), "NaN or Inf"),
        ("evaluate-off-grid", lambda f: itd.evaluate(model(f), [off_grid()], n_points=8, discrete=grid),
         "off the declared grid"),
        ("evaluate-dimension", lambda f: itd.evaluate(model(f), [torch.zeros(2, 1, 4, 4)], n_points=8), "(1, 8, 8)"),
        ("evaluate-zero-points", lambda f: itd.evaluate(model(f), [digits()], n_points=0), "n_points"),
        ("evaluate-zero-batch", lambda f: itd.evaluate(model(f), [digits()], n_points=8, batch_size=0), "batch_size"),
        ("evaluate-dequantize-without-grid", lambda f: itd.evaluate(model(f), [digits()], n_points=8, dequantize=True),
         "dequantize"),
        ("evaluate-unknown-placement", lambda f: itd.evaluate(model(f), [digits()], n_points=8, placement="sobol"),
         "placement"),
        ("evaluator-truncated-progress", lambda f: Evaluator(model(f), EvalConfig(n_points=4, discrete=grid))
         .load_progress(f["progress"] / "cut.partial"), "truncated or corrupt"),
        ("evaluator-other-settings", lambda f: Evaluator(model(f), EvalConfig(n_points=8, discrete=grid))
         .load_progress(f["progress"] / "other.partial"), "other settings"),
        # results
        ("results-load-missing", lambda f: itd.Results.load(f["missing"]), "no such file"),
        ("results-load-folder", lambda f: itd.Results.load(f["res_dir"]), "folder.json is a directory"),
        ("results-load-other-version", lambda f: itd.Results.load(f["res_v2"]), "version 99 is not supported"),
        ("results-load-other-version-npz", lambda f: itd.Results.load(f["res_v2"].with_suffix(".npz")),
         "version 99 is not supported"),
        ("results-load-truncated-json", lambda f: itd.Results.load(f["res_truncated"]), "truncated or invalid JSON"),
        ("results-load-truncated-npz", lambda f: itd.Results.load(f["res_npz_truncated"]), "truncated or corrupt"),
        ("results-load-spectrum", lambda f: itd.Results.load(f["spec"]), "expected a itdiffusion.results file"),
        ("ensemble-none", lambda f: itd.ensemble(), "at least one"),
        # data
        ("load-data-unknown-name", lambda f: load_data("mnist"), "mnist: no such file or folder"),
        ("load-data-bad-split", lambda f: load_data("digits", "validation"), "split"),
        ("load-data-zero-limit", lambda f: load_data("digits", limit=0), "must be positive"),
        ("load-data-negative-limit", lambda f: load_data("digits", limit=-3), "must be positive"),
        ("load-data-empty-folder", lambda f: load_data(str(f["empty"])), "no png/jpg/jpeg images"),
        ("load-data-corrupt-png", lambda f: load_data(str(f["corrupt"])), "c0_bad.png"),
        ("load-data-mixed-sizes", lambda f: load_data(str(f["mixed"])), "images differ in size"),
        ("load-data-nan", lambda f: load_data(str(f["nan"])), "contains NaN or Inf"),
        ("load-data-off-grid-int", lambda f: load_data(str(f["int300"])), "0..255"),
        ("load-data-forged-npy", lambda f: load_data(str(f["forged"])), "forged.npy"),
        ("load-data-garbage-npy", lambda f: load_data(str(f["garbage_npy"])), "garbage.npy"),
        ("load-data-empty-npy", lambda f: load_data(str(f["empty_npy"])), "no images"),
        ("read-image-folder-file", lambda f: read_image_folder(f["text"]), "not a folder"),
        ("read-npy-missing", lambda f: read_npy(f["missing"]), "does-not-exist"),
        ("read-npy-folder", lambda f: read_npy(f["dir_npy"]), "folder.npy"),
        # models and weights
        ("build-denoiser-unknown", lambda f: build_denoiser("unet-xl"), "unknown model 'unet-xl'"),
        ("build-denoiser-unknown-override", lambda f: build_denoiser("ddpm-cifar10", colour=3), "unknown override"),
        ("build-denoiser-other-architecture", lambda f: build_denoiser("ddpm-cifar10", f["foreign"]), "cannot load"),
        ("build-denoiser-missing-weights", lambda f: build_denoiser("iddpm-cifar10-vlb", f["missing"]), "no such file"),
        ("load-state-dict-missing", lambda f: load_state_dict(f["missing"]), "no such file"),
        ("load-state-dict-folder", lambda f: load_state_dict(f["dir_npy"]), "folder.npy is a directory"),
        ("load-state-dict-unknown-format", lambda f: load_state_dict(f["weights_txt"]), "unknown weights format"),
        ("load-state-dict-not-a-state-dict", lambda f: load_state_dict(f["not_a_state_dict"]), "no state dict"),
        ("load-state-dict-truncated", lambda f: load_state_dict(f["truncated_ckpt"]), "truncated"),
        ("load-checkpoint-truncated", lambda f: load_checkpoint(f["truncated_ckpt"]), "truncated"),
        ("load-checkpoint-one-bit-flipped", lambda f: load_checkpoint(f["flipped_run"] / "checkpoint.safetensors"),
         "corrupt checkpoint"),
        ("load-checkpoint-foreign", lambda f: load_checkpoint(f["foreign"]), "not an itdiffusion checkpoint"),
        ("load-checkpoint-folder", lambda f: load_checkpoint(f["run"]), "is not a file"),
        ("load-run-empty-folder", lambda f: load_run(f["empty"]), "no such checkpoint file"),
        ("resolve-model-unknown", lambda f: resolve_model("unet-xl"), "not a model name"),
        ("resolve-small-unet-without-spectrum", lambda f: resolve_model("small-unet"), "--spectrum"),
        # training
        ("train-zero-batch", lambda f: train(fresh_unet(f), digits(8), TrainConfig(batch_size=0), progress=False),
         "batch_size"),
        ("train-zero-epochs", lambda f: train(fresh_unet(f), digits(8), TrainConfig(epochs=0), progress=False),
         "epochs"),
        ("train-negative-lr", lambda f: train(fresh_unet(f), digits(8), TrainConfig(lr=-1.0), progress=False), "lr"),
        ("train-nan-data", lambda f: train(fresh_unet(f), nan_digits(), TrainConfig(), progress=False), "NaN or Inf"),
        ("train-empty-data", lambda f: train(fresh_unet(f), digits(8)[:0], TrainConfig(), progress=False),
         "no examples"),
        ("train-dimension", lambda f: train(fresh_unet(f), torch.zeros(4, 1, 4, 4), TrainConfig(), progress=False),
         "(1, 8, 8)"),
        ("train-resume-nothing", lambda f: train(fresh_unet(f), digits(8), TrainConfig(), out_dir=f["empty"],
                                                 resume=True, progress=False), "nothing to resume"),
        ("grid-one-level", lambda f: itd.DiscreteGrid(-1.0, 1.0, 1), "levels"),
    ]


PY_CASES = _py_cases()


@pytest.mark.parametrize("call, message", [c[1:] for c in PY_CASES], ids=[c[0] for c in PY_CASES])
def test_python(files, call, message):
    before = _snapshot(files["root"])
    with pytest.raises((ValueError, OSError)) as info:
        call(files)
    text = str(info.value)
    assert "\n" not in text.strip(), f"a multi-line message:\n{text}"
    assert message in text, text
    assert _snapshot(files["root"]) == before, "an input file was changed, created or deleted"


def test_pickled_weights_are_refused_with_a_vulnerable_torch(files, monkeypatch):
    from itdiffusion.denoisers import load_state_dict

    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(ValueError, match=r"torch 2\.5\.1: .*CVE-2025-32434"):
        load_state_dict(files["foreign_pt"])
    assert load_state_dict(files["foreign"]).keys() == {"conv.weight", "conv.bias"}  # safetensors: no pickle


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="no png/jpg/jpeg"):
        main(["--debug", "data", "info", "--data", str(files["empty"])])


def test_a_real_process_exits_2_with_one_line(files):
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "itdiffusion.cli", "data", "info", "--data", str(files["corrupt"])],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "c0_bad.png" in done.stderr and "Traceback" not in done.stderr


def test_the_table_covers_every_command():
    from itdiffusion.cli import SUBCOMMANDS

    covered = {argv[0] for _, argv, _ in CLI_CASES}
    assert covered == set(SUBCOMMANDS)
    assert {argv[1] for _, argv, _ in CLI_CASES if argv[0] == "data"} == {"cifar10", "info"}
    ids = [c[0] for c in CLI_CASES] + [c[0] for c in PY_CASES]
    assert len(ids) == len(set(ids))
