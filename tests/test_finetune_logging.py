"""Fine-tuning that reports: EMA weights, gradient accumulation, bf16 autocast, the run log, the progress bar."""

import csv
import io
import re
import shutil
import sys

import pytest
import torch

import itdiffusion as itd
from itdiffusion.cli import main
from itdiffusion.training.checkpoint import load_checkpoint
from itdiffusion.training.ema import EMA
from itdiffusion.training.runlog import COLUMNS, RunLog, tensorboard_available
from itdiffusion.training.train import TrainConfig, train
from conftest import make_mixture
from test_train import TinyDenoiser


def make_model(seed=0, dropout=0.0):
    mix = make_mixture(2, seed=3)
    x = mix.sample(300, torch.Generator().manual_seed(seed)).float()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = TinyDenoiser(dropout=dropout)
    return itd.ITDiffusion(net, itd.GaussianSpectrum.from_data(x)), x[:250], x[250:]


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ----------------------------------------------------------------------------- EMA
def test_ema_update_is_the_hand_computed_average():
    net = torch.nn.Linear(3, 2)
    frozen = net.bias.requires_grad_(False)
    w0 = net.weight.detach().double().clone()
    ema = EMA(net, 0.9)
    assert set(ema.state_dict()) == {"weight"}  # trainable parameters only
    steps = [torch.full_like(net.weight, v) for v in (1.0, -2.0, 0.5)]
    for w in steps:
        with torch.no_grad():
            net.weight.copy_(w)
        ema.update(net)
    expected = 0.9**3 * w0 + sum(0.1 * 0.9 ** (2 - i) * w.double() for i, w in enumerate(steps))
    assert ema.state_dict()["weight"].dtype == torch.float32
    assert torch.allclose(ema.state_dict()["weight"].double(), expected, atol=1e-6)
    raw = net.weight.detach().clone()
    with ema.applied(net):
        assert torch.equal(net.weight, ema.state_dict()["weight"])
    assert torch.equal(net.weight, raw) and frozen is net.bias  # the raw weights are back, exactly


def test_one_step_ema_in_a_run_and_the_checkpoint_holds_both(tmp_path):
    model, x, x_val = make_model()
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    train(model, x, TrainConfig(epochs=1, batch_size=len(x), lr=1e-2, ema=0.75, val_points=8), x_val=x_val,
          out_dir=tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ckpt.ema_state is not None and set(ckpt.ema_state) == set(init)
    for name, w0 in init.items():
        raw = ckpt.model_state[name]
        assert torch.equal(raw, dict(model.named_parameters())[name].detach())
        assert not torch.equal(raw, w0)
        assert torch.allclose(ckpt.ema_state[name], 0.75 * w0 + 0.25 * raw, atol=1e-6)
        assert torch.equal(ckpt.weights()[name], ckpt.ema_state[name])
        assert torch.equal(ckpt.weights(ema=False)[name], raw)


def test_validation_uses_the_ema_weights(tmp_path):
    from itdiffusion.training.train import validate

    model, x, x_val = make_model()
    cfg = TrainConfig(epochs=1, batch_size=50, lr=1e-2, ema=0.5, val_points=8)
    hist = train(model, x, cfg, x_val=x_val, out_dir=tmp_path, progress=False)
    assert hist.records[0].val_nll != validate(model, x_val, cfg)[0]  # not the raw weights' number
    model.load_state_dict(load_checkpoint(tmp_path / "checkpoint.safetensors").weights())
    assert hist.records[0].val_nll == validate(model, x_val, cfg)[0]  # the averaged weights' number


# ----------------------------------------------------------------------------- accumulation, bf16
def test_grad_accum_follows_the_run_with_the_whole_batch(tmp_path):
    big, x, _ = make_model()
    small, _, _ = make_model()
    # 250 examples: steps of 20 (the last of 10 rows: passes of 5 and 5)
    train(big, x, TrainConfig(epochs=3, batch_size=20, lr=3e-3), progress=False, log_dir=tmp_path / "big")
    train(small, x, TrainConfig(epochs=3, batch_size=10, grad_accum=2, lr=3e-3), progress=False,
          log_dir=tmp_path / "small")
    a, b = read_csv(tmp_path / "big" / "log.csv"), read_csv(tmp_path / "small" / "log.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(i) for i in range(1, 3 * 13 + 1)]
    for ra, rb in zip(a, b):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=1e-5, abs=1e-5), (ra, rb)
    for (name, pa), pb in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-5), name


