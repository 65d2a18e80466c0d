"""Image data for the pipeline: folders of PNG/JPEG files, CIFAR-10, ``.npy`` arrays, built-in sets.

Every reader returns an :class:`ImageData`: ``x`` of shape ``(n, C, H, W)``, float32 in
``[-1, 1]``, on the grid of its source (256 levels for 8-bit images, 17 for ``digits``).
Grey-scale images stay one channel.  :func:`load_data` turns the ``--data`` argument of
every command into one:

* ``digits``: the built-in set (:mod:`itdiffusion.data.toy`), its ``train`` or ``test`` split;
* a folder of images, searched recursively (``.png``, ``.jpg``, ``.jpeg``); a folder with
  ``train/`` and ``test/`` sub-folders (as ``itd data cifar10`` writes) gives the split's
  sub-folder.  When every file name has a prefix before ``_`` (``cat_00042.png``), that
  prefix is the class label;
* the official ``cifar-10-python.tar.gz``, or its extracted ``cifar-10-batches-py``
  folder (no torchvision needed);
* a ``.npy`` array ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, H, W)``: ``uint8`` values
  0..255, or floats already in ``[-1, 1]``.

Unreadable or corrupt files are reported by name, all of them in one error.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..core.grid import DiscreteGrid

GRID_8BIT = DiscreteGrid(-1.0, 1.0, 256)
"""8-bit images scaled to [-1, 1]: ``x = -1 + 2 k / 255``."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
BUILTIN_SETS = ("digits",)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_SHOW = 5  # file names shown in one error message
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # PIL modes with more than 8 bits per sample


@dataclass(frozen=True, eq=False)
class ImageData:
    """Images ready for the models.

    Attributes:
        x: ``(n, C, H, W)`` float32 in ``[-1, 1]`` (CPU).
        grid: the values every pixel takes (``None`` for continuous data).
        source: where the images came from (for messages and results).
        labels: ``(n,)`` int64 class indices, or ``None``.
        classes: class names, indexed by ``labels``.
        names: one identifier per image (file name), or ``None``.
    """

    x: torch.Tensor
    grid: DiscreteGrid | None
    source: str
    labels: torch.Tensor | None = None
    classes: tuple[str, ...] = ()
    names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise ValueError(f"{self.source}: images must be a float32 (n, C, H, W) tensor, got "
                             f"{self.x.dtype} {tuple(self.x.shape)}")
        if len(self.x) == 0:
            raise ValueError(f"{self.source}: no images")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        return tuple(self.x.shape[1:])

    @property
    def d(self) -> int:
        """Dimensions per image, ``C * H * W``."""
        return int(np.prod(self.shape))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageData":
        """The images at ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        names = None if self.names is None else tuple(self.names[i] for i in idx.tolist())
        labels = None if self.labels is None else self.labels[idx]
        return replace(self, x=self.x[idx], labels=labels, names=names)

    def sample(self, n: int | None, seed: int = 0) -> "ImageData":
        """``n`` images drawn without replacement by ``seed``, kept in their original order.

        ``None``, or ``n >= len(self)``, returns every image.
        """
        indices = sample_indices(len(self), n, seed)
        return self if indices is None else self.subset(indices)

    def fingerprint(self) -> str:
        """SHA-256 of the pixel values and the grid (to check that a resumed job sees the same data)."""
        digest = hashlib.sha256(self.x.numpy().tobytes())
        digest.update(repr((tuple(self.x.shape), self.grid)).encode())
        return digest.hexdigest()


def sample_indices(total: int, n: int | None, seed: int = 0) -> np.ndarray | None:
    """Sorted indices of ``n`` of ``total`` items drawn by ``seed`` (``None``: take all)."""
    if n is None or n >= total:
        return None
    if n < 1:
        raise ValueError(f"the number of images to use must be positive, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1A6E5]))
    return np.sort(rng.choice(total, size=int(n), replace=False))


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """``(n, C, H, W)`` 8-bit values to float32 in ``[-1, 1]`` on :data:`GRID_8BIT`."""
    return GRID_8BIT.value(torch.from_numpy(np.ascontiguousarray(pixels)).double()).float()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`from_uint8` (values are rounded to the nearest level)."""
    return GRID_8BIT.round_index(x.double()).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- entry point
