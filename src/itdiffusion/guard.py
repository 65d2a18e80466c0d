"""Output safety for every command: never write over an input, fail before the work, one writer at a time.

:func:`check_outputs` refuses, before any work starts, an output that is (or whose companion
files would be) one of the inputs, an output in a folder that cannot be written, and a name too
long for the atomic writer's temporary files.  :class:`OutputLock` holds an exclusive lock
beside the output for a run's lifetime, so two runs cannot silently replace each other's files.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable

TEMP_EXTRA = len("..") + 8 + len(".tmp")  # what the atomic writer adds to a name: ".NAME.XXXXXXXX.tmp"


def _existing(path: Path) -> Path | None:
    try:
        return path.resolve() if path.exists() else None
    except OSError:
        return None


def _inputs(inputs: Iterable) -> list[Path]:
    """Every input that is a local path, with the files inside input folders (a folder of images)."""
    found = []
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = _existing(Path(str(item)))
        if path is not None:
            found.append(path)
    return found


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_outputs(outputs: Iterable, inputs: Iterable, *, flag: str = "--out") -> None:
    """``ValueError`` (naming ``flag``) if an output would replace an input, or cannot be written.

    ``outputs``: every path the command will write or replace (files, companion files, folders
    it removes); ``inputs``: every path it reads (files or folders; non-paths such as registry
    names are ignored).  An output equal to an input, or a folder holding one, is refused.
    """
    sources = _inputs(inputs)
    for out in (Path(str(o)) for o in outputs):
        target = _existing(out) or (out.parent.resolve() / out.name)
        if out.exists() and not (out.is_file() or out.is_dir()):  # a device, a FIFO, a socket
            raise ValueError(f"{flag} {out} is not a regular file; choose a file name")
        for src in sources:
            if target == src:
                raise ValueError(f"{flag} {out} would replace the input {src}; choose another name")
            if _is_within(src, target):
                raise ValueError(f"{flag} {out} would replace the folder holding the input {src}; "
                                 "choose another name")
            if src.is_dir() and out.is_file() and _is_within(target, src):  # a file an input folder holds
                raise ValueError(f"{flag} {out} would replace a file of the input {src}; choose another name")
        _check_writable(out, flag)


def _check_writable(out: Path, flag: str) -> None:
    folder = out.parent if not (out.exists() and out.is_dir()) else out
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: the folder {probe} is not writable")
    try:
        name_max = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = max([len(os.fsencode(out.name))] + [len(os.fsencode(p)) for p in out.parts[len(probe.parts):]])
    if longest + TEMP_EXTRA + len(".partial") > name_max:
        raise ValueError(f"{flag} {out}: the name is too long for this file system (at most "
                         f"{name_max - TEMP_EXTRA - len('.partial')} bytes leave room for temporary files)")


class OutputLock:
    """An exclusive, non-blocking lock on ``.NAME.lock`` beside ``path``, held until :meth:`release`
    (or the end of a ``with`` block, or the process).  A second run on the same output is refused
    with one line instead of replacing its files; a lock file left by a killed run is reused."""

    def __init__(self, path, flag: str = "--out"):
        self.path, self.flag = Path(path), flag
        self.lock_path = self.path.parent / f".{self.path.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        import fcntl

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise ValueError(f"{self.flag} {self.path}: another itd run is writing it (lock "
                                     f"{self.lock_path}); wait for it or choose another name") from None
                raise
            if _same_file(fd, self.lock_path):  # not a lock file its last holder has just removed
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class OutputLocks:
    """:class:`OutputLock` on each of several outputs (in a fixed order, so two runs cannot deadlock),
    all or none: a run that writes ``R.json`` and ``R.npz`` holds both."""

    def __init__(self, paths, flag: str = "--out"):
        self.locks = [OutputLock(p, flag) for p in sorted({Path(p) for p in paths}, key=str)]

    def acquire(self) -> "OutputLocks":
        held = []
        try:
            for lock in self.locks:
                held.append(lock.acquire())
        except BaseException:
            for lock in held:
                lock.release()
            raise
        return self

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()

    def __enter__(self) -> "OutputLocks":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
