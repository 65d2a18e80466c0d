"""``itd finetune``: train a pretrained or fresh denoiser with the information-theoretic objective."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ._common import (DATA_HELP, MAX_BATCH, MAX_CALLS, MAX_EPOCHS, add_device_arg, add_model_args,
                      clip_scales, int_up_to, learning_rate, positive_float, positive_int, seed_int, unit_fraction)

RUN_INFO = "run.json"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune (or train) a denoiser with the IT objective; checkpoints every epoch",
        description="Adam on the IT objective (a stochastic estimate of -log p(x)). Writes OUT/checkpoint.safetensors "
        "and OUT/history.json after every epoch; --resume continues exactly where a run stopped. "
        "Runs data-parallel under torchrun. Paper settings: DDPM lr 1e-4 batch 64, IDDPM lr 2.5e-5 batch 32, "
        "10 epochs. Logging (--log-dir), EMA weights (--ema), bf16 autocast and gradient accumulation: "
        "docs/finetune.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help=DATA_HELP + "; its training split is used")
    p.add_argument("--spectrum", required=True, help="spectrum .npz of the training data (itd spectrum)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--epochs", type=int_up_to(MAX_EPOCHS), default=10, help="total epochs (including resumed ones)")
    p.add_argument("--lr", type=learning_rate, default=1e-4, help="Adam learning rate (at most 1)")
    p.add_argument("--batch-size", type=int_up_to(MAX_BATCH), default=64, help="images per forward pass (over all "
                   "processes); an optimizer step takes --grad-accum passes")
    p.add_argument("--grad-accum", type=int_up_to(MAX_BATCH), default=1, help="accumulate the gradients of this many "
                   "passes per optimizer step (the step's batch: grad-accum x batch-size images)")
    p.add_argument("--ema", type=unit_fraction, metavar="DECAY", help="keep an exponential moving average of the "
                   "weights with this decay (e.g. 0.999); it is validated, saved next to the raw weights, and is what "
                   "itd eval --model OUT evaluates")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: the training forward and "
                   "backward under bfloat16 autocast (float32 weights; validation stays float32)")
    p.add_argument("--log-dir", help="write log.csv (loss and lr per step, validation per epoch) here, and "
                   "TensorBoard scalars when tensorboard is installed (pip install itdiffusion[log])")
    p.add_argument("--grad-clip", type=positive_float, help="clip the gradient norm to this")
    p.add_argument("--dequantize", action="store_true", help="train on x + u, u uniform over one grid step: the "
                   "objective then bounds the discrete -log P(x) (as the dequantized estimate of itd eval does); "
                   "helps on coarse grids such as digits. The paper trained on the grid values")
    p.add_argument("--clip", type=clip_scales, help="half-width of the training log-SNR range in logistic scales "
                   "(default: the package's, 10; the published code used 4)")
    p.add_argument("--proposal", choices=["uniform", "logistic"], default="uniform", help="how the training "
                   "log-SNR is drawn in its range (the published code: logistic)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant", help="learning rate "
                   "over the run (cosine: decays to 0 over all epochs)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--test-data", help="evaluate the test NLL after every epoch on this data (its test split)")
    p.add_argument("--test-points", type=int_up_to(MAX_CALLS), default=64, help="network calls per test image")
    p.add_argument("--test-examples", type=positive_int, default=1000, help="test images (drawn by --seed)")
    p.add_argument("--test-metric", choices=["auto", "continuous", "discrete"], default="auto",
                   help="per-epoch test NLL: the continuous -log p(x) (what the training loss estimates) or the "
                   "discrete bound on -log P(x); auto: discrete for data on a grid")
    p.add_argument("--limit", type=positive_int, help="train on this many images, drawn at random by --seed")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of initialisation (small-unet), shuffling and noise")
    add_device_arg(p, workers=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _check_out(out: Path, resume: bool) -> None:
    from ..training.train import CHECKPOINT

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a run directory")
    has_run = (out / CHECKPOINT).is_file()
    if resume and not has_run:
        raise ValueError(f"nothing to resume: no {CHECKPOINT} in {out}")
    if has_run and not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")


def _check_log_dir(log_dir: Path, resume: bool) -> None:
    from ..training.runlog import CSV_NAME

    if log_dir.exists() and not log_dir.is_dir():
        raise ValueError(f"--log-dir {log_dir} is a file; give a folder")
    if not resume and (log_dir / CSV_NAME).exists():
        raise ValueError(f"--log-dir {log_dir} already holds the {CSV_NAME} of a run; choose another folder "
                         "(a resumed run continues its own)")


def run(args) -> int:
    from ._common import precheck_hub

    precheck_hub(args.model)  # an unreachable Hub repo fails at once
    from ..guard import OutputLock, check_outputs

    out = Path(args.out)
    _check_out(out, args.resume)
    from ..training.distributed import world_from_env

    inputs = [args.data, args.test_data, args.spectrum, args.model, args.weights]
    check_outputs([out], inputs)
    if args.log_dir is not None:
        _check_log_dir(Path(args.log_dir), args.resume)
        check_outputs([args.log_dir], inputs, flag="--log-dir")
    if not world_from_env().is_main:  # the first process holds the lock for all of them
        return _run(args, out)
    with OutputLock(out):
        return _run(args, out)


def _run(args, out: Path) -> int:
    import torch

    from .. import fileio as _io
    from ..data.images import describe
    from ..model import ITDiffusion
    from ..training.train import TrainConfig, train
    from ._common import say, start_world

    spectrum, data, test, loaded, metric = _load_inputs(args)
    world, device = start_world(args)
    if world.is_main:  # temporary files of a run killed while writing (this command owns --out)
        from ..training.train import CHECKPOINT, HISTORY

        for name in (CHECKPOINT, HISTORY, RUN_INFO):
            _io.remove_stale_temps(out / name)
    say(world, describe(data))
    say(world, f"model: {loaded.label}; {sum(p.numel() for p in loaded.denoiser.parameters()):,} parameters; "
        f"{world.size} process(es) on {device.type}")
    clip = {} if args.clip is None else {"train_clip": args.clip}
    model = ITDiffusion(loaded.denoiser, spectrum, train_proposal=args.proposal, **clip)
    model = model.to(device)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         grad_clip=args.grad_clip, lr_schedule=args.lr_schedule, val_points=args.test_points, val_examples=None,
                         dequantize=data.grid.delta if args.dequantize else 0.0, ema=args.ema,
                         grad_accum=args.grad_accum, dtype=args.dtype)
    description = {**loaded.description, "label": _tuned_label(loaded.description["label"]),
                   "source": {"model": args.model, "data": args.data, "spectrum": args.spectrum}}
    info = {"model": args.model, "label": description["label"], "data": args.data, "test_data": args.test_data,
            "spectrum": args.spectrum, "shape": list(data.shape), "d": data.d, "test_metric": metric,
            "dequantize": args.dequantize, "train_clip": model.train_clip, "proposal": args.proposal,
            "processes": world.size, "ema": args.ema, "grad_accum": args.grad_accum, "dtype": args.dtype,
            "log_dir": args.log_dir, **_identity(args, data, spectrum)}
    if args.resume:
        _check_resume(out, info)
    grid = test.grid if metric == "discrete" else None

    on_epoch = _epoch_printer(out, info, data.d, metric)

    try:
        history = train(model, data, config, x_val=None if test is None else test.x, discrete=grid, out_dir=out,
                        resume=args.resume, meta=description, progress=not args.quiet, on_epoch=on_epoch,
                        world=world, log_dir=args.log_dir, workers=args.workers)
        if world.is_main and history.records:  # also when a resumed run had nothing left to do
            _io.save_json_atomic(out / RUN_INFO, {**info, "epochs_done": history.records[-1].epoch})
            _export_diffusers(loaded, model, out, world)
    finally:
        from ..training.distributed import shutdown

        shutdown(world)
    say(world, f"wrote {out}/checkpoint.safetensors, history.json, {RUN_INFO}")
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return 0


RESUME_KEYS = ("model", "limit", "seed", "data_id", "spectrum_id", "shape", "train_clip", "proposal",
               "dequantize", "test_data", "test_metric", "test_examples", "test_points", "ema", "grad_accum", "dtype")
"""What must be unchanged when a run is resumed (batch size, lr and the rest are checked by ``train``)."""
ADDED_LATER = {"ema": None, "grad_accum": 1, "dtype": "fp32"}
"""Keys a run.json written before them lacks, and what such a run trained with."""


def _identity(args, data, spectrum) -> dict:
    """Settings and content identities of the run, compared by ``--resume``."""
    import hashlib

    from ..data.stream import Chunks

    digest = hashlib.sha256(repr((len(data), data.shape, data.grid)).encode())
    ends = [Chunks(data, 64, 0, 64), Chunks(data, 64, max(0, len(data) - 64))]  # first and last images: cheap
    for x in (x for part in ends for x in part):
        digest.update(x.numpy().tobytes())
    spec = hashlib.sha256(b"".join(t.double().cpu().numpy().tobytes() for t in
                                   (spectrum.mean, spectrum.log_eigs) if t is not None))
    return {"limit": args.limit, "seed": args.seed, "test_examples": args.test_examples,
            "test_points": args.test_points, "data_id": digest.hexdigest()[:16], "spectrum_id": spec.hexdigest()[:16]}


def _check_resume(out: Path, info: dict) -> None:
    """Refuse to continue a run on other settings, naming the first that differs."""
    from .. import fileio as _io

    path = out / RUN_INFO
    try:
        saved = _io.load_json(path)
    except ValueError as err:
        raise ValueError(f"--resume: cannot read {path} ({err}); start a new run with another --out") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} is not a run description; start a new run with another --out")
    saved = {**ADDED_LATER, **saved}
    missing = [key for key in RESUME_KEYS if key not in saved]
    if missing:
        raise ValueError(f"--resume: {path} lacks {', '.join(missing)}, so the run's settings cannot be checked; "
                         "start a new run with another --out")
    for key in RESUME_KEYS:
        if saved[key] != _jsonable(info.get(key)):
            raise ValueError(f"--resume: {key} differs from the run's ({path} has {saved[key]!r}, this command "
                             f"gives {info.get(key)!r}); repeat the run's settings or choose another --out")


def _jsonable(value):
    import json

    return json.loads(json.dumps(value))


def _load_inputs(args):
    """``(spectrum, data, test, loaded, metric)``: the inputs of a fine-tuning run, checked against each other."""
    from ..data.images import load_data
    from ..data.stream import open_images
    from ..resolve import resolve_model
    from ._common import check_registry_model, check_shapes, load_spectrum

    spectrum = load_spectrum(args.spectrum)
    data = open_images(args.data, "train", limit=args.limit, seed=args.seed)  # read batch by batch
    test = load_data(args.test_data, "test", limit=args.test_examples, seed=args.seed) if args.test_data else None
    check_registry_model(args, data, need_weights=False)
    loaded = resolve_model(args.model, weights=args.weights, spectrum=spectrum, grid=data.grid, seed=args.seed,
                           class_label=args.class_label)
    check_shapes(data, spectrum, loaded)
    if test is not None:
        check_shapes(test, spectrum)
    if args.test_metric == "discrete" and (test is None or test.grid is None):
        raise ValueError("--test-metric discrete needs --test-data on a grid")
    if args.dequantize and data.grid is None:
        raise ValueError(f"--dequantize needs data on a grid; {data.source} is continuous")
    metric = args.test_metric
    if metric == "auto":
        metric = "discrete" if test is not None and test.grid is not None else "continuous"
    return spectrum, data, test, loaded, metric


def _epoch_printer(out: Path, info: dict, d: int, metric: str):
    """The per-epoch callback: records the epochs done in ``RUN_INFO`` and prints one line."""
    from .. import fileio as _io

    def on_epoch(record, _model):
        _io.save_json_atomic(out / RUN_INFO, {**info, "epochs_done": record.epoch})
        line = f"epoch {record.epoch:3d}  train {record.train_loss:10.4f} nats ({_bpd(record.train_loss, d):.4f} "
        line += "bpd)"
        if record.val_nll is not None:
            line += f"  test {record.val_nll:10.4f} ± {record.val_se:.4f} nats "
            line += f"({_bpd(record.val_nll, d):.4f} bpd, {metric}{', EMA weights' if info.get('ema') else ''})"
        print(line + f"  {record.seconds:.1f} s", flush=True)

    return on_epoch


def _export_diffusers(loaded, model, out: Path, world) -> None:
    """A diffusers model's tuned UNet, also as a diffusers folder ``OUT/diffusers`` (its scheduler config copied)."""
    from ..resolve import DIFFUSERS, DIFFUSERS_OUT, save_diffusers_folder
    from ._common import say

    if loaded.description.get("kind") != DIFFUSERS:
        return
    folder = save_diffusers_folder(model.denoiser, loaded.description, out / DIFFUSERS_OUT)
    label = loaded.description.get("class_label")
    say(world, f"wrote {folder} (a diffusers model folder: diffusers.UNet2DModel.from_pretrained reads it"
        + (f"; class-conditional: evaluate it with --class-label {label})" if label is not None else ")"))


def _tuned_label(label: str) -> str:
    return label if label.endswith("IT-tuned") else f"{label}, IT-tuned"


def _bpd(nats: float, d: int) -> float:
    return nats / (d * math.log(2))