def load_data(spec: str, split: str = "train", *, limit: int | None = None, seed: int = 0) -> ImageData:
    """The images named by a command's ``--data`` argument (see the module docstring).

    Args:
        spec: a built-in set name, a folder, a CIFAR-10 archive or folder, or a ``.npy`` file.
        split: ``"train"`` or ``"test"``: which part of a built-in set, of a CIFAR-10
            archive, or of a folder with ``train/`` and ``test/`` sub-folders.
        limit: use only this many images, drawn by ``seed`` (see :meth:`ImageData.sample`);
            only those files are decoded.

    Raises:
        ValueError: unknown name, missing path, unreadable files (all named).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not str(spec).strip():
        raise ValueError("--data is empty (an unset shell variable?); name a folder, a file or a built-in set")
    if spec in BUILTIN_SETS:
        return _builtin(spec, split).sample(limit, seed)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"{spec}: no such file or folder, and not a built-in set ({', '.join(BUILTIN_SETS)})")
    if not (path.is_file() or path.is_dir()):
        raise ValueError(f"{spec}: not a regular file or a folder (a FIFO, socket or device); give a file or folder")
    if path.is_file():
        if path.suffix.lower() == ".npy":
            return read_npy(path).sample(limit, seed)
        if _is_archive(path):
            return read_cifar10(path, split).sample(limit, seed)
        raise ValueError(f"{path}: expected a folder, a .npy file or a CIFAR-10 .tar.gz archive")
    if _is_cifar_folder(path):
        return read_cifar10(path, split).sample(limit, seed)
    if (path / "train").is_dir() and (path / "test").is_dir():
        path = path / split
    return read_image_folder(path, limit=limit, seed=seed)


def describe(data: ImageData) -> str:
    """One line: count, shape, grid and classes."""
    grid = "continuous" if data.grid is None else f"{data.grid.levels} levels on [{data.grid.lo:g}, {data.grid.hi:g}]"
    classes = f", {len(data.classes)} classes" if data.classes else ""
    return f"{data.source}: {len(data)} images of shape {data.shape}, {grid}{classes}"


def _builtin(name: str, split: str) -> ImageData:
    from .toy import load_dataset

    ds = load_dataset(name)
    x = ds.train if split == "train" else ds.test
    return ImageData(x=x.float().contiguous(), grid=DiscreteGrid(*ds.grid), source=f"{name} ({split})")


# ----------------------------------------------------------------------------- folders
def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted by relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    odd = [p for p in found if not p.is_file()]  # regular files only (a dangling link is not one)
    if odd:  # a FIFO or a device would block the decoder forever
        raise ValueError(f"{len(odd)} image name(s) that are not regular files: "
                         f"{', '.join(p.relative_to(folder).as_posix() for p in odd[:_SHOW])}")
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())



def read_image_folder(folder, *, limit: int | None = None, seed: int = 0) -> ImageData:
    """Every PNG/JPEG under ``folder`` as 8-bit images on :data:`GRID_8BIT`.

    All images must share their size and channel count (grey ``L`` images give one
    channel, colour ones three; alpha is dropped).  Labels come from the file-name
    prefix before ``_`` when every file has one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"{folder}: no {'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} images found")
    chosen = sample_indices(len(paths), limit, seed)
    if chosen is not None:
        paths = [paths[i] for i in chosen]
    names = tuple(p.relative_to(folder).as_posix() for p in paths)
    pixels = decode_images(paths, names)
    labels, classes = _labels_from_names([p.stem for p in paths])
    return ImageData(x=from_uint8(pixels), grid=GRID_8BIT, source=str(folder), labels=labels, classes=classes,
                     names=names)


