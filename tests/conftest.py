import math

import pytest
import torch

import itdiffusion as itd


def make_mixture(d: int, k: int = 5, seed: int = 0) -> itd.GaussianMixture:
    """A fixed isotropic Gaussian mixture in d dimensions (components well inside unit scale)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=gen, dtype=torch.float64) * 6.0 / math.sqrt(d)
    stds = torch.rand(k, generator=gen, dtype=torch.float64) + 0.3
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    return itd.GaussianMixture(means, stds, weights)


def random_gaussian(d: int, seed: int = 0) -> itd.GaussianSpectrum:
    """A fixed full-covariance Gaussian N(mu, Sigma) in d dimensions (eigenvalues >= 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    eigs, vecs = torch.linalg.eigh(a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64))
    mean = torch.randn(d, generator=gen, dtype=torch.float64)
    return itd.GaussianSpectrum(mean, vecs, eigs.log(), (d,))


def gaussian_sample(spec: itd.GaussianSpectrum, n: int, gen: torch.Generator) -> torch.Tensor:
    """n samples (float64) of the Gaussian described by spec."""
    z = torch.randn(n, spec.d, generator=gen, dtype=torch.float64)
    return spec.mean + spec.from_eigenbasis(z * torch.exp(0.5 * spec.log_eigs))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def within(estimate: torch.Tensor, truth: torch.Tensor, n_se: float = 4.0, slack: float = 0.0):
    """Assert mean(estimate - truth) is within n_se standard errors (plus slack)."""
    err = (estimate - truth).double()
    se = err.std().item() / math.sqrt(len(err))
    assert abs(err.mean().item()) <= n_se * se + slack, f"bias {err.mean().item():.4f} vs se {se:.4f}"


def pytest_configure(config):
    # Small tensors on a busy 2-core machine run far faster on one thread.
    torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Report how many bad-input cases (tests/test_bad_input.py) ran and how many passed."""
    counts = {}
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if getattr(report, "when", "call") == "call" and "test_bad_input.py::test_" in nodeid:
                kind = "CLI" if "::test_cli[" in nodeid else "Python" if "::test_python[" in nodeid else None
                if kind:
                    counts.setdefault(kind, {"passed": 0, "failed": 0})[outcome] += 1
    if counts:
        total = sum(sum(c.values()) for c in counts.values())
        passed = sum(c["passed"] for c in counts.values())
        parts = ", ".join(f"{sum(c.values())} {kind}" for kind, c in sorted(counts.items()))
        terminalreporter.write_line(f"bad-input cases: {total} ({parts}); {passed} passed, {total - passed} failed")
