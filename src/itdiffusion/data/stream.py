"""Images read on demand: folders, ``.npy`` files (memory-mapped) and CIFAR-10, streamed in chunks.

:func:`open_images` takes the same ``--data`` argument as :func:`~itdiffusion.data.images.load_data`
and returns an :class:`ImageSource`: its length, shape, grid and labels are known at once, its
pixels are decoded only when asked for (``source[i]``, ``source[indices]``, :meth:`ImageSource.chunks`).
Memory is bounded by one chunk, whatever the size of the data set:

* a folder keeps its file names and decodes the files a chunk asks for;
* a ``.npy`` file is memory-mapped (``allow_pickle=False``); a float array is checked (finite,
  within ``[-1, 1]``, its grid) in one chunked pass when opened;
* CIFAR-10 keeps its pixels as ``uint8`` (a quarter of the float32 size: 150 MB for the training
  split) and converts a chunk at a time;
* built-in sets are small and stay in memory.

An :class:`ImageSource` is a map-style ``torch.utils.data.Dataset`` (``source[i]`` is one image
``(C, H, W)``), so a ``DataLoader`` with workers and pinned memory can read it.
:meth:`ImageSource.load` gives the in-memory :class:`~itdiffusion.data.images.ImageData` with the
same values, and :meth:`ImageSource.fingerprint` equals ``ImageData.fingerprint``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..core.grid import DiscreteGrid
from . import images as _img

CHUNK = 1024  # images decoded at a time by the checks of a float .npy file


class ImageSource(torch.utils.data.Dataset):
    """``n`` images of one shape, decoded on demand.

    Args:
        read: ``read(indices)`` -> ``(k, C, H, W)`` float32 in ``[-1, 1]`` for an int64 array of
            indices (sorted or not).
        n, shape, grid, source: the count, ``(C, H, W)``, the data grid (``None``: continuous)
            and a description (a path).
        labels, classes, names: as in :class:`~itdiffusion.data.images.ImageData`.
        index: ``(n,)`` each image's index in the array or archive it was taken from
            (``None``: ``0 .. n-1``); a subset keeps the original indices.
    """

    def __init__(self, read: Callable[[np.ndarray], torch.Tensor], n: int, shape: tuple[int, int, int],
                 grid: DiscreteGrid | None, source: str, labels: torch.Tensor | None = None,
                 classes: tuple[str, ...] = (), names: tuple[str, ...] | None = None,
                 index: np.ndarray | None = None):
        self._read, self.n, self.shape, self.grid, self.source = read, int(n), tuple(shape), grid, source
        self.labels, self.classes, self.names = labels, classes, names
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    def ids(self) -> list[str]:
        """Each image's identity: its file path relative to the data root, else its index in the
        array, archive or built-in split it comes from (as text)."""
        if self.names is not None:
            return list(self.names)
        return [str(int(i)) for i in (np.arange(self.n) if self.index is None else self.index)]

    def __len__(self) -> int:
        return self.n

    @property
    def d(self) -> int:
        """Dimensions per image."""
        return int(np.prod(self.shape))

    def __getitem__(self, index) -> torch.Tensor:
        """One image ``(C, H, W)`` for an int; ``(k, C, H, W)`` for a slice, an index tensor or array."""
        if isinstance(index, (int, np.integer)):
            return self._read(np.array([self._check(int(index))]))[0]
        if isinstance(index, slice):
            return self._read(np.arange(self.n)[index])
        indices = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < -self.n or indices.max() >= self.n):
            raise IndexError(f"image index out of range for {self.n} images")
        return self._read(indices % max(self.n, 1))

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Batched reading for ``DataLoader`` (one decode call per batch)."""
        return list(self[np.asarray(indices, dtype=np.int64)])

    def _check(self, i: int) -> int:
        if not -self.n <= i < self.n:
            raise IndexError(f"image index {i} out of range for {self.n} images")
        return i % self.n

    def chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Images ``start .. stop - 1`` in order, ``size`` at a time (the last chunk may be shorter)."""
        stop = self.n if stop is None else min(stop, self.n)
        for lo in range(start, stop, size):
            yield self._read(np.arange(lo, min(lo + size, stop)))

    def load(self) -> "_img.ImageData":
        """Every image in memory, as the readers of :mod:`itdiffusion.data.images` return them."""
        x = torch.cat(list(self.chunks(4096))) if self.n else torch.empty(0, *self.shape)
        return _img.ImageData(x=x, grid=self.grid, source=self.source, labels=self.labels, classes=self.classes,
                              names=self.names)

    def fingerprint(self, size: int = 4096) -> str:
        """SHA-256 of the pixel values and the grid, read in chunks; equal to ``ImageData.fingerprint``."""
        digest = hashlib.sha256()
        for x in self.chunks(size):
            digest.update(x.contiguous().numpy().tobytes())
        digest.update(repr(((self.n, *self.shape), self.grid)).encode())
        return digest.hexdigest()

    def subset(self, indices: np.ndarray) -> "ImageSource":
        """The images at sorted ``indices`` (int64), still read on demand."""
        indices = np.asarray(indices, dtype=np.int64)
        pick = lambda v: None if v is None else v[torch.as_tensor(indices)]  # noqa: E731
        names = None if self.names is None else tuple(self.names[i] for i in indices)
        index = indices if self.index is None else self.index[indices]
        return ImageSource(lambda i: self._read(indices[i]), len(indices), self.shape, self.grid, self.source,
                           pick(self.labels), self.classes, names, index)

    def sample(self, n: int | None, seed: int = 0) -> "ImageSource":
        """``n`` images drawn by ``seed`` exactly as :meth:`ImageData.sample` draws them."""
        indices = _img.sample_indices(self.n, n, seed)
        return self if indices is None else self.subset(indices)


class _IndexedReads(torch.utils.data.Dataset):
    """Item ``k``: the rows ``index_lists[k]`` of a source (anything indexed by an index array), in one call."""

    def __init__(self, source: ImageSource, index_lists: Sequence[np.ndarray]):
        self.source, self.index_lists = source, index_lists

    def __len__(self) -> int:
        return len(self.index_lists)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.source[np.asarray(self.index_lists[k], dtype=np.int64)]


def read_ahead(source, index_lists: Sequence[np.ndarray], *, workers: int = 0,
               pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """The rows ``index_lists[k]`` of ``source`` for k = 0, 1, ... in order.

    With ``workers > 0`` a ``DataLoader`` decodes them in that many worker processes, ahead of
    use (two chunks per worker); ``pin_memory`` pins each chunk for a fast copy to a GPU.  The
    values are the same whatever ``workers`` is.
    """
    if workers <= 0 and not pin_memory:
        for indices in index_lists:
            yield source[np.asarray(indices, dtype=np.int64)]
        return
    loader = torch.utils.data.DataLoader(_IndexedReads(source, index_lists), batch_size=None, shuffle=False,
                                         num_workers=max(0, int(workers)), pin_memory=pin_memory,
                                         prefetch_factor=2 if workers > 0 else None)
    yield from loader


class Chunks:
    """Images ``start .. stop - 1`` of a source, ``size`` at a time: iterable again and again,
    each pass decoding afresh (in ``workers`` processes when > 0, see :func:`read_ahead`);
    ``n_images`` without decoding anything."""

    def __init__(self, source: ImageSource, size: int, start: int = 0, stop: int | None = None, *,
                 workers: int = 0, pin_memory: bool = False):
        self.source, self.size, self.start = source, int(size), int(start)
        self.stop = len(source) if stop is None else min(int(stop), len(source))
        self.workers, self.pin_memory = int(workers), bool(pin_memory)

    @property
    def n_images(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.workers <= 0 and not self.pin_memory:
            return self.source.chunks(self.size, self.start, self.stop)
        starts = range(self.start, self.stop, self.size)
        return read_ahead(self.source, [np.arange(lo, min(lo + self.size, self.stop)) for lo in starts],
                          workers=self.workers, pin_memory=self.pin_memory)


def from_data(data: "_img.ImageData") -> ImageSource:
    """An in-memory data set seen as a source (chunks are views, nothing is copied)."""
    x = data.x
    return ImageSource(lambda i: x[torch.as_tensor(i)], len(x), data.shape, data.grid, data.source, data.labels,
                       data.classes, data.names)


# ----------------------------------------------------------------------------- entry point
def open_images(spec: str, split: str = "train", *, limit: int | None = None, seed: int = 0) -> ImageSource:
    """The images named by ``--data`` (see :func:`~itdiffusion.data.images.load_data`), read on demand.

    ``open_images(...).load()`` equals ``load_data(...)`` value for value, for the same arguments.
    """
    if split not in _img.SPLITS:
        raise ValueError(f"split must be one of {_img.SPLITS}, got {split!r}")
    if spec in _img.BUILTIN_SETS:  # the same draw as load_data's, keeping each image's index in the split
        return from_data(_img.load_data(spec, split)).sample(limit, seed)
    if not spec:
        return from_data(_img.load_data(spec, split, limit=limit, seed=seed))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".npy":
        return open_npy(path).sample(limit, seed)
    if path.is_dir() and not _img._is_cifar_folder(path):
        folder = path / split if (path / "train").is_dir() and (path / "test").is_dir() else path
        return open_folder(folder).sample(limit, seed)
    if path.exists() and (path.is_dir() or _img._is_archive(path)):  # CIFAR-10: uint8 in memory
        pixels, labels, classes = _img.cifar10_pixels(path, split)
        return ImageSource(lambda i: _img.from_uint8(pixels[i]), len(pixels), pixels.shape[1:], _img.GRID_8BIT,
                           f"{path} ({split})", labels, classes).sample(limit, seed)
    return from_data(_img.load_data(spec, split, limit=limit, seed=seed))  # its own error message


# ----------------------------------------------------------------------------- folders
def open_folder(folder) -> ImageSource:
    """Every PNG/JPEG under ``folder`` (as :func:`~itdiffusion.data.images.read_image_folder`), decoded
    a chunk at a time; the first image gives the shape, and any other size is an error naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    paths = _img.list_images(folder)
    if not paths:
        raise ValueError(f"{folder}: no {'/'.join(s.lstrip('.') for s in _img.IMAGE_SUFFIXES)} images found")
    names = tuple(p.relative_to(folder).as_posix() for p in paths)
    shape = _check_headers(paths, names)
    labels, classes = _img._labels_from_names([p.stem for p in paths])

    def read(indices: np.ndarray) -> torch.Tensor:
        if not len(indices):
            return torch.empty(0, *shape)
        pixels = _img.decode_images([paths[i] for i in indices], [names[i] for i in indices])
        if pixels.shape[1:] != shape:
            raise ValueError(f"images differ in size or channels: {names[0]} is {'x'.join(map(str, shape))} "
                             f"(CxHxW), {names[indices[0]]} is {'x'.join(map(str, pixels.shape[1:]))}")
        return _img.from_uint8(pixels)

    return ImageSource(read, len(paths), shape, _img.GRID_8BIT, str(folder), labels, classes, names)


