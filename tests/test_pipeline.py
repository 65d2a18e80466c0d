"""The image pipeline through the CLI: spectrum -> finetune -> eval -> report on digits.

Also: a two-process (torchrun, gloo) evaluation equals the one-process one, and a killed
evaluation resumed with the same command equals an uninterrupted one.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from itdiffusion import Results
from itdiffusion.cli import main

SRC = Path(__file__).resolve().parent.parent / "src"
EVAL_ARGS = ["--data", "digits", "--quiet", "--device", "cpu"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # one thread, as in this process (see conftest)
    return env


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """spectrum -> finetune (1 epoch) through the CLI; returns paths and the seconds it took."""
    root = tmp_path_factory.mktemp("pipeline")
    began = time.perf_counter()
    spectrum = root / "spectrum.npz"
    assert main(["spectrum", "--data", "digits", "--out", str(spectrum), "--dequantize"]) == 0
    run = root / "run"
    assert main(["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum),
                 "--out", str(run), "--epochs", "1", "--limit", "256", "--batch-size", "32", "--lr", "2e-3",
                 "--grad-clip", "1", "--test-data", "digits", "--test-examples", "32", "--test-points", "16",
                 "--quiet", "--device", "cpu"]) == 0
    return {"root": root, "spectrum": spectrum, "run": run, "seconds": time.perf_counter() - began}


def _eval(model, spectrum, out, *extra):
    args = ["eval", "--model", str(model), "--spectrum", str(spectrum), "--out", str(out), *EVAL_ARGS, *extra]
    assert main(args) == 0, args


def test_digits_end_to_end_through_the_cli(pipeline, capsys):
    began = time.perf_counter()
    root, spectrum, run = pipeline["root"], pipeline["spectrum"], pipeline["run"]
    assert {p.name for p in run.iterdir()} == {"checkpoint.safetensors", "history.json", "run.json"}
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"]) and math.isfinite(history[0]["val_nll"])
    tuned, fresh = root / "tuned.json", root / "fresh.json"
    _eval(run, spectrum, tuned, "--points", "24", "--limit", "32", "--dequantize")
    _eval("small-unet", spectrum, fresh, "--points", "24", "--limit", "32", "--dequantize", "--label", "Gaussian")
    report = root / "report"
    assert main(["report", str(tuned), str(fresh), "--runs", str(run), "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| Ensemble |" in printed
    names = {p.name for p in report.iterdir()}
    expected = {"table.md", "table.tex", "estimates.md", "summary.json"}
    for stem in ("error_curves", "rounded_curves", "loss_curves"):
        expected |= {f"{stem}.png", f"{stem}.pdf"}
    assert names == expected
    for name in expected:
        assert (report / name).stat().st_size > 100, name

    d = 64
    for path in (tuned, fresh):
        saved = json.loads(path.read_text())
        res, again = Results.load(path), Results.load(path.with_suffix(".npz"))
        assert res.summary() == saved["estimates"] == again.summary()  # reloads identically
        assert res.n_examples == 32 and set(saved["estimates"]) >= {"continuous", "discrete", "dequantized_discrete"}
        for est in saved["estimates"].values():
            assert all(math.isfinite(v) for v in est.values())
            assert est["bpd"] == pytest.approx(est["nats"] / (d * math.log(2)), rel=1e-12)
            assert est["se_bpd"] == pytest.approx(est["se_nats"] / (d * math.log(2)), rel=1e-12)

    rows = {r["model"]: r for r in json.loads((report / "summary.json").read_text())["rows"]}
    members = [rows[k] for k in rows if k != "Ensemble"]
    assert len(members) == 2 and "Gaussian" in rows
    for column in ("continuous", "discrete", "dequantized_discrete"):
        best = min(m[column]["nats"] for m in members)
        # per-image curves are stored in float32: the ensemble's sums carry ~1e-6 nats of rounding
        assert rows["Ensemble"][column]["nats"] <= best + 1e-5, column
        assert math.isfinite(rows["Ensemble"][column]["se_nats"])
    assert rows["Gaussian"]["discrete"]["bpd"] == Results.load(fresh)["discrete"].bpd
    table = (report / "table.md").read_text()
    assert f"{rows['Gaussian']['discrete']['bpd']:.4f}" in table
    assert pipeline["seconds"] + time.perf_counter() - began < 120


def test_two_processes_give_the_one_process_result(pipeline):
    root, spectrum, run = pipeline["root"], pipeline["spectrum"], pipeline["run"]
    one, two = root / "one.json", root / "two.json"
    args = ["--points", "16", "--limit", "22", "--dequantize", "--soft-round"]
    _eval(run, spectrum, one, *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "itdiffusion.cli", "eval", "--model", str(run), "--spectrum", str(spectrum), "--out", str(two),
           *EVAL_ARGS, *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = Results.load(one), Results.load(two)
    assert b.config["processes"] == 2 and a.config["processes"] == 1 and b.n_examples == a.n_examples == 22
    # Each image's noise is the same in both runs; only how images are batched into network calls
    # differs, which moves float32 network outputs by rounding (relative ~1e-7).
    for name, est in a.estimates.items():
        assert b[name].nats == pytest.approx(est.nats, rel=1e-6, abs=1e-6), name
        assert b[name].se_nats == pytest.approx(est.se_nats, rel=1e-5), name
    for key, curve in a.curves.items():
        np.testing.assert_allclose(b.curves[key], curve, rtol=1e-6, atol=1e-9, err_msg=key)
    for name, term in a.terms.items():
        np.testing.assert_allclose(b.terms[name].nll_nats, term.nll_nats, rtol=1e-6, atol=1e-6, err_msg=name)
    assert not list(root.glob("two.partial*"))


def _rows_saved(folder) -> int:
    """Rows held by a progress folder's chunk files (each must read back whole)."""
    total = 0
    for path in folder.glob("rows-*.npz"):
        with np.load(path, allow_pickle=False) as arrays:
            first, stop = (int(v) for v in path.stem.split("-")[1:])
            assert all(len(arrays[k]) == stop - first for k in arrays.files)
        total += stop - first
    return total


