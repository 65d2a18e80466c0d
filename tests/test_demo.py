"""``itd demo`` end to end (quick mode) and its bad-input handling."""

import json

import pytest

from itdiffusion.cli import main


def test_quick_demo_writes_metrics_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--dataset", "scg", "--quick", "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dataset", "d", "test_nll_nats", "test_nll_nats_se", "test_nll_bpd", "true_nll_nats"):
        assert key in metrics
    assert metrics["dataset"] == "scg" and metrics["d"] == 2
    for name in ("density.png", "mse.png", "results.json", "results.npz", "checkpoint.safetensors", "history.json"):
        assert (out / name).stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert "continuous -log p(x), nats" in capsys.readouterr().out


def test_quick_demo_on_digits_reports_discrete_bits(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["demo", "--dataset", "digits", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out  # every metric says what it measures: the discrete bounds come first
    assert "validation discrete bound -log P(x) (32 examples x 8 calls) <=" in printed and "val nll" not in printed
    table = printed[printed.index("estimate (test set)"):]
    assert table.index("dequantized bound on -log P(x), bits/dim") < table.index("continuous -log p(x), nats (grid")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["d"] == 64
    for key in ("test_discrete_bpd", "test_discrete_bpd_se", "test_dequantized_bpd"):
        assert metrics[key] > 0
    assert (out / "images.png").exists() and not (out / "density.png").exists()


def test_unknown_dataset(tmp_path, capsys):
    assert main(["demo", "--dataset", "mnist", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown data set 'mnist'" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_output_directory_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err
    assert target.read_text() == "not a directory"


def test_bad_epochs(tmp_path, capsys):
    assert main(["demo", "--epochs", "0", "--out", str(tmp_path / "y")]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        main(["--debug", "demo", "--dataset", "nope", "--out", str(tmp_path / "z")])