def _check_headers(paths: Sequence[Path], names: Sequence[str]) -> tuple[int, int, int]:
    """The common ``(C, H, W)`` of the files, from their headers only (no pixels decoded); every
    unreadable file, and any size or channel mismatch, named in one error as the decoder names them."""
    from PIL import Image

    shapes, bad = {}, []
    for path, name in zip(paths, names):
        try:
            with Image.open(path) as img:
                _img.check_8bit(img)
                shapes.setdefault((1 if img.mode in ("1", "L", "LA") else 3, img.height, img.width), name)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
            bad.append(f"{name} ({_img._short(err)})")
    if bad:
        more = f" and {len(bad) - _img._SHOW} more" if len(bad) > _img._SHOW else ""
        raise ValueError(f"{len(bad)} unreadable image file(s): {'; '.join(bad[:_img._SHOW])}{more}")
    if len(shapes) > 1:
        listed = ", ".join(f"{name} is {s[0]}x{s[1]}x{s[2]} (CxHxW)" for s, name in list(shapes.items())[:3])
        raise ValueError(f"images differ in size or channels: {listed}")
    return next(iter(shapes))


# ----------------------------------------------------------------------------- .npy
def open_npy(path) -> ImageSource:
    """A ``.npy`` array memory-mapped (never unpickled), with the value rules of
    :func:`~itdiffusion.data.images.read_npy`; float arrays are checked in one chunked pass."""
    from ..fileio import check_regular

    path = Path(path)
    check_regular(path)
    try:
        raw = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # noqa: BLE001  (numpy raises many kinds for a damaged header)
        raise ValueError(f"{path}: not a readable .npy array ({_img._short(err)})") from None
    if not isinstance(raw, np.ndarray):  # np.load reads a zip (.npz) whatever the file is called
        if hasattr(raw, "close"):
            raw.close()
        raise ValueError(f"{path}: not a .npy array (it is a zip archive, as .npz files are)")
    array = _img._as_nchw(raw, path)
    if array.size == 0:
        raise ValueError(f"{path}: no images (the array has shape {array.shape})")
    shape = tuple(int(s) for s in array.shape[1:])
    if array.dtype.kind in "iu":
        lo, hi = _range(array)
        if lo < 0 or hi > 255:
            raise ValueError(f"{path}: integer images must lie in 0..255, found {lo}..{hi}")
        read = lambda i: _img.from_uint8(np.asarray(array[np.sort(i)], dtype=np.uint8)[_unsort(i)])  # noqa: E731
        return ImageSource(read, len(array), shape, _img.GRID_8BIT, str(path))
    if array.dtype.kind != "f":
        raise ValueError(f"{path}: expected uint8 or float images, got dtype {array.dtype}")
    grid = _check_floats(array, path)

    def read(indices: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(array[np.sort(indices)], dtype=np.float32)[_unsort(indices)])
        return x if grid is None else grid.round(x.double()).float()

    return ImageSource(read, len(array), shape, grid, str(path))