def test_grad_accum_with_a_pass_left_empty():
    """A last batch of one row with grad_accum=3: two of its passes are empty and skipped."""
    one, x, _ = make_model()
    three, _, _ = make_model()
    x = x[:13]  # steps of 12 examples and of 1
    h1 = train(one, x, TrainConfig(epochs=2, batch_size=12, lr=3e-3), progress=False)
    h3 = train(three, x, TrainConfig(epochs=2, batch_size=4, grad_accum=3, lr=3e-3), progress=False)
    for r1, r3 in zip(h1.records, h3.records):
        assert r3.train_loss == pytest.approx(r1.train_loss, rel=1e-5)
    for pa, pb in zip(one.parameters(), three.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains_float32_weights_close_to_fp32():
    a, x, _ = make_model()
    b, _, _ = make_model()
    ha = train(a, x, TrainConfig(epochs=2, batch_size=50, lr=3e-3), progress=False)
    hb = train(b, x, TrainConfig(epochs=2, batch_size=50, lr=3e-3, dtype="bf16"), progress=False)
    assert all(p.dtype == torch.float32 for p in b.parameters())
    for ra, rb in zip(ha.records, hb.records):
        assert rb.train_loss == pytest.approx(ra.train_loss, rel=0.05, abs=0.05)
        assert rb.train_loss != ra.train_loss  # autocast did run the network in bfloat16


@pytest.mark.parametrize("field,value", [("ema", 1.5), ("ema", 0.0), ("ema", 1.0), ("grad_accum", 0),
                                         ("grad_accum", 1.5), ("dtype", "fp16")])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("change", [{"ema": 0.9}, {"ema": None}, {"grad_accum": 2}, {"dtype": "bf16"}])
def test_resume_refuses_changed_ema_accum_dtype(tmp_path, change):
    model, x, _ = make_model()
    cfg = TrainConfig(epochs=1, batch_size=100, ema=0.5, grad_accum=1)
    train(model, x, cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="cannot resume with different settings: " + next(iter(change))):
        train(model, x, TrainConfig(**{**cfg.__dict__, "epochs": 2, **change}), out_dir=tmp_path, resume=True,
              progress=False)


# ----------------------------------------------------------------------------- the run log
def test_log_csv_and_tensorboard_hold_the_logged_values(tmp_path):
    model, x, x_val = make_model()
    cfg = TrainConfig(epochs=2, batch_size=100, lr=1e-3, lr_schedule="cosine", val_points=8)
    hist = train(model, x, cfg, x_val=x_val, progress=False, log_dir=tmp_path)
    rows = read_csv(tmp_path / "log.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert [(int(r["step"]), int(r["epoch"])) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == 1e-3 and lrs == sorted(lrs, reverse=True)  # the cosine schedule, as used
    sizes = [100, 100, 50]
    for epoch, rec in enumerate(hist.records, 1):
        mine = [r for r in rows if int(r["epoch"]) == epoch]
        assert [r["val_nll"] for r in mine[:-1]] == ["", ""]
        assert float(mine[-1]["val_nll"]) == rec.val_nll and float(mine[-1]["val_se"]) == rec.val_se
        mean = sum(float(r["loss"]) * n for r, n in zip(mine, sizes)) / sum(sizes)
        assert mean == pytest.approx(rec.train_loss, rel=1e-9)  # each row is its step's batch mean
    if not tensorboard_available():
        pytest.skip("tensorboard is not installed: only the CSV is written")
    assert list(tmp_path.glob("events.out.tfevents.*"))
    loss = scalars(tmp_path, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 7))
    assert [v for _, v in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert [v for _, v in scalars(tmp_path, "train/lr")] == pytest.approx(lrs, rel=1e-6)
    assert scalars(tmp_path, "val/nll") == [(3, pytest.approx(hist.records[0].val_nll, rel=1e-6)),
                                            (6, pytest.approx(hist.records[1].val_nll, rel=1e-6))]
    assert [s for s, _ in scalars(tmp_path, "train/epoch_loss")] == [3, 6]


def test_resume_after_a_kill_mid_epoch_gives_identical_weights_and_one_row_per_step(tmp_path):
    """The checkpoint of epoch 2 with the log of a run killed in epoch 3 (and a half-written last line)."""
    cfg = TrainConfig(epochs=4, batch_size=25, grad_accum=2, ema=0.8, lr=3e-3, val_points=8, seed=5)
    full, x, x_val = make_model(dropout=0.1)
    train(full, x, cfg, x_val=x_val, out_dir=tmp_path / "full", progress=False, log_dir=tmp_path / "full-log")

    run, log = tmp_path / "run", tmp_path / "run-log"
    saved = tmp_path / "after-epoch-2"

    def keep_epoch_2(record, _model):
        if record.epoch == 2:
            shutil.copytree(run, saved)

    part, _, _ = make_model(dropout=0.1)
    train(part, x, TrainConfig(**{**cfg.__dict__, "epochs": 3}), x_val=x_val, out_dir=run, progress=False,
          log_dir=log, on_epoch=keep_epoch_2)
    shutil.rmtree(run)
    shutil.copytree(saved, run)  # as if killed during epoch 3, after its log rows were written
    with open(log / "log.csv", "a") as fh:
        fh.write("16,3,0.12")  # a line cut by the kill
    fresh, _, _ = make_model(seed=9, dropout=0.1)
    train(fresh, x, cfg, x_val=x_val, out_dir=run, resume=True, progress=False, log_dir=log)

    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors"), load_checkpoint(run / "checkpoint.safetensors")
    for state in ("model_state", "ema_state"):
        for key, value in getattr(a, state).items():
            assert torch.equal(value, getattr(b, state)[key]), (state, key)
    assert (log / "log.csv").read_text() == (tmp_path / "full-log" / "log.csv").read_text()
    steps = [int(r["step"]) for r in read_csv(log / "log.csv")]
    assert steps == list(range(1, 4 * 5 + 1))
    if tensorboard_available():  # the resumed run's event file purges the killed run's steps from 11 on
        assert [s for s, _ in scalars(log, "train/loss")] == steps
        assert scalars(log, "train/loss") == scalars(tmp_path / "full-log", "train/loss")


def test_run_log_refuses_a_foreign_csv_and_a_second_fresh_run(tmp_path):
    (tmp_path / "log.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a log of this program"):
        RunLog(tmp_path, first_epoch=2, first_step=5, tensorboard=False)
    with pytest.raises(ValueError, match="already holds log.csv"):
        RunLog(tmp_path, first_epoch=1, first_step=1, tensorboard=False)


# ----------------------------------------------------------------------------- the progress bar
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_the_epoch_and_its_eta_on_a_terminal_only(monkeypatch, capsys):
    model, x, _ = make_model()
    cfg = TrainConfig(epochs=1, batch_size=50)
    train(model, x, cfg, progress=True)
    assert capsys.readouterr().err == ""  # stderr is not a terminal: no bar
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    train(model, x, cfg, progress=True)
    text = term.getvalue()
    assert "epoch 1/1" in text and re.search(r"\d\d:\d\d<\d\d:\d\d", text), text  # elapsed<remaining
    term.truncate(0)
    train(model, x, cfg, progress=False)
    assert term.getvalue().strip("\x00") == ""


# ----------------------------------------------------------------------------- through the CLI
def test_finetune_cli_with_ema_accum_log_dir_and_eval_of_the_ema(tmp_path, capsys):
    spectrum = tmp_path / "s.npz"
    assert main(["spectrum", "--data", "digits", "--out", str(spectrum), "--dequantize"]) == 0
    run, logs = tmp_path / "run", tmp_path / "logs"
    assert main(["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--out",
                 str(run), "--epochs", "1", "--limit", "32", "--batch-size", "8", "--grad-accum", "2", "--ema", "0.9",
                 "--log-dir", str(logs), "--test-data", "digits", "--test-examples", "8", "--test-points", "4",
                 "--quiet", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "EMA weights" in printed
    rows = read_csv(logs / "log.csv")
    assert [r["step"] for r in rows] == ["1", "2"] and rows[-1]["val_nll"] != ""
    from itdiffusion.resolve import load_run

    loaded = load_run(run)
    ckpt = load_checkpoint(run / "checkpoint.safetensors")
    assert "EMA" in loaded.label
    for name, value in loaded.denoiser.state_dict().items():
        assert torch.equal(value, ckpt.weights()[f"denoiser.{name}"]), name
    ema_keys = [k for k in ckpt.ema_state if k.startswith("denoiser.")]
    assert ema_keys and any(not torch.equal(ckpt.ema_state[k], ckpt.model_state[k]) for k in ema_keys)
