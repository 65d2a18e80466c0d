"""``itd infomap``: where an image's bits are (per-pixel contributions to its likelihood)."""

from __future__ import annotations

import argparse

from ._conditional import add_common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "infomap",
        help="per-pixel information maps: images beside their bits-per-pixel maps",
        description="Split each image's -log p(x) (or discrete bound) over its pixels and channels: the maps sum "
        "to the image's estimate at the same seed. Writes OUT (a figure: images beside their maps per channel and "
        "summed, one colour bar) and the maps beside it (.npz, nats per dimension; .json summary). With --y, maps of "
        "-log p(x | y). The Gaussian reference's part is split in the spectrum's eigen-basis and assigned to pixels "
        "by the squared eigenvector entries (see itdiffusion.core.perdim).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common(p)
    p.add_argument("--out", required=True, help="figure (.png or .pdf); the maps go beside it (.npz, .json)")
    p.add_argument("--y", type=int, help="a class label for every image: maps of -log p(x | y) (conditional models)")
    p.add_argument("--rows", type=int, default=6, help="images shown in the figure (at most 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from .. import fileio as _io
    from ..reporting.infomaps import plot_maps
    from ._conditional import bits, check_free, outputs, setup

    paths = outputs(args.out, (".npz", ".json"))
    with check_free(paths.values(), args):  # held until every output is written
        if not 1 <= args.rows <= 8:
            raise ValueError(f"--rows must be between 1 and 8, got {args.rows}")
        s = setup(args)
        x = s.data.x.to(s.device)
        maps = s.model.nll_map(x, args.points, seed=args.seed, y=args.y, **s.options).cpu()
        d = s.data.d
        nll = maps.flatten(1).sum(1)
        bpd = bits(nll, d).numpy()
        kind = "continuous" if s.options["discrete"] is None else f"discrete bound ({args.rounding} rounding)"
        _io.save_npz_atomic(paths[".npz"], {"nll_map_nats": maps.numpy(), "nll_nats": nll.numpy(), "bpd": bpd})
        _io.save_json_atomic(paths[".json"], {
            "model": s.label, "data": args.data, "images": len(x), "points": args.points, "seed": args.seed,
            "estimate": kind, "y": args.y, "bpd_mean": float(bpd.mean()), "bpd": bpd.tolist(),
            "names": list(s.data.names) if s.data.names else None})
        rows = min(args.rows, len(x))
        titles = [f"{bpd[i]:.2f} bpd" for i in range(rows)]
        plot_maps(s.data.x[:rows].numpy(), bits(maps[:rows]).numpy(), paths[next(iter(paths))], unit="bits per dimension",
                  title=f"{s.label}: where the bits are ({kind}{'' if args.y is None else f', y = {args.y}'})",
                  row_titles=titles)
        print(f"{s.label} on {s.data.source}: {len(x)} images, mean {bpd.mean():.3f} bits/dim ({kind}); "
              f"maps sum to each image's estimate")
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
