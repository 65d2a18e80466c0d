"""Users' own diffusers models through the CLI: folders made here (tiny random UNets), each read
under its own scheduler config; Hub ids offline; diffusers missing.

Same weights under a linear epsilon schedule and a cosine v-prediction schedule must give
different numbers, each equal to what ``DiffusersDenoiser.from_pretrained`` gives in Python at
the same seed.
"""

import json
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

diffusers = pytest.importorskip("diffusers")

SRC = Path(__file__).resolve().parent.parent / "src"
TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=8)
EVAL = ["--data", "digits", "--points", "8", "--limit", "4", "--no-tune", "--quiet", "--device", "cpu"]


def tiny_unet(seed=0, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return diffusers.UNet2DModel(**{**TINY, **kw}).eval()


def pipeline_folder(path, scheduler, unet=None):
    diffusers.DDPMPipeline(unet=unet or tiny_unet(), scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    spectrum = root / "spectrum.npz"
    assert main(["spectrum", "--data", "digits", "--out", str(spectrum)]) == 0
    f = {"root": root, "spectrum": spectrum}
    f["linear-eps"] = pipeline_folder(root / "linear-eps", diffusers.DDPMScheduler())
    f["cosine-v"] = pipeline_folder(root / "cosine-v", diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"))
    f["model"] = root / "model"  # a model folder with its scheduler config beside it
    tiny_unet().save_pretrained(f["model"])
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        f["model"])
    f["bare"] = root / "bare"
    tiny_unet().save_pretrained(f["bare"])
    f["cond"] = pipeline_folder(root / "cond", diffusers.DDPMScheduler(), tiny_unet(num_class_embeds=10))
    f["edm"] = pipeline_folder(root / "edm", diffusers.EDMEulerScheduler())
    f["flow"] = pipeline_folder(root / "flow", diffusers.FlowMatchEulerDiscreteScheduler(shift=2.0))
    f["unsupported"] = pipeline_folder(root / "unsupported", diffusers.DDPMScheduler())
    config = f["unsupported"] / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "CMStochasticIterativeScheduler"}))
    return f


def run_eval(folders, model, name, *extra):
    out = folders["root"] / f"{name}.json"
    code = main(["eval", "--model", str(model), "--spectrum", str(folders["spectrum"]), "--out", str(out),
                 "--overwrite", *EVAL, *extra])
    return code, out


def python_eval(folders, model):
    """The same evaluation in Python: from_pretrained, evaluate, the data eval draws."""
    import itdiffusion as itd
    from itdiffusion.data.images import load_data
    from itdiffusion.denoisers import DiffusersDenoiser
    from itdiffusion.evaluation import evaluate

    data = load_data("digits", "test", limit=4, seed=0)
    net = itd.ITDiffusion(DiffusersDenoiser.from_pretrained(model), itd.GaussianSpectrum.load(folders["spectrum"]))
    with torch.no_grad():
        return evaluate(net, [data.x], 8, discrete=data.grid, seed=0, tune=False)


def discrete_nll(path) -> np.ndarray:
    return Results.load(path).terms["discrete"].nll_nats


def test_each_folder_is_read_under_its_own_schedule(folders):
    code, linear = run_eval(folders, folders["linear-eps"], "linear")
    assert code == 0
    code, cosine = run_eval(folders, folders["cosine-v"], "cosine")
    assert code == 0
    a, b = discrete_nll(linear), discrete_nll(cosine)
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()  # same weights, other schedule: other numbers
    for path, folder in ((linear, folders["linear-eps"]), (cosine, folders["cosine-v"])):
        expected = python_eval(folders, folder).terms["discrete"].nll_nats
        np.testing.assert_allclose(discrete_nll(path), expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["model", "cond", "edm", "flow"])
def test_model_cond_edm_and_flow_folders_evaluate(folders, name):
    extra = ["--class-label", "3"] if name == "cond" else []
    code, out = run_eval(folders, folders[name], name, *extra)
    assert code == 0
    assert np.isfinite(discrete_nll(out)).all()
    if name in ("edm", "flow"):
        expected = python_eval(folders, folders[name]).terms["discrete"].nll_nats
        np.testing.assert_allclose(discrete_nll(out), expected, rtol=1e-6)


@pytest.mark.parametrize("name, extra, message", [
    ("bare", [], "no scheduler_config.json"),
    ("unsupported", [], "'CMStochasticIterativeScheduler' is not supported; supported:"),
    ("cond", [], "class-conditional (num_class_embeds=10): give --class-label"),
    ("cond", ["--class-label", "10"], "outside the network's 10 classes"),
    ("linear-eps", ["--class-label", "1"], "not class-conditional"),
])
def test_folders_refused_with_one_line(folders, name, extra, message, capsys):
    code, _ = run_eval(folders, folders[name], f"refused-{name}", *extra)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_compare_takes_diffusers_folders(folders, capsys):
    from itdiffusion.data.images import load_data

    data = folders["root"] / "digits.npy"
    np.save(data, load_data("digits", "test", limit=4, seed=0).x.numpy())
    values = []
    for name in ("linear-eps", "cosine-v", "flow"):
        capsys.readouterr()
        assert main(["compare", "--model", str(folders[name]), "--data", str(data), "--methods", "it",
                     "--n-points", "8", "--format", "json"]) == 0
        values.append(json.loads(capsys.readouterr().out)["methods"]["it"]["nll_nats"])
    assert len(set(values)) == 3


