"""Atomic, pickle-free file helpers shared by the whole package."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np


def write_atomic(path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it into place.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a file path")
    folder = path.parent
    if folder and not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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


def load_npz(path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file into memory, refusing pickled objects.

    Raises ``ValueError`` with the file name for a missing, truncated, corrupt or
    pickle-bearing file.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected an .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise ValueError(f"{path}: contains pickled objects; refusing to load it") from None
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"{path}: truncated or corrupt .npz file ({type(err).__name__}: {err})") from None


def read_meta(arrays: dict[str, np.ndarray], path, fmt: str, version: int) -> dict:
    """Decode the JSON ``meta`` array of an ``.npz`` written by this package and check its format."""
    try:
        meta = json.loads(bytes(arrays["meta"].astype(np.uint8)).decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise ValueError(f"{path}: not an itdiffusion file (no readable metadata)") from None
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: expected a {fmt} file, found {meta.get('format')!r}")
    if meta.get("version") != version:
        raise ValueError(f"{path}: {fmt} version {meta.get('version')!r} is not supported (this is version {version})")
    return meta
