"""Cases an independent red-team pass found (stop 21): each once wrote over a file, crashed or read the wrong data."""

import json
import os

import numpy as np
import pytest

from itdiffusion.cli import main
from itdiffusion.data.images import load_data
from itdiffusion.data.stream import open_images

CPU = ["--quiet", "--device", "cpu"]


def _fails(argv, capsys, text):
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def spectrum(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "s.npz"
    assert main(["spectrum", "--data", "digits", "--out", str(path)]) == 0
    return path


def test_spectrum_never_replaces_a_file_silently(spectrum, tmp_path, capsys):
    out = tmp_path / "s.npz"
    out.write_bytes(spectrum.read_bytes())
    _fails(["spectrum", "--data", "digits", "--out", str(out), "--dequantize"], capsys, "pass --overwrite")
    assert out.read_bytes() == spectrum.read_bytes()
    _fails(["spectrum", "--data", "digits", "--out", str(tmp_path / "checkpoint.safetensors")], capsys, ".npz file")
    images = tmp_path / "imgs"
    images.mkdir()
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(images / f"{i}.png")
    (images / "old.npz").write_bytes(b"kept")
    _fails(["spectrum", "--data", str(images), "--out", str(images / "old.npz"), "--diagonal", "--overwrite"], capsys,
           "would replace a file of the input")
    assert (images / "old.npz").read_bytes() == b"kept"


def test_compare_never_replaces_a_file_silently(tmp_path, capsys):
    out = tmp_path / "r.json"
    (tmp_path / "r.md").write_text("my notes")
    _fails(["compare", "--model", "gmm-exact", "--data", "sample:4", "--methods", "it", "--out", str(out)], capsys,
           "pass --overwrite")
    assert (tmp_path / "r.md").read_text() == "my notes" and not out.exists()
    _fails(["compare", "--model", "gmm-exact", "--data", "sample:99999999999", "--methods", "it"], capsys,
           "--data sample:N: at most")


def test_special_files_are_not_outputs(tmp_path, capsys):
    fifo = tmp_path / "s.npz"
    os.mkfifo(fifo)
    _fails(["spectrum", "--data", "digits", "--out", str(fifo), "--overwrite"], capsys, "not a regular file")
    assert not fifo.is_file()


@pytest.mark.parametrize("command", ["spectrum", "eval", "finetune"])
def test_special_files_are_not_data(spectrum, tmp_path, capsys, command):
    fifo = tmp_path / "d.npy"
    os.mkfifo(fifo)
    args = {"spectrum": ["--out", str(tmp_path / "s.npz")],
            "eval": ["--model", "small-unet", "--spectrum", str(spectrum), "--out", str(tmp_path / "r.json")],
            "finetune": ["--model", "small-unet", "--spectrum", str(spectrum), "--out", str(tmp_path / "run")]}
    _fails([command, "--data", str(fifo), *args[command]], capsys, "d.npy: not a regular file or a folder")


def test_eval_keeps_an_existing_npz_and_the_model_run_files(spectrum, tmp_path, capsys):
    (tmp_path / "stale.npz").write_bytes(b"someone's arrays")
    args = ["eval", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--points", "4",
            "--limit", "4", *CPU]
    _fails(args + ["--out", str(tmp_path / "stale.json")], capsys, "stale.npz exists; pass --overwrite")
    assert (tmp_path / "stale.npz").read_bytes() == b"someone's arrays"
    run = tmp_path / "run"
    assert main(["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--out",
                 str(run), "--epochs", "1", "--limit", "32", "--batch-size", "32", *CPU]) == 0
    before = (run / "run.json").read_bytes()
    _fails(["eval", "--model", str(run), *args[3:], "--out", str(run / "run.json"), "--overwrite"], capsys,
           "would replace a file of the input")
    assert (run / "run.json").read_bytes() == before

    # resume with a key of run.json missing: refused, not trusted
    info = json.loads(before)
    del info["data_id"]
    (run / "run.json").write_text(json.dumps(info))
    ckpt = (run / "checkpoint.safetensors").read_bytes()
    _fails(["finetune", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--out", str(run),
            "--epochs", "2", "--limit", "32", "--batch-size", "32", "--resume", *CPU], capsys, "lacks data_id")
    assert (run / "checkpoint.safetensors").read_bytes() == ckpt


def test_a_zip_named_npy_and_an_empty_data_argument(tmp_path, capsys):
    np.savez(tmp_path / "z.npz", x=np.zeros((3, 1, 2, 2), np.uint8))
    os.replace(tmp_path / "z.npz", tmp_path / "z.npy")
    for read in (load_data, open_images):
        with pytest.raises(ValueError, match="z.npy"):
            read(str(tmp_path / "z.npy"))
    _fails(["spectrum", "--data", str(tmp_path / "z.npy"), "--out", str(tmp_path / "s.npz")], capsys, "z.npy")
    _fails(["spectrum", "--data", "", "--out", str(tmp_path / "s.npz")], capsys, "--data is empty")


def test_report_names_with_latex_markdown_and_mathtext_specials(tmp_path):
    """Names are user text: they must come out literally in every file, never break one."""
    import torch

    import itdiffusion as itd
    from itdiffusion.reporting.report import write_report

    from conftest import make_mixture

    mix = make_mixture(4)
    gen = torch.Generator().manual_seed(0)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(400, gen)))
    x = mix.sample(6, gen)
    res = itd.evaluate(model, [x], n_points=8)
    names = ["a$b|c&%#_{}~^\\z", r"x$\frac{$"]
    written = write_report([res, res], tmp_path / "rep", names=names)
    assert {p.name for p in written} >= {"table.md", "table.tex", "error_curves.png"}
    md = (tmp_path / "rep" / "table.md").read_text()
    assert r"| a$b\|c&%#_{}~^\z |" in md
    tex = (tmp_path / "rep" / "table.tex").read_text()
    assert r"a\$b\textbar{}c\&\%\#\_\{\}\textasciitilde{}\textasciicircum{}\textbackslash{}z" in tex
    assert r"x\$\textbackslash{}frac\{\$" in tex