def test_finetune_a_diffusers_folder_then_eval_its_run(folders):
    run = folders["root"] / "run"
    assert main(["finetune", "--model", str(folders["cosine-v"]), "--data", "digits", "--spectrum",
                 str(folders["spectrum"]), "--out", str(run), "--epochs", "1", "--limit", "32", "--batch-size", "16",
                 "--quiet", "--device", "cpu"]) == 0
    code, out = run_eval(folders, run, "run")
    assert code == 0 and np.isfinite(discrete_nll(out)).all()
    from itdiffusion.resolve import load_run

    loaded = load_run(run)
    assert loaded.description["kind"] == "diffusers"
    assert loaded.denoiser.prediction_type == "v_prediction"


def test_registry_name_with_a_folder_of_another_schedule_is_refused(tmp_path):
    from itdiffusion.denoisers import model_spec
    from itdiffusion.denoisers.registry import _check_schedule

    spec = model_spec("ddpm-cifar10")
    (tmp_path / "config.json").write_text("{}")
    _check_schedule(spec, tmp_path, str(tmp_path))  # no scheduler config: the named registry model's schedule
    diffusers.DDPMScheduler().save_pretrained(tmp_path)
    _check_schedule(spec, tmp_path, str(tmp_path))  # the same schedule
    diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="squaredcos_cap_v2 betas.*v_prediction.*ddpm-cifar10 uses .*linear betas"):
        _check_schedule(spec, tmp_path, str(tmp_path))


# ----------------------------------------------------------------------------- Hub ids
def _cli(args, env_extra, timeout=60):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **env_extra}
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "itdiffusion.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    return proc, time.perf_counter() - began


def _fake_cache(hf_home: Path, repo_id: str, folder: Path) -> None:
    """The Hugging Face cache layout (hub/models--owner--name/{refs/main, snapshots/REV/...}) holding ``folder``."""
    import shutil

    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "is unreachable, no network?"),
])
def test_hub_id_without_cache_or_network_fails_fast_in_one_line(folders, tmp_path, env, message):
    args = ["eval", "--model", "someone/tiny-ddpm", "--spectrum", str(folders["spectrum"]), "--out",
            str(tmp_path / "r.json"), *EVAL]
    proc, seconds = _cli(args, {"HF_HOME": str(tmp_path / "hf"), **env})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and "someone/tiny-ddpm" in proc.stderr and "hf download" in proc.stderr
    assert seconds < 20


@pytest.mark.slow  # about 15 s: a fresh process imports torch and diffusers
def test_cached_hub_id_loads_without_network(folders, tmp_path):
    _fake_cache(tmp_path / "hf", "someone/tiny-ddpm", folders["cosine-v"])
    out = tmp_path / "r.json"
    args = ["eval", "--model", "someone/tiny-ddpm", "--spectrum", str(folders["spectrum"]), "--out", str(out), *EVAL]
    proc, _ = _cli(args, {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr
    expected = python_eval(folders, folders["cosine-v"]).terms["discrete"].nll_nats
    np.testing.assert_allclose(discrete_nll(out), expected, rtol=1e-6)


# ----------------------------------------------------------------------------- no diffusers
@pytest.mark.parametrize("model", ["ddpm-cifar10", "folder"])
def test_without_diffusers_one_line_names_the_extra(folders, tmp_path, monkeypatch, capsys, model):
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ModuleNotFoundError
    spec = ["--model", "ddpm-cifar10", "--weights", str(tmp_path / "w.safetensors")] if model == "ddpm-cifar10" else [
        "--model", str(folders["linear-eps"])]
    data = ["--data", str(tmp_path / "x.npy")]
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 32, 32) if model == "ddpm-cifar10" else (2, 1, 8, 8), np.float32))
    code = main(["compare", *spec, *data, "--methods", "it", "--n-points", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert 'pip install "itdiffusion[diffusers]"' in err


# ----------------------------------------------------------------------------- README
def test_readme_own_model_section_runs_as_written(folders, tmp_path, monkeypatch):
    """The section's commands (with a small budget added) and its Python, on a tiny folder named my-ddpm."""
    import re
    import shlex
    import shutil

    from itdiffusion.data.images import load_data

    text = (SRC.parent / "README.md").read_text()
    section = text[text.index("## Evaluate your own model"):]
    section = section[: section.index("\n## ")]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folders["linear-eps"], tmp_path / "my-ddpm")
    commands = [line.strip() for line in section.splitlines() if line.startswith("    itd ")]
    local = [c for c in commands if "digits" in c]
    assert len(local) == 2
    for command in local:
        extra = ["--points", "8", "--limit", "4", "--no-tune", "--quiet", "--device", "cpu"] if " eval " in command \
            else []
        assert main(shlex.split(command)[1:] + extra) == 0, command
    code = re.search(r"\n\n((?:    import itdiffusion.*\n)(?:    .*\n|\n)+?)\n(?! )", section).group(1)
    code = "\n".join(line[4:] for line in code.splitlines())
    train, test = load_data("digits", "train").x[:200], load_data("digits", "test", limit=2).x
    namespace = {"my_edm_denoiser": lambda x, sigma: x / (1 + sigma.view(-1, 1, 1, 1) ** 2),
                 "my_velocity": lambda x_t, t: -x_t, "x_train": train, "x_test": test}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["nll_nats"].shape == (2,) and torch.isfinite(namespace["nll_nats"]).all()
