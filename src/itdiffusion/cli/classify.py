"""``itd classify``: zero-shot classification with a class-conditional diffusion model."""

from __future__ import annotations

import argparse

from ._common import positive_int
from ._conditional import LABELLED_HELP, add_common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "classify",
        help="zero-shot classification of a labelled folder: accuracy and confusion matrix",
        description="For every image, log p(x | y_k) for every class k on shared noise (its argmax is the zero-shot "
        "label; softmax is p(y | x) under a uniform prior), against the label of its sub-folder. Writes OUT (.json: "
        "accuracy, confusion matrix, calls), the scores beside it (.npz) and the confusion matrix (.png). "
        f"--data: {LABELLED_HELP}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common(p, labelled=True)
    p.add_argument("--out", required=True, help="results (.json); scores (.npz) and the confusion figure (.png) beside")
    p.add_argument("--early-drop", type=float, help="drop a candidate class when it is this many standard errors "
                   "behind the leader (after each of --rounds rounds); reports the calls saved")
    p.add_argument("--rounds", type=positive_int, default=4, help="rounds of calls with --early-drop")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .. import fileio as _io
    from ..data.labelled import network_labels
    from ..reporting.infomaps import plot_confusion
    from ._conditional import check_free, outputs, setup

    paths = outputs(args.out, (".npz", ".png"), figure=(".json",))
    with check_free(paths.values(), args):  # held until every output is written
        if args.early_drop is not None and not 0 < args.early_drop < float("inf"):
            raise ValueError(f"--early-drop must be a positive number of standard errors, got {args.early_drop}")
        s = setup(args, labelled="yes")
        candidates = network_labels(s.data.classes).tolist()
        x = s.data.x.to(s.device)
        scores, calls = s.model.classify(x, candidates, args.points, seed=args.seed, early_drop=args.early_drop,
                                         rounds=args.rounds, return_calls=True, **s.options)
        scores, truth = scores.cpu(), s.data.labels
        predicted = scores.argmax(1)
        k = len(candidates)
        confusion = torch.zeros(k, k, dtype=torch.long)
        confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
        accuracy = float((predicted == truth).double().mean())
        full = len(x) * k * args.points
        used = int(calls.sum())
        _io.save_npz_atomic(paths[".npz"], {"scores": scores.numpy(), "labels": truth.numpy(), "calls": calls.numpy()})
        _io.save_json_atomic(paths[".json"], {
            "model": s.label, "data": args.data, "images": len(x), "classes": list(s.data.classes),
            "points": args.points, "seed": args.seed, "early_drop": args.early_drop, "accuracy": accuracy,
            "confusion": confusion.tolist(), "calls": used, "calls_without_dropping": full,
            "calls_saved": 1 - used / full})
        plot_confusion(confusion.numpy(), s.data.classes, paths[".png"],
                       title=f"{s.label}: zero-shot accuracy {accuracy:.1%}")
        print(f"{s.label} on {s.data.source}: zero-shot accuracy {accuracy:.1%} over {len(x)} images, {k} classes")
        print("confusion (rows: true, columns: predicted):")
        width = max(3, max(len(c) for c in s.data.classes))
        print(" " * (width + 1) + " ".join(f"{c:>{width}}" for c in s.data.classes))
        for name, row in zip(s.data.classes, confusion.tolist()):
            print(f"{name:>{width}} " + " ".join(f"{v:>{width}}" for v in row))
        if args.early_drop is not None:
            print(f"early dropping: {used} of {full} calls ({1 - used / full:.1%} saved)")
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