def decode_images(paths: Sequence[Path], names: Sequence[str]) -> np.ndarray:
    """Decode image files to a ``(n, C, H, W)`` uint8 array; every bad file is named in one error."""
    from PIL import Image

    arrays, bad = [], []
    for path, name in zip(paths, names):
        try:
            with Image.open(path) as img:
                arrays.append(_pixels(img))
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
            bad.append(f"{name} ({_short(err)})")
    if bad:
        more = f" and {len(bad) - _SHOW} more" if len(bad) > _SHOW else ""
        raise ValueError(f"{len(bad)} unreadable image file(s): {'; '.join(bad[:_SHOW])}{more}")
    shapes = {}
    for array, name in zip(arrays, names):
        shapes.setdefault(array.shape, name)
    if len(shapes) > 1:
        listed = ", ".join(f"{name} is {s[0]}x{s[1]}x{s[2]} (CxHxW)" for s, name in list(shapes.items())[:3])
        raise ValueError(f"images differ in size or channels: {listed}")
    return np.stack(arrays)


def check_8bit(img) -> None:
    """Refuse an image with more than 8 bits per sample: PIL reads 16-bit colour or grey+alpha
    PNGs as 8-bit modes, dropping the low byte without a word, so the PNG header is read here."""
    if img.mode in WIDE_MODES:
        raise ValueError(f"{img.mode} pixels are not 8-bit; only 8-bit images are supported")
    if img.format == "PNG":
        img.fp.seek(0)
        header = img.fp.read(25)  # signature (8), IHDR length and type (8), width, height (8), bit depth (1)
        if len(header) == 25 and header[12:16] == b"IHDR" and header[24] > 8:
            raise ValueError(f"{header[24]}-bit PNG; only 8-bit images are supported (save it with 8 bits per "
                             "channel)")


def _pixels(img) -> np.ndarray:
    """One PIL image as ``(C, H, W)`` uint8: grey stays one channel, alpha and palettes are dropped."""
    check_8bit(img)
    if img.mode in ("1", "L", "LA"):
        img = img.convert("L")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def _short(err: BaseException) -> str:
    return " ".join((str(err) or type(err).__name__).split())[:120]


def _labels_from_names(stems: Sequence[str]) -> tuple[torch.Tensor | None, tuple[str, ...]]:
    if not stems or not all("_" in s and s.split("_", 1)[0] for s in stems):
        return None, ()
    prefixes = [s.split("_", 1)[0] for s in stems]
    classes = tuple(sorted(set(prefixes)))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[p] for p in prefixes], dtype=torch.long), classes


# ----------------------------------------------------------------------------- .npy
def read_npy(path) -> ImageData:
    """Images from a ``.npy`` array (never unpickled: ``allow_pickle=False``).

    ``uint8`` arrays (or integer arrays in 0..255) are 8-bit images; float arrays must
    already lie in ``[-1, 1]``: on the 8-bit grid, on the 17-level ``digits`` grid, or
    else they are treated as continuous data (no grid).
    """
    from .. import fileio as _io

    path = Path(path)
    array = _as_nchw(_io.load_npy(path), path)
    if array.size == 0:
        raise ValueError(f"{path}: no images (the array has shape {array.shape})")
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"{path}: integer images must lie in 0..255, found {array.min()}..{array.max()}")
        return ImageData(x=from_uint8(array.astype(np.uint8)), grid=GRID_8BIT, source=str(path))
    if array.dtype.kind != "f":
        raise ValueError(f"{path}: expected uint8 or float images, got dtype {array.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{path}: contains NaN or Inf")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{path}: float images must be scaled to [-1, 1], found values in [{lo:.4g}, {hi:.4g}]")
    grid = _infer_grid(x)
    if grid is not None:
        x = grid.round(x.double()).float()  # exactly on the grid
    return ImageData(x=x, grid=grid, source=str(path))


