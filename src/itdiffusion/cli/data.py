"""``itd data``: prepare image data sets (CIFAR-10 export, a summary of any ``--data``)."""

from __future__ import annotations

import argparse

DATA_HELP = ("a folder of PNG/JPEG images (with train/ and test/ sub-folders, the split's), a .npy array, "
             "a CIFAR-10 archive or folder, or a built-in set (digits)")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "data",
        help="prepare image data: export CIFAR-10 to PNG folders, summarise a data set",
        description="Prepare image data for the other commands.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = actions.add_parser(
        "cifar10",
        help="export the official cifar-10-python.tar.gz to train/ and test/ PNG folders",
        description="Read the official CIFAR-10 python archive (or its extracted cifar-10-batches-py folder) "
        "without torchvision and write OUT/train/CLASS_NNNNN.png and OUT/test/CLASS_NNNNN.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--from", dest="source", required=True, metavar="ARCHIVE",
                   help="cifar-10-python.tar.gz or the extracted folder")
    c.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    c.set_defaults(func=run_cifar10)
    i = actions.add_parser("info", help="summarise what a --data argument reads",
                           description="Load a data set as the other commands would and print its size, shape, "
                           "grid and classes.")
    i.add_argument("--data", required=True, help=DATA_HELP)
    i.add_argument("--split", default="train", choices=["train", "test"], help="which split")
    i.set_defaults(func=run_info)


def run_cifar10(args) -> int:
    from ..data.export import export_cifar10
    from ..guard import OutputLock, check_outputs

    check_outputs([args.out], [args.source])
    with OutputLock(args.out):
        counts = export_cifar10(args.source, args.out)
    print(f"wrote {counts['train']} training and {counts['test']} test images to {args.out}/train and {args.out}/test")
    return 0


def run_info(args) -> int:
    from ..data.images import describe, load_data

    data = load_data(args.data, args.split)
    print(describe(data))
    if data.classes and data.labels is not None:
        counts = data.labels.bincount(minlength=len(data.classes)).tolist()
        print("classes: " + ", ".join(f"{c} {n}" for c, n in zip(data.classes, counts)))
    return 0
