"""``itd eval``: every estimator of the test protocol, resumable and data-parallel."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from ._common import (DATA_HELP, MAX_BATCH, MAX_CALLS, add_device_arg, add_model_args,
                      clip_scales, int_up_to, positive_int, seed_int)

CHECKPOINT_EVERY = 300.0  # seconds between saves of partial progress


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="estimate the test likelihood with every estimator (resumable; data-parallel under torchrun)",
        description="Continuous -log p(x), the discrete bound on -log P(x) (data on a grid) and, with --dequantize, "
        "the dequantized estimate, each with its standard error and Gaussian-clamped variant; mean error "
        "curves; written as OUT (.json) and its arrays beside it (.npz). Partial progress is saved beside OUT: "
        "a killed run continues where it stopped when the same command is run again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help=DATA_HELP + "; its test split is used")
    p.add_argument("--spectrum", help="spectrum .npz of the Gaussian reference (itd spectrum). Optional: any "
                   "Gaussian reference gives a valid estimate (the identity holds for every one; a closer one only "
                   "lowers the variance); without it the reference is computed from --spectrum-data, else from the "
                   "evaluated images, and saved beside OUT as OUT.spectrum.npz so the run can be repeated")
    p.add_argument("--spectrum-data", help="images whose training split gives the Gaussian reference when --spectrum "
                   "is not given (same formats as --data)")
    p.add_argument("--out", required=True, help="results file (.json; the arrays go beside it as .npz)")
    p.add_argument("--per-image", metavar="FILE.csv", help="also write one row per image: its id (file path relative "
                   "to the data root, or index into the array, archive or built-in split), bits/dim and standard "
                   "error of each estimate (the ids are also saved in OUT.npz)")
    p.add_argument("--points", type=int_up_to(MAX_CALLS), default=1000, help="network calls per image and pass")
    p.add_argument("--soft-round", action="store_true", help="discrete bound with soft (posterior-mean) rounding "
                   "instead of hard rounding")
    p.add_argument("--dequantize", action="store_true", help="also estimate the dequantized likelihood "
                   "(a second network call per point)")
    p.add_argument("--no-clamp", dest="clamp_dequantized", action="store_false", help="do not project the "
                   "dequantized pass's x_hat onto the grid's range widened by half a step (the published code "
                   "does not; projecting is a better denoiser and still a valid estimate)")
    p.add_argument("--clip", type=clip_scales, help="integration half-width in logistic scales (default: the package's, "
                   "10; the paper used 4)")
    p.add_argument("--placement", choices=["midpoint", "stratified"], default="midpoint", help="placement of the "
                   "shared log-SNR points: the midpoint rule of the proposal, or one stratified draw from --seed")
    p.add_argument("--protocol", choices=["ours", "paper"], default="ours", help="'ours': this package's "
                   "estimators; 'paper': the published code's test protocol (its shared points from --seed, clip 4 "
                   "unless --clip, its soft rounding, tails and headline discrete figure; see docs/protocols.md)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the noise (and of the --limit draw)")
    p.add_argument("--limit", type=positive_int, help="evaluate this many images, drawn at random by --seed")
    p.add_argument("--batch-size", type=int_up_to(MAX_BATCH), default=256, help="(image, point) pairs per network call")
    p.add_argument("--images-per-step", type=int_up_to(MAX_BATCH), help="images evaluated between progress updates and "
                   "saves (default: as many as fit 2^24 noise values)")
    p.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY, help="seconds between saves of "
                   "partial progress (0: after every step)")
    p.add_argument("--no-per-sample-curves", dest="per_sample_curves", action="store_false",
                   help="do not keep per-image curves (smaller files; ensembles then have no standard errors)")
    _add_run_args(p)
    p.set_defaults(func=run)


def _add_run_args(p) -> None:
    """How ``itd eval`` runs: network options, output and progress, tuning, device."""
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="run the network under "
                   "autocast to this type (errors and integrals stay float64); see itdiffusion.denoisers.device")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the network (GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (slow first calls)")
    p.add_argument("--label", help="name of the model in tables and figures")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--fresh", action="store_true", help="discard saved partial progress and start over")
    p.add_argument("--resume", action="store_true", help="continue from the partial progress saved beside OUT, and "
                   "refuse to start if there is none (without --resume, saved progress is continued when it exists)")
    p.add_argument("--no-tune", dest="tune", action="store_false", help="evaluate the untuned estimator (default: "
                   "fit the log-SNR proposal, call layout and rounding on a pilot first, see ITDiffusion.tune)")
    p.add_argument("--pilot-data", help="pilot images for tuning (default: the training split of --data)")
    p.add_argument("--pilot-calls", type=positive_int, help="the pilot's budget of network calls (default: 5%% of "
                   "the evaluation's, at most the calls of 64 images)")
    add_device_arg(p, workers=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--all", action="store_true", help="print every estimate (continuous, discrete, dequantized, "
                   "Gaussian-clamped) below the headline, each with what it measures")


def progress_path(out: Path, world=None) -> Path:
    """The folder of partial progress beside ``out``, shared by every process (any number of them)."""
    return out.with_name(out.stem + ".partial")


def spectrum_path(out: Path) -> Path:
    """Where a Gaussian reference computed by ``itd eval`` is saved: ``OUT.spectrum.npz``."""
    return out.with_suffix(".spectrum.npz")


def _outputs(args, out: Path) -> list[Path]:
    """Every file ``itd eval`` writes (besides its progress folder)."""
    extra = [Path(args.per_image)] if args.per_image else []
    return [out, out.with_suffix(".npz")] + ([spectrum_path(out)] if args.spectrum is None else []) + extra


def _check_args(args, out: Path) -> None:
    if args.per_image is not None and Path(args.per_image).suffix.lower() != ".csv":
        raise ValueError(f"--per-image must name a .csv file, got {args.per_image}")
    if args.per_image is not None and Path(args.per_image).resolve() in {p.resolve() for p in _outputs(args, out)[:-1]}:
        raise ValueError(f"--per-image {args.per_image} is one of the other outputs")
    if out.suffix != ".json":
        raise ValueError(f"--out must name a .json file (its arrays go beside it as .npz), got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder")
    from ..guard import check_outputs

    if args.spectrum is not None and args.spectrum_data is not None:
        raise ValueError("--spectrum-data computes the Gaussian reference that --spectrum gives: pass one of them")
    inputs = [args.data, args.spectrum, args.spectrum_data, args.model, args.weights,
              getattr(args, "pilot_data", None)]
    check_outputs([*_outputs(args, out), progress_path(out)], inputs)  # before any other word on OUT
    for path in _outputs(args, out):  # the arrays (and a computed spectrum) beside OUT are part of it
        if path.exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
    if not args.checkpoint_every >= 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.resume and args.fresh:
        raise ValueError("--resume continues saved progress and --fresh discards it: pass one of them")


def run(args) -> int:
    from ._common import precheck_hub

    precheck_hub(args.model)  # before torch is imported: an unreachable Hub repo fails at once
    from ..evalstate import ProgressStore
    from ..training.distributed import shutdown
    from ._common import start_world

    out = Path(args.out)
    _check_args(args, out)
    world, device = start_world(args)
    lock = None
    try:
        if args.resume and not ProgressStore(progress_path(out)).exists():
            raise ValueError(f"nothing to resume: no {progress_path(out)} (run without --resume to start)")
        if world.is_main:  # the other processes write only inside the progress folder, under this lock
            lock = _guard_outputs(args, out)
        return _evaluate(args, out, world, device)
    finally:
        if lock is not None:
            lock.release()
        shutdown(world)


def _guard_outputs(args, out: Path):
    """Hold the output lock (the outputs were checked against the inputs by ``_check_args``)."""
    from ..guard import OutputLocks

    return OutputLocks([out, out.with_suffix(".npz")]).acquire()


def _setup(args, world, device):
    """Data, model and evaluator for this process's shard (everything validated before any output)."""
    from ..training.distributed import shard
    from ..core.noise import NOISE_BUDGET
    from ..evaluation import EvalConfig, Evaluator
    from ..data.stream import Chunks, open_images
    from ..model import ITDiffusion
    from ..resolve import resolve_model, state_fingerprint
    from ..denoisers.device import DeviceOptions, optimize_denoiser
    from ._common import check_registry_model, check_shapes, load_spectrum

    data = open_images(args.data, "test", limit=args.limit, seed=args.seed)
    spectrum, computed_from = ((load_spectrum(args.spectrum), None) if args.spectrum is not None
                               else _computed_spectrum(args, data))
    check_registry_model(args, data, need_weights=True)
    loaded = resolve_model(args.model, weights=args.weights, spectrum=spectrum, grid=data.grid, seed=args.seed,
                           class_label=args.class_label)
    check_shapes(data, spectrum, loaded)
    if data.grid is None and (args.soft_round or args.dequantize):
        raise ValueError(f"{data.source} is continuous (not on a grid): --soft-round and --dequantize need a grid")
    if len(data) < world.size:
        raise ValueError(f"{len(data)} images cannot be shared by {world.size} processes")
    kwargs = {} if args.clip is None else {"clip": args.clip}
    options = DeviceOptions(dtype=args.dtype, channels_last=args.channels_last, compile=args.compile)
    denoiser = optimize_denoiser(loaded.denoiser.to(device), options)
    model = ITDiffusion(denoiser, spectrum, **kwargs).to(device).eval()
    config = EvalConfig(n_points=args.points, discrete=data.grid, soft=args.soft_round, dequantize=args.dequantize,
                        placement=args.placement, seed=args.seed, per_sample_curves=args.per_sample_curves,
                        clip=args.clip, protocol=args.protocol, clamp_dequantized=args.clamp_dequantized)
    pilot = _tune(args, model, data, config)
    part = shard(len(data), world)
    evaluator = Evaluator(model, config, batch_size=args.batch_size, index_offset=part.start)
    evaluator.pilot_report, evaluator.computed_spectrum = pilot, (spectrum, computed_from) if computed_from else None
    step = args.images_per_step or max(1, NOISE_BUDGET // (evaluator.layout.n_calls * data.d))
    identity = {"model": state_fingerprint(model), "data": data.fingerprint(), "dtype": args.dtype}
    chunks = Chunks(data, step, part.start, part.stop, workers=args.workers, pin_memory=device.type == "cuda")
    return data, loaded, evaluator, chunks, identity


def _computed_spectrum(args, data):
    """The Gaussian reference of ``--spectrum-data`` (its training split), else of the evaluated images:
    a full covariance when there are more images than dimensions, else a diagonal one."""
    from ..core.spectrum import GaussianSpectrum
    from ..data.stream import open_images

    source = open_images(args.spectrum_data, "train") if args.spectrum_data is not None else data
    if source.shape != data.shape:
        raise ValueError(f"--spectrum-data {source.source} holds images of shape {source.shape}; "
                         f"{data.source} holds {data.shape}")
    diagonal = len(source) <= source.d
    spectrum = GaussianSpectrum.from_batches(source.chunks(2048), diagonal=diagonal)
    return spectrum, f"{source.source} ({len(source)} images, {'diagonal' if diagonal else 'full'} covariance)"


def _tune(args, model, data, config) -> dict | None:
    """Tune ``model`` on pilot images (``--pilot-data`` or the training split of ``--data``),
    leaving out any image that is also evaluated."""
    import hashlib

    from ..data.images import load_data
    from ..evaluation import PILOT_EXAMPLES, _maybe_tune

    if not args.tune:
        return None
    pilot = load_data(args.pilot_data or args.data, "train", limit=4 * PILOT_EXAMPLES, seed=args.seed + 1)
    digest = lambda rows: [hashlib.sha1(r.numpy().tobytes()).digest() for r in rows.float().flatten(1)]  # noqa: E731
    evaluated = {h for x in data.chunks(4096) for h in digest(x)}
    keep = [i for i, h in enumerate(digest(pilot.x)) if h not in evaluated][:PILOT_EXAMPLES]
    if len(keep) < 2:
        return {"skipped": "no pilot images apart from the evaluated ones: not tuned (pass --pilot-data)"}
    return _maybe_tune(model, config, None, True, pilot.x[keep].to(model.proposal.device), args.pilot_calls,
                       args.batch_size, n_examples=len(data))


def _evaluate(args, out: Path, world, device) -> int:
    from tqdm.auto import tqdm

    from ..training.distributed import barrier
    from .. import fileio as _io
    from ..evalstate import ProgressStore

    data, loaded, evaluator, batches, identity = _setup(args, world, device)
    partial = progress_path(out)
    if world.is_main:  # temporary files of a killed run; --fresh discards saved progress
        for path in (out, out.with_suffix(".npz")):
            _io.remove_stale_temps(path)
        if args.fresh:
            ProgressStore(partial).remove()
        ProgressStore(partial).remove_stale_temps()
    barrier(world)
    try:
        evaluator.attach(partial, identity)
    except ValueError as err:
        raise ValueError(f"{err} (or pass --fresh)") from None
    n_shard = batches.n_images
    done = evaluator.done_in(evaluator.index_offset, evaluator.index_offset + n_shard)
    if world.is_main:  # status on stderr: stdout is the results, the headline first
        print(f"{loaded.label} on {data.source}: {len(data)} images x {args.points} calls"
              f"{' x 2 (dequantized)' if args.dequantize else ''}, {world.size} process(es) on {device.type}"
              + (f"; resuming after {done} images" if done else ""), file=sys.stderr, flush=True)
    bar = tqdm(total=n_shard, initial=done, unit="img", desc="eval", dynamic_ncols=True, smoothing=0.05,
               disable=args.quiet or not world.is_main, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    began = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        evaluator.run(batches, callback=lambda n: bar.update(n - bar.n), checkpoint=partial,
                      checkpoint_every=args.checkpoint_every, checkpoint_meta=identity)
    except KeyboardInterrupt:  # the rows done are saved: say so once, and where
        bar.close()
        if world.is_main:
            print(f"itd eval: interrupted; progress saved in {partial}: run the same command to continue",
                  file=sys.stderr)
        return 130
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    barrier(world)  # every process has saved its rows
    if world.is_main:
        _write_results(args, out, evaluator, partial, identity, loaded, data, world, began)
    barrier(world)
    if world.is_main:
        ProgressStore(partial).remove()
    return 0


def _write_results(args, out: Path, evaluator, partial: Path, identity, loaded, data, world, began: float) -> None:
    """Join every process's saved rows into the results, write them and print the table (first process)."""
    from ..evaluation import Evaluator

    joined = Evaluator(evaluator.model, evaluator.config, batch_size=evaluator.batch_size)
    joined.attach(partial, identity)
    results = joined.results()
    results.ids = data.ids()
    spectrum, computed_from = args.spectrum, None
    if evaluator.computed_spectrum is not None:  # saved beside OUT, so that the run can be repeated with --spectrum
        spectrum, (reference, computed_from) = str(spectrum_path(out)), evaluator.computed_spectrum
        reference.save(spectrum)
    results.config.update({
        "model": args.label or loaded.label, "model_arg": args.model, "weights": args.weights, "data": args.data,
        "spectrum": spectrum, "spectrum_computed_from": computed_from, "processes": world.size, "seconds": time.perf_counter() - began,
        "run": None if loaded.run is None else str(loaded.run), "dtype": args.dtype,
        "pilot": evaluator.pilot_report, "limit": args.limit, "data_sha256": identity["data"],
    })
    results.save(out)
    if args.per_image:
        results.write_per_example_csv(args.per_image)
    print(headline(results, args.all, f"{results.config['model']} on {data.source}"), end="")
    if evaluator.pilot_report:
        print(f"pilot (apart from the evaluation): {evaluator.pilot_report}")
    written = _outputs(args, out)
    print(f"wrote {', '.join(str(p) for p in written[:-1])} and {written[-1]}")


def headline(results, full: bool, title: str) -> str:
    """What ``itd eval`` prints: the one number to report first, then (``--all``) every estimate."""
    text = f"headline: {results.headline_text()}\n"
    others = len(results.estimates) - 1
    if not full:
        return text + f"({others} more estimates in the results file: --all prints them, itd report tabulates)\n"
    return text + "\nAll estimates (secondary; the headline is the row to compare with published bits/dim):\n" + \
        results.to_markdown(title, meanings=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
