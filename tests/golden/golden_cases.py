"""The golden cases: each returns a dict of arrays computed through the public API at fixed seeds."""

import math

import torch

import itdiffusion as itd


def _mixture(d: int, k: int = 4, seed: int = 0) -> itd.GaussianMixture:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=gen, dtype=torch.float64) * 4.0 / math.sqrt(d)
    stds = torch.rand(k, generator=gen, dtype=torch.float64) * 0.5 + 0.3
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    return itd.GaussianMixture(means, stds, weights)


def _spectrum_of(x: torch.Tensor) -> itd.GaussianSpectrum:
    return itd.GaussianSpectrum.from_data(x)


def nll_continuous():
    mix = _mixture(6)
    x = mix.sample(24, torch.Generator().manual_seed(1))
    model = itd.ITDiffusion(mix, _spectrum_of(mix.sample(400, torch.Generator().manual_seed(2))))
    out = {}
    for label, placement in (("stratified", "stratified"), ("iid", "iid"), ("grid", "midpoint")):
        for anti in (True, False):
            out[f"{label}_{anti}"] = model.nll(x, 37, seed=5, placement=placement, antithetic=anti)
    out["clip4"] = model.nll(x, 20, seed=6, clip=4.0)
    out["batch"] = model.nll(x, 20, seed=6, batch_size=7)
    return out


def nll_discrete():
    grid = itd.DiscreteGrid(-1.0, 1.0, 5)
    means = torch.tensor([[-0.5, 0.2, 0.4], [0.6, -0.3, 0.0]], dtype=torch.float64)
    law = itd.FiniteDiscrete.discretized_mixture(grid, means, torch.tensor([0.4, 0.6]), torch.tensor([0.3, 0.7]))
    x = law.sample(20, torch.Generator().manual_seed(3))
    model = itd.ITDiffusion(law, _spectrum_of(law.sample(300, torch.Generator().manual_seed(4))))
    out = {}
    for rounding in ("hard", "soft", "none"):
        out[rounding] = model.nll(x, 33, seed=7, discrete=grid, rounding=rounding)
    out["clamp"] = model.nll(x, 33, seed=7, discrete=grid, rounding="none", clamp=(-1.0, 1.0))
    out["anti"] = model.nll(x, 33, seed=7, discrete=grid, antithetic=True)
    return out


def _image_model():
    from itdiffusion.denoisers.nets import SmallUNet

    net = SmallUNet(1, base=8, channel_mult=(1, 2), num_res_blocks=1).double()
    init = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every weight random (the output layer starts at zero otherwise)
        for param in net.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=init, dtype=torch.float64))
    grid = itd.DiscreteGrid(-1.0, 1.0, 8)
    gen = torch.Generator().manual_seed(9)
    x = grid.value(torch.randint(0, 8, (10, 1, 4, 4), generator=gen).double())
    spec = itd.GaussianSpectrum.from_data(grid.value(torch.randint(0, 8, (64, 1, 4, 4), generator=gen).double()))
    return itd.ITDiffusion(net, spec), x, grid


def evaluate_images():
    model, x, grid = _image_model()
    res = itd.evaluate(model, [x[:4], x[4:]], n_points=12, discrete=grid, soft=True, dequantize=True,
                       per_sample_curves=True, seed=3)
    out = {f"est/{k.replace('_gauss_min', '_clamped')}": [e.nats, e.se_nats] for k, e in res.estimates.items()}
    out["logsnr"], out["weights"] = res.logsnr, res.weights
    out.update({f"curve/{k}": v for k, v in res.curves.items()})
    for name, term in res.terms.items():
        out[f"term/{name}/nll"] = term.nll_nats
        out[f"term/{name}/integrand"] = term.integrand
    return out


def evaluate_continuous():
    mix = _mixture(5, seed=3)
    x = mix.sample(30, torch.Generator().manual_seed(5))
    model = itd.ITDiffusion(mix, _spectrum_of(x))
    res = itd.evaluate(model, [x], n_points=16, placement="stratified", seed=11)
    return {f"est/{k.replace('_gauss_min', '_clamped')}": [e.nats, e.se_nats]
            for k, e in res.estimates.items()} | {"logsnr": res.logsnr}


def compare_methods():
    mix = _mixture(4, seed=4)
    x = mix.sample(12, torch.Generator().manual_seed(6))
    model = itd.ITDiffusion(mix, _spectrum_of(mix.sample(200, torch.Generator().manual_seed(7))))
    options = {"vlb": {"steps": 50}, "vlb-ct": {"n_points": 24}, "ode": {"solver": "heun", "n_steps": 6}}
    table = itd.compare(model, x, methods=("it", "vlb", "vlb-ct", "ode"), seed=13, options=options)
    out = {m: table[m].nll_nats for m in table}
    opt = {"ode": {"solver": "rk4", "n_steps": 4, "trace": "hutchinson", "n_probes": 2}}
    out["ode_hutchinson"] = itd.compare(model, x, methods=("ode",), seed=14, options=opt)["ode"].nll_nats
    grid = itd.DiscreteGrid(-3.0, 3.0, 61)
    xd = grid.round(x.clamp(-3, 3))
    table = itd.compare(model, xd, methods=("it", "vlb", "ode"), seed=15, discrete=grid,
                        options={"vlb": {"steps": 40}, "ode": {"solver": "euler", "n_steps": 5}})
    out.update({f"discrete_{m}": table[m].nll_nats for m in table})
    return out


def training_loss():
    model, x, _ = _image_model()
    out = {}
    for proposal in ("uniform", "logistic"):
        model.train_proposal = proposal
        out[proposal] = model.loss(x, torch.Generator().manual_seed(21)).detach().reshape(1)
    return out


CASES = {
    "nll_continuous": nll_continuous,
    "nll_discrete": nll_discrete,
    "evaluate_images": evaluate_images,
    "evaluate_continuous": evaluate_continuous,
    "compare_methods": compare_methods,
    "training_loss": training_loss,
}


def training_run():
    from itdiffusion.training.train import TrainConfig, train

    model, x, grid = _image_model()
    x_train = torch.cat([x, -x, x.flip(-1)])
    config = TrainConfig(epochs=2, lr=1e-3, batch_size=8, seed=4, val_points=8, lr_schedule="cosine")
    history = train(model, x_train, config, x_val=x[:4], discrete=grid, progress=False)
    weights = torch.cat([p.detach().flatten() for p in model.denoiser.parameters()])
    rows = history.to_json()
    return {"weights": weights, "train_loss": [r["train_loss"] for r in rows], "val": [r["val_nll"] for r in rows]}


CASES["training_run"] = training_run
