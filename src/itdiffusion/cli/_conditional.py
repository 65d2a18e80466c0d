"""Set-up shared by ``itd infomap``, ``itd mi`` and ``itd classify``: arguments, data, model, outputs."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from ._common import DATA_HELP, add_device_arg, add_model_args, positive_int

LABELLED_HELP = "a labelled folder (one sub-folder of PNG/JPEG images per class: the label is the sub-folder's name)"


def add_common(p: argparse.ArgumentParser, *, labelled: bool = False) -> None:
    """The arguments every map/conditional command takes."""
    add_model_args(p)
    p.add_argument("--data", required=True, help=LABELLED_HELP if labelled else DATA_HELP + "; or " + LABELLED_HELP)
    p.add_argument("--spectrum", required=True, help="spectrum .npz of the training data (itd spectrum)")
    p.add_argument("--points", type=positive_int, default=256, help="network calls per image (and per candidate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and of the --limit draw)")
    p.add_argument("--limit", type=positive_int, help="use this many images, drawn at random by --seed")
    p.add_argument("--continuous", action="store_true", help="treat the data as continuous (-log p(x)) even when "
                   "it lies on a grid (default: the discrete bound on the data's grid)")
    p.add_argument("--rounding", choices=["hard", "soft", "none"], default="hard", help="rounding of the discrete bound")
    p.add_argument("--batch-size", type=positive_int, default=256, help="(image, point) pairs per network call")
    p.add_argument("--null-label", type=int, help="the label that means 'no condition' (classifier-free-guidance "
                   "models trained with labels dropped to it): the unconditional curve of maps and MI")
    p.add_argument("--label", help="name of the model in figures")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_device_arg(p)


@dataclass
class Setup:
    data: object  # ImageData
    model: object  # ITDiffusion on its device
    label: str
    options: dict  # keywords of ITDiffusion.estimator
    device: object


def outputs(out: str, suffixes: tuple[str, ...], figure: tuple[str, ...] = (".png", ".pdf")) -> dict[str, Path]:
    """The output paths beside ``out`` (a figure or ``.json``); ``ValueError`` for a wrong suffix."""
    path = Path(out)
    if path.suffix.lower() not in figure:
        raise ValueError(f"--out must name a {' or '.join(figure)} file, got {path}")
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder")
    return {s: path if s == path.suffix.lower() else path.with_suffix(s) for s in (path.suffix.lower(), *suffixes)}


def check_free(paths, args):
    """Refuse outputs that exist (without ``--overwrite``), that would replace an input (the spectrum,
    the data, the model), or that cannot be written: the one output guard of every command.  Returns
    the outputs' locks, to hold in a with-statement (a second run on the same outputs is then refused)."""
    from ..guard import OutputLocks, check_outputs

    paths = list(paths)
    for path in paths:
        if path.exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
    check_outputs(paths, [args.data, args.spectrum, args.model, getattr(args, "weights", None)])
    return OutputLocks(paths)  # acquired by the caller's with-statement


def load_data(args, labelled: str = "auto"):
    """``--data``: a labelled folder (``labelled="yes"``, or ``"auto"`` when it has class sub-folders only)."""
    from ..data.images import load_data as load_any
    from ..data.labelled import read_labelled_folder

    path = Path(args.data).expanduser()
    is_folder = path.is_dir() and any(p.is_dir() for p in path.iterdir())
    if labelled == "yes" or (labelled == "auto" and is_folder and not (path / "train").is_dir()
                             and not any(p.is_file() for p in path.iterdir())):
        return read_labelled_folder(path, limit=args.limit, seed=args.seed)
    return load_any(args.data, "test", limit=args.limit, seed=args.seed)


def load_model(args, spectrum, grid):
    """The denoiser of ``--model`` (resolved as by every command, :func:`itdiffusion.resolve.resolve_model`;
    a class-conditional model keeps its labels free), its label and image shape."""
    from ..resolve import resolve_model

    if args.class_label is not None:
        raise ValueError("--class-label is for itd eval, compare and finetune; here the labels come from --y "
                         "or from a labelled folder's sub-folders")
    loaded = resolve_model(args.model, weights=args.weights, spectrum=spectrum, grid=grid, conditional=True)
    return loaded.denoiser, args.label or loaded.label, tuple(loaded.shape)


def setup(args, labelled: str = "auto") -> Setup:
    """Data, model (on its device) and estimator options, every input checked before any work."""
    import torch

    from ..model import ITDiffusion
    from ._common import check_shapes, load_spectrum

    from ..training.distributed import check_device

    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spectrum = load_spectrum(args.spectrum)
    data = load_data(args, labelled)
    check_shapes(data, spectrum)
    denoiser, label, shape = load_model(args, spectrum, data.grid)
    if shape != data.shape:
        raise ValueError(f"{label} models images of shape {shape}; {data.source} holds {data.shape}")
    if args.null_label is not None:
        from ..core.condition import NullLabel

        if args.null_label < 0:
            raise ValueError(f"--null-label must be a label (a non-negative integer), got {args.null_label}")
        denoiser = NullLabel(denoiser, args.null_label)
    model = ITDiffusion(denoiser, spectrum).to(device).eval()
    discrete = None if args.continuous else data.grid
    options = {"batch_size": args.batch_size, "discrete": discrete}
    if discrete is not None:
        options["rounding"] = args.rounding
    if data.classes and not all(c.isdigit() for c in data.classes):  # documented, but easy to miss
        print("class names are not all integers: the network is given labels in sorted-name order ("
              + ", ".join(f"{c}={i}" for i, c in enumerate(data.classes)) + ")")
    return Setup(data, model, label, options, device)


def bits(nats, d: int = 1):
    """Nats to bits (per dimension with ``d``)."""
    return nats / (math.log(2.0) * d)
