"""Labelled image folders: one sub-folder of images per class, the label from the sub-folder's name.

``FOLDER/3/a.png`` is an image of class ``"3"``.  Classes are the sub-folders' names, sorted.
The label a class-conditional network is given (:func:`network_labels`) is the name itself
when every name is a non-negative integer (``0/ ... 9/`` for digits), else the class's position
in the sorted names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .images import GRID_8BIT, ImageData, decode_images, from_uint8, list_images, sample_indices


def read_labelled_folder(folder, *, limit: int | None = None, seed: int = 0) -> ImageData:
    """Every PNG/JPEG under ``folder``'s class sub-folders, with ``labels`` indexing ``classes``.

    ``ValueError`` (one line) for a folder with no class sub-folders, or with images outside them.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (a labelled folder holds one sub-folder of images per class)")
    paths = list_images(folder)
    loose = [p for p in paths if p.parent == folder]
    if loose:
        raise ValueError(f"{folder}: {len(loose)} image(s) outside class sub-folders (e.g. {loose[0].name}); "
                         "a labelled folder holds one sub-folder of images per class")
    if not paths:
        raise ValueError(f"{folder}: no images in class sub-folders")
    classes = tuple(sorted({p.relative_to(folder).parts[0] for p in paths}))  # of every image, not only the drawn
    chosen = sample_indices(len(paths), limit, seed)
    if chosen is not None:
        paths = [paths[i] for i in chosen]
    names = tuple(p.relative_to(folder).as_posix() for p in paths)
    tops = [n.split("/", 1)[0] for n in names]
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[t] for t in tops], dtype=torch.long)
    return ImageData(x=from_uint8(decode_images(paths, names)), grid=GRID_8BIT, source=str(folder),
                     labels=labels, classes=classes, names=names)


def network_labels(classes) -> torch.Tensor:
    """The label given to the network for each class, ``(K,)`` int64 (see the module docstring)."""
    if classes and all(c.isdigit() for c in classes):
        return torch.tensor([int(c) for c in classes], dtype=torch.long)
    return torch.arange(len(classes), dtype=torch.long)


def write_labelled_folder(x: torch.Tensor, labels, folder, classes=None) -> None:
    """Write images ``x`` ``(n, C, H, W)`` in ``[-1, 1]`` as 8-bit PNGs ``folder/CLASS/INDEX.png``."""
    from PIL import Image

    from ..fileio import write_atomic
    from .images import to_uint8
    import io

    folder = Path(folder)
    pixels = to_uint8(x)
    for i, (img, label) in enumerate(zip(pixels, torch.as_tensor(labels).tolist())):
        name = str(label) if classes is None else classes[label]
        (folder / name).mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
        write_atomic(folder / name / f"{i:05d}.png", lambda fh, data=buf.getvalue(): fh.write(data))