def test_interrupted_eval_says_so_once(spectrum, tmp_path, capsys, monkeypatch):
    """Ctrl-C or SIGTERM during eval: exit 130 and one line naming where the progress is."""
    from itdiffusion.evaluation import Evaluator

    def stop(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Evaluator, "run", stop)
    out = tmp_path / "r.json"
    capsys.readouterr()
    code = main(["eval", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--points", "4",
                 "--limit", "4", "--no-tune", "--out", str(out), *CPU])
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if " images x 4 calls" not in line]  # the status line printed before the run
    assert code == 130 and len(err) == 1 and "progress saved in" in err[0] and "r.partial" in err[0], err
    assert not out.exists()


# --- the second independent red-team pass (stop 22)

def test_report_never_replaces_a_report_silently(spectrum, tmp_path, capsys):
    res = tmp_path / "r.json"
    assert main(["eval", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--points", "4",
                 "--limit", "4", "--no-tune", "--out", str(res), *CPU]) == 0
    mine = tmp_path / "table.md"
    mine.write_text("my own notes")
    _fails(["report", str(res), "--out", str(tmp_path)], capsys, "pass --overwrite")
    assert mine.read_text() == "my own notes"
    assert main(["report", str(res), "--out", str(tmp_path / "rep")]) == 0
    _fails(["report", str(res), "--names", "other", "--out", str(tmp_path / "rep")], capsys, "already holds table.md")


def test_demo_never_writes_into_a_folder_holding_files(tmp_path, capsys, monkeypatch):
    from itdiffusion.cli.demo import claim_out

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"someone's weights")
    _fails(["demo", "--quick", "--quiet", "--dataset", "moons", "--out", str(run)], capsys, "pass --overwrite")
    assert (run / "checkpoint.safetensors").read_bytes() == b"someone's weights"
    default = tmp_path / "runs" / "demo-moons"
    assert claim_out(None, default, False) == default
    default.mkdir(parents=True)
    (default / "metrics.json").write_text("{}")
    assert claim_out(None, default, False) == default.with_name("demo-moons-2")  # the first free name


def test_eval_holds_the_lock_of_its_npz(tmp_path):
    from itdiffusion.guard import OutputLock, OutputLocks

    out = tmp_path / "R.json"
    with OutputLocks([out, out.with_suffix(".npz")]):
        with pytest.raises(ValueError, match="another itd run is writing it"):
            OutputLock(tmp_path / "R.npz").acquire()  # e.g. itd spectrum --out R.npz --overwrite
    OutputLock(tmp_path / "R.npz").acquire().release()  # released with the run


def test_results_save_refuses_an_npz_name(tmp_path):
    import torch

    import itdiffusion as itd
    from conftest import make_mixture

    mix = make_mixture(2)
    gen = torch.Generator().manual_seed(0)
    res = itd.evaluate(itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(200, gen))),
                       [mix.sample(4, gen)], n_points=4)
    with pytest.raises(ValueError, match="give the results' .json name"):
        res.save(tmp_path / "x.npz")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("seed", [-5, 2**63, 1.5, True])
def test_nll_refuses_seeds_the_cli_refuses(seed):
    import torch

    import itdiffusion as itd
    from conftest import make_mixture

    mix = make_mixture(2)
    model = itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(200, torch.Generator().manual_seed(0))))
    with pytest.raises(ValueError, match="seed must be an integer"):
        model.nll(mix.sample(3, torch.Generator().manual_seed(1)), 8, seed=seed)
    with pytest.raises(ValueError, match="meta device"):
        model.nll(torch.empty(3, 2, dtype=torch.float64, device="meta"), 8, seed=0)


def test_results_json_edited_apart_from_its_npz_is_refused(tmp_path):
    import json as _json

    import torch

    import itdiffusion as itd
    from conftest import make_mixture

    mix = make_mixture(2)
    gen = torch.Generator().manual_seed(0)
    res = itd.evaluate(itd.ITDiffusion(mix, itd.GaussianSpectrum.from_data(mix.sample(200, gen))),
                       [mix.sample(4, gen)], n_points=4)
    res.save(tmp_path / "r.json")
    itd.Results.load(tmp_path / "r.json")  # the pair as written
    meta = _json.loads((tmp_path / "r.json").read_text())
    meta["n_examples"] = 999
    (tmp_path / "r.json").write_text(_json.dumps(meta))
    with pytest.raises(ValueError, match="disagree"):
        itd.Results.load(tmp_path / "r.json")


def test_a_non_utf8_output_name_is_legal(spectrum, tmp_path):
    import os as _os

    folder = _os.fsdecode(_os.fsencode(str(tmp_path)) + b"/\xff\xfe")
    out = _os.path.join(folder, "s.npz")
    assert main(["spectrum", "--data", "digits", "--out", out, "--diagonal"]) == 0
    assert _os.path.isfile(out)
