"""Fine-tuning on a data set larger than a memory cap: examples generated on demand, never held whole."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

from itdiffusion.data.stream import ImageSource

CAP_MB = 192  # the training run may grow the process by at most this much (measured: about 100 MB, set by the batch)
N, SHAPE = 1_000_000, (1, 8, 8)  # 256 MB of float32: larger than the cap


def lazy_digits(n: int = N) -> ImageSource:
    """``n`` images on the 17-level digits grid, each a fixed function of its index (no storage)."""
    def read(indices: np.ndarray) -> torch.Tensor:
        i = torch.as_tensor(indices, dtype=torch.int64)[:, None]
        k = (i * 2654435761 + torch.arange(64) * 40503 + (i * 97) % 13 * torch.arange(64)) % 17
        return (k.float() / 8 - 1).reshape(-1, *SHAPE)
    return ImageSource(read, n, SHAPE, None, f"lazy digits ({n:,} images)")


SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_train_stream import lazy_digits, SHAPE
    import itdiffusion as itd
    from itdiffusion.training.train import TrainConfig, train

    data = lazy_digits()
    spectrum = itd.GaussianSpectrum.from_batches(data.chunks(50_000, 0, 100_000), diagonal=True)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.Unflatten(1, SHAPE))
    model = itd.ITDiffusion(lambda z, a: net(z), spectrum)
    model.net = net  # registered, so that its parameters train
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    history = train(model, data, TrainConfig(epochs=1, batch_size=16384, lr=1e-3), out_dir=sys.argv[2],
                    progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"grew_mb": after - before, "loss": history.records[-1].train_loss}))
""")


def test_finetune_on_data_larger_than_the_memory_cap(tmp_path):
    assert N * np.prod(SHAPE) * 4 / 2**20 > CAP_MB
    tests = str(__import__("pathlib").Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", SCRIPT, tests, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["grew_mb"] < CAP_MB, report
    assert np.isfinite(report["loss"]) and (tmp_path / "run" / "checkpoint.safetensors").is_file()


def test_a_source_with_nan_rows_is_refused_when_read():
    import pytest
    from itdiffusion.training.train import _read_batch

    bad = ImageSource(lambda i: torch.full((len(i), *SHAPE), float("nan")), 10, SHAPE, None, "nan source")
    with pytest.raises(ValueError, match="NaN"):
        _read_batch(bad, torch.arange(3))


def test_workers_read_ahead_without_changing_the_weights(tmp_path):
    """Batches decoded by DataLoader workers are the batches the main process would read: same weights."""
    import itdiffusion as itd
    from itdiffusion.training.train import TrainConfig, train

    data = lazy_digits(600)
    spectrum = itd.GaussianSpectrum.from_batches(data.chunks(600), diagonal=True)
    weights = []
    for workers in (0, 2):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.Unflatten(1, SHAPE))
        model = itd.ITDiffusion(lambda z, a, net=net: net(z), spectrum)
        model.net = net
        train(model, data, TrainConfig(epochs=2, batch_size=64, lr=1e-3), progress=False, workers=workers)
        weights.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
