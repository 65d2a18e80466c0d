"""Atomic, pickle-free file helpers shared by the whole package."""

from __future__ import annotations

import io
import json
import math
import os
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np


def write_atomic(path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it into place.

    A crash leaves either the old file or the new one, never half of one.  The file gets the
    mode of the file it replaces, or for a new file the mode ``open`` would give it (``0o666``
    less the umask), not the temporary file's private ``0o600``.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a file path")
    folder = path.parent
    if folder and not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


JSON_LIMIT = 256 * 2**20  # bytes: a larger JSON file is not one this package wrote


def check_regular(path) -> Path:
    """``path`` if it is a regular file (following links); ``ValueError`` naming it otherwise, so
    a FIFO, a device or a folder never blocks or floods a reader."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a directory; expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a pipe, socket or device); refusing to read it")
    return path


def read_bytes(path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (``ValueError`` beyond)."""
    path = check_regular(path)
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes; not a file this reader accepts")
    return data


def remove_stale_temps(path) -> int:
    """Delete the temporary files that :func:`write_atomic` left beside ``path`` when a process
    writing it was killed (``.NAME.*.tmp``); returns how many were removed.

    Call it only where no other process can be writing ``path`` at the same time (a
    command that owns its output, before it starts writing).
    """
    path = Path(path)
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return 0
    removed = 0
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp") and len(name) > len(prefix) + len(".tmp"):
            try:
                os.unlink(path.parent / name)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def save_npz_atomic(path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` (uncompressed, no object arrays) written atomically."""
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"array {key!r} has dtype object; refusing to pickle it")
    write_atomic(path, lambda fh: np.savez(fh, **arrays))


def save_json_atomic(path, obj) -> None:
    """Pretty JSON written atomically (NaN and Inf are written as JSON null)."""
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n"
    write_atomic(path, lambda fh: fh.write(text.encode()))


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data by more than ~1032:1


def load_npz(path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file into memory, refusing pickled objects.

    Raises ``ValueError`` with the file name for a missing, truncated, corrupt,
    forged or pickle-bearing file.  Every member's header is checked before its data
    is allocated: an array may not declare more bytes than its member holds, so a
    forged shape cannot ask for terabytes.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected an .npz file")
    check_regular(path)
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic[:4] not in _ZIP_MAGIC:
        if magic.startswith(b"\x93NUMPY"):
            what = "a single .npy array, not an .npz archive"
        elif magic[:1] == b"\x80":
            what = "a pickle; refusing to load it"
        else:
            what = "not an .npz (zip) archive; truncated or corrupt"
        raise ValueError(f"{path}: {what}")
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_npz_members(archive, path.stat().st_size)
    except _Refused as err:
        raise ValueError(f"{path}: {err}") from None
    except Exception as err:  # anything a damaged archive can raise (zipfile, zlib, numpy's header parser)
        raise ValueError(f"{path}: truncated or corrupt .npz file ({type(err).__name__}: {err})") from None


class _Refused(Exception):
    """A member that is readable but not acceptable (pickles, forged sizes)."""


def _read_npz_members(archive: zipfile.ZipFile, archive_size: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    fmt = np.lib.format
    for info in archive.infolist():
        name = info.filename
        if not name.endswith(".npy"):
            raise _Refused(f"unexpected member {name!r} (an .npz holds only .npy arrays)")
        key = name[: -len(".npy")]
        if key in arrays:
            raise _Refused(f"member {name!r} appears twice")
        if info.compress_type == zipfile.ZIP_STORED:
            limit = info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            limit = _DEFLATE_MAX_RATIO * info.compress_size + 1024
        else:
            raise _Refused(f"member {name!r} uses an unsupported compression method ({info.compress_type})")
        if info.compress_size > archive_size or info.file_size > limit:
            raise _Refused(f"member {name!r} declares {info.file_size} bytes, more than the archive can hold")
        with archive.open(info) as member:
            _check_npy_header(member, info.file_size, f"member {name!r}")
        with archive.open(info) as member:
            arrays[key] = fmt.read_array(member, allow_pickle=False)
    return arrays


def _check_npy_header(fh, size: int, what: str) -> None:
    """Read an ``.npy`` header from ``fh`` and refuse pickles and arrays bigger than ``size`` bytes."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(fh)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = fmt.read_array_header_2_0(fh)
    else:
        raise _Refused(f"{what}: unsupported .npy version {version}")
    header_size = fh.tell()
    if dtype.hasobject:
        raise _Refused(f"{what} contains pickled objects; refusing to load it")
    declared = math.prod(shape) * dtype.itemsize
    if header_size + declared > size:
        raise _Refused(
            f"{what} declares shape {shape} of {dtype} ({declared} bytes) but holds "
            f"{max(size - header_size, 0)} bytes; truncated or forged"
        )


def load_npy(path) -> np.ndarray:
    """Read a single ``.npy`` array, refusing pickled objects.

    Raises ``ValueError`` with the file name for a missing, truncated, corrupt, forged or
    pickle-bearing file.  The header is checked before the data is allocated: the array
    may not declare more bytes than the file holds, so a forged shape cannot ask for
    terabytes.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a .npy file")
    check_regular(path)
    try:
        with open(path, "rb") as fh:
            _check_npy_header(fh, os.fstat(fh.fileno()).st_size, "the array")
            fh.seek(0)
            return np.lib.format.read_array(fh, allow_pickle=False)
    except _Refused as err:
        raise ValueError(f"{path}: {err}") from None
    except Exception as err:  # not an .npy file, a damaged header, a short read
        raise ValueError(f"{path}: not a plain numeric .npy file ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]})") from None


def load_json(path) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming the file if it is missing, truncated or not an object."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a JSON file")
    data = read_bytes(path, JSON_LIMIT)
    try:
        value = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: truncated or invalid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_meta(arrays: dict[str, np.ndarray], path, fmt: str, version: int, older: tuple[int, ...] = ()) -> dict:
    """Decode the JSON ``meta`` array of an ``.npz`` written by this package and check its format
    (``version``, or one of the ``older`` versions the caller still reads)."""
    try:
        meta = json.loads(bytes(arrays["meta"].astype(np.uint8)).decode())
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{path}: not an itdiffusion file (no readable metadata)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not an itdiffusion file (metadata is not a JSON object)")
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: expected a {fmt} file, found {meta.get('format')!r}")
    if meta.get("version") != version and meta.get("version") not in older:
        raise ValueError(f"{path}: {fmt} version {meta.get('version')!r} is not supported (this is version {version})")
    return meta


def real_array(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    """``arrays[key]`` as float64; ``ValueError`` for anything but real numbers, ``KeyError`` if absent."""
    value = arrays[key]
    if value.dtype.kind not in "fiu":
        raise ValueError(f"array {key!r} has dtype {value.dtype}; expected real numbers")
    return value.astype(np.float64)
