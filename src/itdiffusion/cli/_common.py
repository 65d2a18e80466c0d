"""Arguments and set-up shared by the pipeline commands."""

from __future__ import annotations

import argparse
from pathlib import Path

DATA_HELP = ("a folder of PNG/JPEG images (searched recursively; with train/ and test/ sub-folders, the split's), "
             "a .npy array, a CIFAR-10 archive or folder, or a built-in set (digits)")
MODEL_HELP = ("a registry name (ddpm-cifar10, iddpm-cifar10-vlb), small-unet (fresh, sized to the data), "
              "a weights file of a registry network, a run directory or checkpoint written by itd finetune, "
              "a diffusers model or pipeline folder (UNet2DModel; its own scheduler_config.json sets the schedule "
              "and prediction type: DDPM-family, EDM, VE or flow-matching schedulers), or a Hub repo id owner/name "
              "(from the cache, else downloaded)")


MAX_COUNT = 10**9  # images, examples: more than any data set this runs on
MAX_CALLS = 10**7  # network calls per example (the paper uses 1,000)
MAX_BATCH = 2**24  # (example, point) pairs or images per step
MAX_EPOCHS = 10**6
MAX_SEED = 2**63 - 1


def positive_int(text: str, most: int = MAX_COUNT) -> int:
    """A positive integer of at most ``most`` (so that no flag can ask for a terabyte or a century)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value > most:
        raise argparse.ArgumentTypeError(f"at most {most:,}, got {value:,}")
    return value


def int_up_to(most: int):
    """``positive_int`` with its own bound, for ``type=`` of an argument."""
    def parse(text: str) -> int:
        return positive_int(text, most)
    parse.__name__ = "positive integer"
    return parse


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must lie in 0 .. 2^63 - 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (an EMA decay)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return value


CLIP_RANGE = (1.0, 700.0)  # logistic scales: below 1 the integral is mostly the Gaussian's; 700 is MAX_CLIP


def clip_scales(text: str) -> float:
    """``--clip``: a half-width in logistic scales within CLIP_RANGE."""
    value = positive_float(text)
    lo, hi = CLIP_RANGE
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"expected {lo:g} .. {hi:g} logistic scales, got {text!r} (outside the range the error curve is taken as "
            "the Gaussian's, so a tiny range gives the Gaussian's NLL; the default is 10, the paper used 4)")
    return value


def add_model_args(p) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--weights", help="weights of a registry model: a file, a diffusers folder or a Hub repo id "
                   "(the registry's schedule; a folder whose own scheduler config disagrees is refused)")
    p.add_argument("--class-label", type=int, help="class-conditional diffusers models: evaluate -log p(x | y) "
                   "at this class")


def learning_rate(text: str) -> float:
    """``--lr``: in (0, 1]; Adam's steps are about the learning rate in size, so above 1 weights blow up."""
    value = positive_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"expected a learning rate in (0, 1], got {text!r} (Adam moves every "
                                         "weight by about the learning rate per step: above 1 training diverges)")
    return value


def precheck_hub(spec: str | None) -> None:
    """Fetch (or find in the cache) a Hub repo id before anything heavy is imported, so that a repo
    that cannot be had fails in one line at once (nothing for a name or a local path)."""
    if not spec or Path(spec).expanduser().exists():
        return
    from ..denoisers.hub import local_snapshot, looks_like_repo_id

    if looks_like_repo_id(spec):  # no registry name holds a "/"
        local_snapshot(spec)


MAX_WORKERS = 256


def worker_count(text: str) -> int:
    """``--workers``: 0 (decode in the main process) .. MAX_WORKERS."""
    if text.strip() == "0":
        return 0
    return positive_int(text, MAX_WORKERS)


def add_workers_arg(p) -> None:
    p.add_argument("--workers", type=worker_count, default=0, help="DataLoader worker processes decoding image "
                   "files ahead of use (default: 0, in the main process; the numbers do not depend on it)")


def add_device_arg(p, workers: bool = False, distributed: bool = True) -> None:
    """``--device`` (and ``--workers`` when ``workers``; ``distributed``: the help mentions torchrun)."""
    if workers:
        add_workers_arg(p)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu"
                   + ("; under torchrun each process takes cuda:LOCAL_RANK)" if distributed else ")"))


def start_world(args):
    """This process's :class:`~itdiffusion.training.distributed.World` and device; joins the process group."""
    from ..training.distributed import device_for, init, world_from_env

    world = world_from_env()
    device = device_for(world, args.device)
    init(world, device)
    return world, device


def load_spectrum(path: str):
    from ..core.spectrum import GaussianSpectrum

    return GaussianSpectrum.load(Path(path))


def check_shapes(data, spectrum, model=None) -> None:
    """ValueError unless the data, the spectrum and the model agree on the image shape."""
    if tuple(spectrum.shape) != data.shape:
        raise ValueError(f"the spectrum is for examples of shape {tuple(spectrum.shape)} but {data.source} holds "
                         f"images of shape {data.shape}")
    if model is not None and tuple(model.shape) != data.shape:
        raise ValueError(f"{model.label} models images of shape {tuple(model.shape)}; {data.source} holds {data.shape}")


def say(world, *args) -> None:
    """Print on the first process only."""
    if world.is_main:
        print(*args, flush=True)


def check_registry_model(args, data, *, need_weights: bool) -> None:
    """Cheap checks of a registry ``--model`` before its network is built."""
    from ..resolve import registry_shape

    shape = registry_shape(args.model)
    if shape is None:
        return
    if need_weights and args.weights is None:
        from ..denoisers import model_spec

        raise ValueError(f"{args.model} needs --weights (published: {model_spec(args.model).weights}); "
                         "without them the network is random")
    if shape != data.shape:
        raise ValueError(f"{args.model} models images of shape {shape}; {data.source} holds {data.shape}")