def test_killed_eval_resumes_with_the_same_command(pipeline, capsys):
    root, spectrum, run = pipeline["root"], pipeline["spectrum"], pipeline["run"]
    out, partial = root / "killed.json", root / "killed.partial"
    args = ["eval", "--model", str(run), "--spectrum", str(spectrum), "--out", str(out), *EVAL_ARGS,
            "--points", "128", "--limit", "40", "--images-per-step", "4", "--checkpoint-every", "0", "--dequantize"]
    proc = subprocess.Popen([sys.executable, "-m", "itdiffusion.cli", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(partial.glob("rows-*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert partial.exists() and not out.exists(), "the evaluation finished before it could be killed"
    n_saved = _rows_saved(partial)
    assert 0 < n_saved < 40
    capsys.readouterr()
    assert main(args) == 0  # the same command again
    assert f"resuming after {n_saved} images" in capsys.readouterr().err  # the status line, on stderr
    assert out.exists() and not partial.exists()
    reference = root / "uninterrupted.json"
    assert main(args[:6] + [str(reference)] + args[7:]) == 0
    a, b = Results.load(reference), Results.load(out)
    assert a.summary() == b.summary()
    for key in a.curves:
        assert np.array_equal(a.curves[key], b.curves[key]), key
    for name in a.terms:
        assert np.array_equal(a.terms[name].nll_nats, b.terms[name].nll_nats), name


def test_eval_device_options_agree_with_plain(pipeline):
    root, spectrum, run = pipeline["root"], pipeline["spectrum"], pipeline["run"]
    plain, nhwc = root / "plain.json", root / "nhwc.json"
    args = ["--points", "8", "--limit", "6", "--dequantize"]
    _eval(run, spectrum, plain, *args)
    _eval(run, spectrum, nhwc, *args, "--channels-last")
    a, b = Results.load(plain), Results.load(nhwc)
    for name, est in a.estimates.items():
        assert b[name].nats == pytest.approx(est.nats, rel=1e-5, abs=1e-5), name


def test_eval_refuses_bad_input_before_writing(pipeline, capsys, tmp_path):
    spectrum, run = pipeline["spectrum"], pipeline["run"]
    base = ["eval", "--model", str(run), "--spectrum", str(spectrum), *EVAL_ARGS, "--points", "8", "--limit", "4"]
    cases = [
        (["--out", str(tmp_path / "r.txt")], "must name a .json"),
        (["--out", str(tmp_path / "r.json"), "--model", "nonsense"], "not a model name"),
        (["--out", str(tmp_path / "r.json"), "--data", str(tmp_path / "none")], "no such file or folder"),
        (["--out", str(tmp_path / "r.json"), "--model", "ddpm-cifar10"], "needs --weights"),
        (["--out", str(tmp_path / "r.json"), "--model", "ddpm-cifar10", "--weights", "w.pt"],
         "images of shape (3, 32, 32)"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "r.json").write_text("{}")
    assert main(base + ["--out", str(tmp_path / "r.json")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_finetune_resume_and_refusals(pipeline, tmp_path, capsys):
    spectrum = pipeline["spectrum"]
    args = ["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--limit", "64",
            "--batch-size", "32", "--quiet", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main(args + ["--epochs", "1"]) == 0
    assert main(args + ["--epochs", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--epochs", "2", "--resume"]) == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and history[0]["val_nll"] is None
    # fine-tuning a run further starts a new run from its weights
    assert main(args[:2] + [str(tmp_path / "run")] + args[3:-1] + [str(tmp_path / "run2"), "--epochs", "1"]) == 0
    info = json.loads((tmp_path / "run2" / "run.json").read_text())
    assert info["model"] == str(tmp_path / "run") and info["label"] == "small-unet, IT-tuned"
    assert main(args[:-1] + [str(tmp_path / "run3"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "run3").exists()


@pytest.mark.parametrize("flag,value,key", [("--limit", "48", "limit"), ("--seed", "3", "seed"),
                                            ("--proposal", "logistic", "proposal"), ("--clip", "4", "train_clip"),
                                            ("--spectrum", "OTHER", "spectrum_id"), ("--model", "RUN", "model"),
                                            ("--dequantize", None, "dequantize"),
                                            ("--test-data", "digits", "test_data")])
def test_finetune_resume_refuses_every_changed_setting(pipeline, tmp_path, capsys, flag, value, key):
    """A resumed run continues on exactly the data, model, spectrum and proposal it began with."""
    spectrum = pipeline["spectrum"]
    out = tmp_path / "run"
    base = ["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--limit", "64",
            "--batch-size", "32", "--quiet", "--device", "cpu", "--out", str(out), "--epochs", "1"]
    assert main(base) == 0
    if value == "OTHER":
        value = str(tmp_path / "other.npz")
        assert main(["spectrum", "--data", "digits", "--out", value]) == 0
    value = str(pipeline["run"]) if value == "RUN" else value
    changed = list(base)
    if flag in changed:
        changed[changed.index(flag) + 1] = value
    else:
        changed += [flag] + ([value] if value is not None else [])
    before = (out / "checkpoint.safetensors").read_bytes()
    capsys.readouterr()
    assert main(changed + ["--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{key} differs" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "checkpoint.safetensors").read_bytes() == before


def test_outputs_never_replace_inputs(pipeline, tmp_path, capsys):
    """eval, compare, finetune and spectrum refuse an output that is, or writes a sibling over, an input."""
    spectrum = tmp_path / "s.npz"
    spectrum.write_bytes(pipeline["spectrum"].read_bytes())
    data = tmp_path / "d.npy"
    np.save(data, np.zeros((40, 1, 8, 8), np.uint8))
    before = {p: p.read_bytes() for p in (spectrum, data)}
    cases = [
        ["eval", "--model", "small-unet", "--spectrum", str(spectrum), "--out", str(tmp_path / "s.json"), *EVAL_ARGS],
        ["spectrum", "--data", str(data), "--out", str(data)],
        ["compare", "--model", "gmm-exact", "--data", str(data), "--out", str(data), "--methods", "it"],
        ["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--out", str(tmp_path),
         "--quiet"],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert ("would replace" in err or "is a file" in err) and len(err.strip().splitlines()) == 1, (argv, err)
    assert {p: p.read_bytes() for p in before} == before


def test_two_process_finetune_writes_one_run_equal_to_one_process(pipeline, tmp_path):
    """Two processes train with the noise one process draws, and the gradient of the same batch mean.

    Batches of 31 are split 16/15 and the last batch of 3 is split 2/1, so the loss scaling of
    uneven shares is exercised.  What still differs is the order of floating-point sums (the
    gradient all-reduce): the losses agree to ~1e-9, the weights to ~1e-7 in relative norm, but
    single weights can differ by up to ~10% of one Adam step (Adam divides by the root of the
    squared gradients, which amplifies rounding where a gradient nearly cancels), so the runs
    are not bit-identical (see docs/guarantees.md, Determinism).
    """
    spectrum = pipeline["spectrum"]
    args = ["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--epochs", "2",
            "--limit", "96", "--batch-size", "31", "--dequantize", "--test-data", "digits", "--test-examples", "16",
            "--test-points", "8", "--quiet", "--device", "cpu"]
    out, one = tmp_path / "ddp", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "itdiffusion.cli", *args, "--out", str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch   1") == 1  # only the first process prints
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and all(math.isfinite(r["val_nll"]) for r in history)
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    from itdiffusion.training.checkpoint import load_checkpoint
    from itdiffusion.resolve import load_run

    assert load_run(out).epoch == 2
    assert main([*args, "--out", str(one)]) == 0
    for a, b in zip(json.loads((one / "history.json").read_text()), history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
        assert b["val_nll"] == pytest.approx(a["val_nll"], rel=1e-6)
    wa, wb = load_checkpoint(one / "checkpoint.safetensors"), load_checkpoint(out / "checkpoint.safetensors")
    keys = [k for k, v in wa.model_state.items() if v.is_floating_point()]
    diff = sum(float((wa.model_state[k].double() - wb.model_state[k].double()).square().sum()) for k in keys)
    norm = sum(float(wa.model_state[k].double().square().sum()) for k in keys)
    assert math.sqrt(diff / norm) < 1e-5  # measured 1.3e-7; with noise drawn per process (before) 4.7e-3


@pytest.mark.slow  # about 20 s: torchrun starts two processes
def test_two_process_finetune_with_grad_accum_and_ema_equals_one_process(pipeline, tmp_path):
    """Passes of 2 x 15 images per step on 2 processes (4 shares; the last batch of 6 splits 2/2/1/1):
    the same steps, losses and (EMA) weights as one process, to the order of floating-point sums."""
    from itdiffusion.training.checkpoint import load_checkpoint

    args = ["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(pipeline["spectrum"]),
            "--epochs", "2", "--limit", "96", "--batch-size", "15", "--grad-accum", "2", "--ema", "0.9",
            "--dequantize", "--test-data", "digits", "--test-examples", "16", "--test-points", "8", "--quiet",
            "--device", "cpu"]
    out, one = tmp_path / "ddp", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "itdiffusion.cli", *args, "--out", str(out), "--log-dir", str(out / "logs")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--out", str(one), "--log-dir", str(one / "logs")]) == 0
    rows = [(out / "logs" / "log.csv").read_text().splitlines(), (one / "logs" / "log.csv").read_text().splitlines()]
    assert len(rows[0]) == len(rows[1]) == 1 + 2 * 4
    for a, b in zip(*(r[1:] for r in rows)):
        a, b = a.split(","), b.split(",")
        assert a[:2] == b[:2] and float(a[2]) == pytest.approx(float(b[2]), rel=1e-5, abs=1e-5)
    wa, wb = load_checkpoint(one / "checkpoint.safetensors"), load_checkpoint(out / "checkpoint.safetensors")
    for state in ("model_state", "ema_state"):
        a, b = getattr(wa, state), getattr(wb, state)
        keys = [k for k, v in a.items() if v.is_floating_point()]
        diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys)
        norm = sum(float(a[k].double().square().sum()) for k in keys)
        assert math.sqrt(diff / norm) < 1e-5, state  # measured 6e-8 (raw) and 5e-8 (EMA)


def test_spectrum_command(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["spectrum", "--data", "digits", "--out", str(out), "--max-samples", "10"]) == 2
    assert "--diagonal" in capsys.readouterr().err and not out.exists()
    assert main(["spectrum", "--data", "digits", "--out", str(out), "--max-samples", "10", "--diagonal"]) == 0
    assert "diagonal spectrum of 10 images" in capsys.readouterr().out
    from itdiffusion import GaussianSpectrum
    from itdiffusion.data.images import load_data

    spec = GaussianSpectrum.load(out)
    assert spec.diagonal and spec.shape == (1, 8, 8)
    assert main(["spectrum", "--data", "digits", "--out", str(tmp_path / "dq.npz"), "--dequantize"]) == 0
    deq, plain = GaussianSpectrum.load(tmp_path / "dq.npz"), GaussianSpectrum.from_data(load_data("digits").x)
    # delta^2 / 12 is added to every eigenvalue (before the floor that keeps constant pixels finite)
    torch.testing.assert_close(deq.log_eigs.exp(), plain.log_eigs.exp() + 0.125**2 / 12, atol=1e-5, rtol=1e-6)


def test_eval_protocol_paper_through_the_cli(pipeline):
    root, spectrum, run = pipeline["root"], pipeline["spectrum"], pipeline["run"]
    paper, ours = root / "paper.json", root / "ours.json"
    _eval(run, spectrum, paper, "--points", "16", "--limit", "8", "--dequantize", "--soft-round",
          "--protocol", "paper")
    _eval(run, spectrum, ours, "--points", "16", "--limit", "8", "--dequantize", "--soft-round")
    got, base = Results.load(paper), Results.load(ours)
    assert got.config["protocol"] == "paper" and got.config["clip"] == 4.0
    assert base.config["protocol"] == "ours" and base.config["clip"] != 4.0
    assert got.config["standard_errors"]["published"]["discrete"] > 0
    estimates = got.estimates
    assert "discrete_published_min" in estimates and "discrete_gauss_min" not in estimates
    assert estimates["discrete_published_min"].nats <= estimates["discrete"].nats + 1e-9
    assert not np.allclose(got.logsnr, base.logsnr)  # the published iid points, not the midpoint rule


def test_report_layout_paper(pipeline, tmp_path):
    root, spectrum, run = pipeline["root"], pipeline["spectrum"], pipeline["run"]
    paper = root / "paper.json"
    if not paper.exists():
        _eval(run, spectrum, paper, "--points", "16", "--limit", "8", "--dequantize", "--soft-round",
              "--protocol", "paper")
    bounds = tmp_path / "vlb.json"
    bounds.write_text(json.dumps({"discrete": True, "methods": {"vlb": {"bpd": 3.25, "se_bpd": 0.125}}}))
    out = tmp_path / "report"
    assert main(["report", str(paper), "--layout", "paper", "--bounds", str(bounds), "--names", "tuned",
                 "--out", str(out)]) == 0
    text = (out / "table_paper.md").read_text()
    measured, published = text.split("Published figures")
    est = Results.load(paper).estimates
    assert f"{est['discrete_published_min'].bpd:.4f}" in measured and "3.2500 ± 0.1250" in measured
    assert "IT fine-tuned" in measured and "3.68" not in measured and "3.68" in published
    assert (out / "table_paper.tex").read_text().startswith("\\begin{table}")
    # a bad bounds file is refused before anything is written
    bad = tmp_path / "bad"
    assert main(["report", str(paper), "--layout", "paper", "--bounds", str(paper), "--out", str(bad)]) == 2
    assert not bad.exists()


def test_eval_killed_on_two_processes_finishes_on_one(pipeline, capsys):
    """Issue 15: a run started under torchrun with 2 processes, killed, is finished by 1 process
    with the same command, and equals an uninterrupted run."""
    import signal

    root, spectrum, run = pipeline["root"], pipeline["spectrum"], pipeline["run"]
    out, partial = root / "two-then-one.json", root / "two-then-one.partial"
    args = ["eval", "--model", str(run), "--spectrum", str(spectrum), "--out", str(out), *EVAL_ARGS,
            "--points", "64", "--limit", "40", "--images-per-step", "2", "--checkpoint-every", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "itdiffusion.cli", *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while len(list(partial.glob("rows-*.npz"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    _kill_processes_with(str(out))  # torchrun's workers may run in sessions of their own
    proc.wait()
    assert partial.exists() and not out.exists(), "the evaluation finished before it could be killed"
    n_saved = _rows_saved(partial)
    assert 0 < n_saved < 40
    capsys.readouterr()
    assert main(args) == 0  # one process, the same command
    assert out.exists() and not partial.exists()
    reference = root / "two-then-one-reference.json"
    assert main(args[:6] + [str(reference)] + args[7:]) == 0
    a, b = Results.load(reference), Results.load(out)
    assert b.n_examples == a.n_examples == 40
    for name, est in a.estimates.items():  # batching differs (network calls in float32): rounding only
        assert b[name].nats == pytest.approx(est.nats, rel=1e-6, abs=1e-6), name
    for name in a.terms:
        np.testing.assert_allclose(b.terms[name].nll_nats, a.terms[name].nll_nats, rtol=1e-6, atol=1e-6)


def _kill_processes_with(argument: str) -> None:
    """SIGKILL every process whose command line holds ``argument``, and wait until they are gone."""
    import signal

    def matching() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if argument.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    deadline = time.monotonic() + 30
    while (pids := matching()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)