def _unsort(indices: np.ndarray) -> np.ndarray:
    """Positions that put rows read in sorted order back in the order of ``indices``."""
    return np.argsort(np.argsort(indices, kind="stable"), kind="stable")


def _range(array: np.ndarray) -> tuple:
    lo = hi = None
    for i in range(0, len(array), CHUNK):
        part = np.asarray(array[i : i + CHUNK])
        lo = part.min() if lo is None else min(lo, part.min())
        hi = part.max() if hi is None else max(hi, part.max())
    return lo, hi


def _check_floats(array: np.ndarray, path: Path) -> DiscreteGrid | None:
    """Finite, within ``[-1, 1]``; the grid every value lies on (8-bit, digits) or ``None``."""
    from .toy import DIGITS_GRID

    grids = [_img.GRID_8BIT, DiscreteGrid(*DIGITS_GRID)]
    lo, hi = np.inf, -np.inf
    for i in range(0, len(array), CHUNK):
        x = torch.from_numpy(np.array(array[i : i + CHUNK], dtype=np.float32))
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{path}: contains NaN or Inf")
        lo, hi = min(lo, x.min().item()), max(hi, x.max().item())
        grids = [g for g in grids if float((g.index(x.double()) - g.index(x.double()).round()).abs().max()) <= 1e-3]
    if lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{path}: float images must be scaled to [-1, 1], found values in [{lo:.4g}, {hi:.4g}]")
    return grids[0] if grids else None
