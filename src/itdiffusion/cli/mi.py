"""``itd mi``: pointwise mutual information between images and their labels, per image and per pixel."""

from __future__ import annotations

import argparse

from ._conditional import add_common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "mi",
        help="per-image mutual information i(x; y) with a class-conditional model, and per-pixel MI maps",
        description="i(x; y) = log p(x | y) - log p(x) in nats (and bits) for each image, from the unconditional "
        "(y=None: the model's null label) and conditional error curves on the same noise, with standard errors; "
        "and per-pixel maps of it. The label of each image is its sub-folder's name (a labelled folder) or --y. "
        "Writes OUT (figure: images beside their MI maps), and .json/.npz beside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common(p)
    p.add_argument("--out", required=True, help="figure (.png or .pdf); results go beside it (.json, .npz)")
    p.add_argument("--y", type=int, help="the label of every image (default: from the labelled folder)")
    p.add_argument("--rows", type=int, default=6, help="images shown in the figure (at most 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .. import fileio as _io
    from ..data.labelled import network_labels
    from ..reporting.infomaps import plot_maps
    from ._conditional import bits, check_free, outputs, setup

    paths = outputs(args.out, (".json", ".npz"))
    with check_free(paths.values(), args):  # held until every output is written
        if not 1 <= args.rows <= 8:
            raise ValueError(f"--rows must be between 1 and 8, got {args.rows}")
        s = setup(args)
        if args.y is not None:
            y = torch.full((len(s.data),), args.y, dtype=torch.long)
        elif s.data.labels is not None and s.data.classes:
            y = network_labels(s.data.classes)[s.data.labels]
        else:
            raise ValueError(f"{s.data.source} has no labels: give a labelled folder (one sub-folder per class) or --y")
        x, y = s.data.x.to(s.device), y.to(s.device)
        mi, se = s.model.mi(x, y, args.points, seed=args.seed, return_se=True, **s.options)
        maps = s.model.mi_map(x, y, args.points, seed=args.seed, **s.options).cpu()
        mi, se = mi.cpu(), se.cpu()
        _io.save_npz_atomic(paths[".npz"], {"mi_map_nats": maps.numpy(), "mi_nats": mi.numpy(), "se_nats": se.numpy(),
                                            "y": y.cpu().numpy()})
        _io.save_json_atomic(paths[".json"], {
            "model": s.label, "data": args.data, "images": len(x), "points": args.points, "seed": args.seed,
            "mi_nats_mean": float(mi.mean()), "se_of_mean_nats": float((se**2).sum().sqrt() / len(se)),
            "mi_nats": mi.tolist(), "se_nats": se.tolist(), "y": y.cpu().tolist(),
            "names": list(s.data.names) if s.data.names else None})
        rows = min(args.rows, len(x))
        titles = [f"y={int(y[i])}: {mi[i]:.1f}±{se[i]:.1f} nats" for i in range(rows)]
        plot_maps(s.data.x[:rows].numpy(), bits(maps[:rows]).numpy(), paths[next(iter(paths))], diverging=True,
                  unit="bits per dimension (i(x; y))", title=f"{s.label}: pointwise mutual information with the label",
                  row_titles=titles)
        print(f"{s.label} on {s.data.source}: mean i(x; y) = {mi.mean():.2f} nats ({bits(mi.mean()):.2f} bits) "
              f"+- {(se**2).sum().sqrt() / len(se):.2f} over {len(x)} images")
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