def _as_nchw(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4:
        if array.shape[1] not in (1, 3) and array.shape[3] in (1, 3):
            return array.transpose(0, 3, 1, 2)
        if array.shape[1] in (1, 3):
            return array
    raise ValueError(f"{path}: expected images of shape (N, C, H, W), (N, H, W, C) or (N, H, W) with C = 1 or 3, "
                     f"got {array.shape}")


def _infer_grid(x: torch.Tensor) -> DiscreteGrid | None:
    from .toy import DIGITS_GRID

    for grid in (GRID_8BIT, DiscreteGrid(*DIGITS_GRID)):
        k = grid.index(x.double())
        if float((k - k.round()).abs().max()) <= 1e-3:
            return grid
    return None


# ----------------------------------------------------------------------------- CIFAR-10
class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for the official CIFAR-10 batches, which are Python 2 pickles.

    It resolves only the three globals that a pickled numpy array needs (its
    reconstruction function, ``numpy.ndarray`` and ``numpy.dtype``); every other global
    is refused, so a forged file cannot import or call anything else.  Dicts, lists,
    strings, bytes and ints need no globals.
    """

    _RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array reconstruction function
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed") from None


def unpickle_cifar_batch(data: bytes, name: str) -> dict:
    """Decode one CIFAR-10 batch file with :class:`_CifarUnpickler` (restricted: see there).

    Returns a dict with ``str`` keys; raises ``ValueError`` naming ``name`` for anything
    that is not a well-formed batch.
    """
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:  # a forged or damaged file can fail in many ways; name it
        raise ValueError(f"{name}: not a CIFAR-10 batch ({_short(err)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: not a CIFAR-10 batch (top level is {type(obj).__name__})")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _check_batch(batch: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{name}: 'data' must be a uint8 array of shape (n, 3072)")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(
            isinstance(v, int) and 0 <= v < 10 for v in labels):
        raise ValueError(f"{name}: 'labels' must be {len(data)} integers in 0..9")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith((".tar.gz", ".tgz", ".tar"))


def _is_cifar_folder(path: Path) -> bool:
    return (path / "test_batch").is_file() or (path / CIFAR10_FOLDER / "test_batch").is_file()


def _read_members(source: Path, wanted: Iterable[str]) -> dict[str, bytes]:
    """The named files of a CIFAR-10 archive or folder, read into memory (nothing is extracted)."""
    wanted = set(wanted)
    found: dict[str, bytes] = {}
    if not source.exists():
        raise ValueError(f"{source}: no such file or folder")
    if source.is_dir():
        folder = source / CIFAR10_FOLDER if (source / CIFAR10_FOLDER).is_dir() else source
        found = {n: (folder / n).read_bytes() for n in wanted if (folder / n).is_file()}
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in wanted and base not in found:
                        found[base] = tar.extractfile(member).read()
        except tarfile.ReadError:
            raise ValueError(f"{source}: not a tar archive (expected cifar-10-python.tar.gz or its folder)") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{source}: unreadable archive ({_short(err)})") from None
    return found


def read_cifar10(source, split: str = "train") -> ImageData:
    """CIFAR-10 from the official ``cifar-10-python.tar.gz`` or its extracted folder.

    ``train``: the 50,000 images of ``data_batch_1..5``; ``test``: the 10,000 of
    ``test_batch``, in the files' order; labels and class names (``batches.meta``)
    included.  The batch files are pickles, decoded by a restricted unpickler that
    accepts only plain containers and numpy arrays (:class:`_CifarUnpickler`).
    """
    pixels, labels, classes = cifar10_pixels(source, split)
    return ImageData(x=from_uint8(pixels), grid=GRID_8BIT, source=f"{source} ({split})", labels=labels,
                     classes=classes)


def cifar10_pixels(source, split: str = "train") -> tuple[np.ndarray, torch.Tensor, tuple[str, ...]]:
    """The ``(n, 3, 32, 32)`` uint8 pixels, labels and class names of :func:`read_cifar10`."""
    source = Path(source)
    names = CIFAR10_BATCHES[split]
    members = _read_members(source, (*names, "batches.meta"))
    missing = [n for n in names if n not in members]
    if missing:
        raise ValueError(f"{source}: not a CIFAR-10 python archive or folder (missing {', '.join(missing)})")
    parts = [_check_batch(unpickle_cifar_batch(members[n], n), n) for n in names]
    pixels = np.concatenate([p[0] for p in parts])
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    classes = CIFAR10_CLASSES
    if "batches.meta" in members:
        meta = unpickle_cifar_batch(members["batches.meta"], "batches.meta")
        given = meta.get("label_names")
        if isinstance(given, list) and len(given) == 10:
            classes = tuple(v.decode("latin1") if isinstance(v, bytes) else str(v) for v in given)
    return pixels, labels, classes
