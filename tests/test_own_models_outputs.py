"""Issue 11 items 5-7 end to end: ``itd eval`` without ``--spectrum`` (computed, saved beside OUT,
reproducible), ``--per-image`` rows traced to their images, ``itd finetune`` of a diffusers folder
writing a diffusers folder; the map commands resolving ``--model`` as every other command."""

import csv
import math

import numpy as np
import pytest
import torch

from itdiffusion import GaussianSpectrum, Results
from itdiffusion.cli import main
from itdiffusion.data.images import load_data, sample_indices

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)
EVAL = ["--data", "digits", "--points", "8", "--limit", "4", "--no-tune", "--quiet", "--device", "cpu"]


def _unet(**kw):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return diffusers.UNet2DModel(**{**TINY, **kw}).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    diffusers.DDPMPipeline(unet=_unet(), scheduler=diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")).save_pretrained(root / "cos-v")
    diffusers.DDPMPipeline(unet=_unet(num_class_embeds=10), scheduler=diffusers.DDPMScheduler()).save_pretrained(
        root / "cond")
    assert main(["spectrum", "--data", "digits", "--out", str(root / "spectrum.npz")]) == 0
    return root


def test_eval_without_spectrum_saves_the_reference_it_computed(root, capsys):
    out = root / "nospec.json"
    assert main(["eval", "--model", str(root / "cos-v"), *EVAL, "--out", str(out)]) == 0
    saved = root / "nospec.spectrum.npz"
    assert saved.is_file() and "nospec.spectrum.npz" in capsys.readouterr().out
    x = load_data("digits", "test", limit=4, seed=0).x
    expected = GaussianSpectrum.from_data(x, diagonal=True)  # 4 images <= 64 dimensions: diagonal
    reference = GaussianSpectrum.load(saved)
    assert torch.allclose(reference.log_eigs, expected.log_eigs.to(reference.log_eigs), atol=1e-10)
    assert torch.allclose(reference.mean.flatten(), expected.mean.flatten().to(reference.mean), atol=1e-10)
    first = Results.load(out)
    assert first.config["spectrum"] == str(saved) and "4 images" in first.config["spectrum_computed_from"]
    again = root / "again.json"
    assert main(["eval", "--model", str(root / "cos-v"), *EVAL, "--spectrum", str(saved), "--out", str(again)]) == 0
    np.testing.assert_array_equal(Results.load(again).terms["discrete"].nll_nats, first.terms["discrete"].nll_nats)
    # the computed reference is an output: an existing one is not replaced without --overwrite
    out.unlink()
    out.with_suffix(".npz").unlink()
    assert main(["eval", "--model", str(root / "cos-v"), *EVAL, "--out", str(out)]) == 2
    assert "nospec.spectrum.npz exists" in capsys.readouterr().err


def test_spectrum_data_gives_the_reference(root, capsys):
    out = root / "specdata.json"
    assert main(["eval", "--model", str(root / "cos-v"), *EVAL, "--spectrum-data", "digits", "--out", str(out)]) == 0
    train = load_data("digits", "train").x
    expected = GaussianSpectrum.from_data(train, diagonal=len(train) <= 64)
    assert torch.allclose(GaussianSpectrum.load(root / "specdata.spectrum.npz").log_eigs,
                          expected.log_eigs.double(), atol=1e-8)
    assert main(["eval", "--model", str(root / "cos-v"), *EVAL, "--spectrum-data", "digits", "--spectrum",
                 str(root / "spectrum.npz"), "--out", str(root / "both.json")]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_per_image_rows_name_their_images(root):
    out, table = root / "rows.json", root / "rows.csv"
    assert main(["eval", "--model", str(root / "cos-v"), *EVAL, "--spectrum", str(root / "spectrum.npz"),
                 "--out", str(out), "--per-image", str(table)]) == 0
    results = Results.load(out)
    n_test = len(load_data("digits", "test").x)
    expected_ids = [str(i) for i in sample_indices(n_test, 4, 0)]  # indices into the built-in test split
    assert results.ids == expected_ids
    rows = list(csv.DictReader(open(table)))
    assert [r["id"] for r in rows] == expected_ids
    for name, est in results.estimates.items():
        assert np.mean([float(r[f"{name}_bpd"]) for r in rows]) == pytest.approx(est.bpd, abs=1e-5)
    x = load_data("digits", "test").x[[int(i) for i in expected_ids]]
    np.testing.assert_array_equal(load_data("digits", "test", limit=4).x, x)  # the ids point at the images


def test_per_image_ids_of_a_folder_are_relative_paths(root, tmp_path):
    from itdiffusion.data.labelled import write_labelled_folder

    x = load_data("digits", "test", limit=3).x
    write_labelled_folder(x, torch.tensor([0, 1, 1]), tmp_path / "imgs")
    spectrum = tmp_path / "s.npz"
    GaussianSpectrum.from_data(load_data(str(tmp_path / "imgs"), "test").x, diagonal=True).save(spectrum)
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(root / "cos-v"), "--data", str(tmp_path / "imgs"), "--spectrum", str(spectrum),
            "--points", "4", "--no-tune", "--quiet", "--device", "cpu", "--out", str(out), "--per-image",
            str(tmp_path / "r.csv")]
    assert main(args) == 0
    ids = [r["id"] for r in csv.DictReader(open(tmp_path / "r.csv"))]
    assert all((tmp_path / "imgs" / i).is_file() for i in ids) and len(ids) == 3 and "/" in ids[0]


def test_per_example_standard_error_closed_form():
    from itdiffusion.results import Term

    m, w = 4, np.full(4, 0.5)
    curve = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    offset = np.array([10.0, 20.0])
    nll = offset + 0.5 * (w * curve).sum(1)
    term = Term(offset, curve.mean(0), curve.mean(0) + 1, nll, nll, curve, curve + 1)
    r = Results(np.zeros(m), w, (1,), 2, {}, {}, {"continuous": term}, ids=["a", "b"])
    values, se = r.per_example()["continuous"]
    np.testing.assert_allclose(values, nll)
    spread = m * w * curve  # 1/2 std(m w f) / sqrt(m)
    np.testing.assert_allclose(se, 0.5 * spread.std(1, ddof=1) / math.sqrt(m))
    assert se[1] == 0.0


def test_finetune_of_a_diffusers_folder_writes_one_that_diffusers_loads(root):
    run = root / "run"
    assert main(["finetune", "--model", str(root / "cos-v"), "--data", "digits", "--spectrum",
                 str(root / "spectrum.npz"), "--out", str(run), "--epochs", "1", "--limit", "8", "--batch-size", "4",
                 "--quiet", "--device", "cpu"]) == 0
    folder = run / "diffusers"
    unet = diffusers.UNet2DModel.from_pretrained(str(folder))
    tuned = {k: v for k, v in unet.state_dict().items()}
    assert any(not torch.equal(v, _unet().state_dict()[k]) for k, v in tuned.items())  # it was trained
    assert diffusers.DDPMScheduler.from_pretrained(str(folder)).config.prediction_type == "v_prediction"
    nll = {}
    for name, model in (("run", run), ("folder", folder)):
        out = root / f"ft-{name}.json"
        assert main(["eval", "--model", str(model), *EVAL, "--spectrum", str(root / "spectrum.npz"),
                     "--out", str(out)]) == 0
        nll[name] = Results.load(out).terms["discrete"].nll_nats
    np.testing.assert_array_equal(nll["run"], nll["folder"])


def test_map_commands_resolve_the_model_as_every_command(root, tmp_path, capsys):
    from itdiffusion.cli import _conditional
    from itdiffusion.data.labelled import write_labelled_folder

    source = open(_conditional.__file__).read()
    assert "from_pretrained" not in source and "DiffusersDenoiser" not in source
    x = load_data("digits", "test", limit=4).x
    write_labelled_folder(x, torch.tensor([0, 1, 0, 1]), tmp_path / "lab")
    common = ["--model", str(root / "cond"), "--data", str(tmp_path / "lab"), "--spectrum",
              str(root / "spectrum.npz"), "--points", "4", "--device", "cpu"]
    assert main(["classify", *common, "--out", str(tmp_path / "c0.json")]) == 0
    assert main(["mi", *common, "--out", str(tmp_path / "mi.png")]) == 2  # no unconditional mode
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--null-label" in err[0]
    assert main(["mi", *common, "--out", str(tmp_path / "mi.png"), "--null-label", "9"]) == 0
    assert main(["classify", *common, "--out", str(tmp_path / "c.json"), "--class-label", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--class-label" in err[0] and "--y" in err[0]


def test_compare_takes_evals_arguments_and_saves_its_reference(root, capsys):
    out = root / "cmp.json"
    assert main(["compare", "--model", str(root / "cos-v"), "--data", "digits", "--limit", "4", "--methods", "it",
                 "--points", "8", "--out", str(out)]) == 0  # eval's --points, data formats and default device
    x = load_data("digits", "test").x[:4]
    reference = GaussianSpectrum.load(root / "cmp.spectrum.npz")
    assert torch.allclose(reference.log_eigs, GaussianSpectrum.from_data(x, diagonal=True).log_eigs.double(),
                          atol=1e-10)
    assert "-log P(x) on the data grid" in capsys.readouterr().out  # digits' grid was read with the images


def test_a_folder_without_safetensors_weights_is_named_in_one_line(root, tmp_path, capsys):
    import shutil

    folder = tmp_path / "noweights"
    shutil.copytree(root / "cos-v", folder)
    for path in (folder / "unet").glob("*.safetensors"):
        path.rename(path.with_suffix(".bin"))
    assert main(["eval", "--model", str(folder), *EVAL, "--spectrum", str(root / "spectrum.npz"),
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no diffusion_pytorch_model.safetensors" in err[0] and "only safetensors" in err[0]


@pytest.mark.parametrize("folders, extra, message", [
    ({"10": 2, "11": 2}, [], "class label 10 is outside this UNet's 10 classes"),
    ({"0": 2, "1": 2}, ["--null-label", "10"], "class label 10 is outside this UNet's 10 classes"),
    ({"0": 2, "1": 2}, ["--null-label", "-1"], "--null-label must be a label"),
    ({"0": 2, "1": 2}, ["--device", "cuda:7"], "--device"),
])
def test_map_commands_refuse_labels_the_network_lacks(root, tmp_path, capsys, folders, extra, message):
    from itdiffusion.data.labelled import write_labelled_folder

    x = load_data("digits", "test", limit=4).x
    classes = sorted(folders)
    write_labelled_folder(x, torch.tensor([0, 0, 1, 1]), tmp_path / "lab", classes=classes)
    args = ["--model", str(root / "cond"), "--data", str(tmp_path / "lab"), "--spectrum", str(root / "spectrum.npz"),
            "--points", "4", *extra]
    if "--device" not in extra:
        args += ["--device", "cpu"]
    command = "mi" if "--null-label" in extra else "classify"
    out = str(tmp_path / ("o.png" if command == "mi" else "o.json"))
    assert main([command, *args, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
