"""Writing image data sets to disk: 8-bit images as PNG folders, CIFAR-10 as ``train/`` and ``test/`` folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..fileio import current_umask
from .images import GRID_8BIT, SPLITS, ImageData, read_cifar10, to_uint8


def export_folder(data: ImageData, folder: Path) -> None:
    """Write 8-bit ``data`` as PNG files ``{class}_{index:05d}.png`` (or ``{index:05d}.png``) into ``folder``."""
    from PIL import Image

    if data.grid != GRID_8BIT:
        raise ValueError(f"{data.source}: only 8-bit images can be written as PNG")
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(data.x)
    width = max(5, len(str(len(data) - 1)))
    for i, image in enumerate(pixels):
        prefix = f"{data.classes[int(data.labels[i])]}_" if data.labels is not None else ""
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{prefix}{i:0{width}d}.png")


def export_cifar10(source, out) -> dict[str, int]:
    """Write CIFAR-10 as ``out/train/*.png`` and ``out/test/*.png``; returns the counts.

    Both splits are read and checked first; the files are written into a temporary
    folder beside ``out`` that is renamed into place at the end, so a failure leaves
    nothing behind.  ``out`` must not exist or be empty.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder")
    splits = {split: read_cifar10(source, split) for split in SPLITS}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for split, data in splits.items():
            export_folder(data, tmp / split)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folder is private (0700)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {split: len(data) for split, data in splits.items()}
