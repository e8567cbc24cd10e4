"""File helpers of the library and its recipes (public API): atomic writes of files and of whole
directories, paths kept inside their root, bounded reads of regular files, and the size bounds the
recipes share for what they read whole. Imports no torch.

(``gill._io`` is this module's old name, kept for older callers.)"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "MAX_CAPTION_BYTES", "unique_temp_name", "atomic_path", "atomic_write_text",
           "atomic_write_bytes", "atomic_dir", "inside", "file_kind", "NotRegularFile", "FileTooLarge",
           "read_regular_file"]

# What a dataset walk (index.build, training.make_shards) reads whole: an image file, a shard member or a URL
# body larger than MAX_FILE_BYTES is refused unread (64 MiB: no photo is, a disk image might be); a caption file
# larger than MAX_CAPTION_BYTES is left out.
MAX_FILE_BYTES = 64 * 2**20
MAX_CAPTION_BYTES = 2**20


def _umask() -> int:
    """The process's umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def unique_temp_name(path: str | os.PathLike) -> Path:
    """A hidden name beside ``path`` that no other process or thread will pick (pid + random)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A crash or an exception leaves the old file (or none) in place, never a half-written one. The temporary
    name is unique, so two writers of one file never collide (the last rename wins), and the file gets the
    mode a plain ``open`` would give it (the user's umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path`` as a whole.

    Readers see the old directory or the new one, never a mix: the old one is renamed aside, the new one
    renamed in, then the old one removed (a crash between the two renames leaves the old one beside it,
    under a hidden name, and ``path`` absent). An exception removes the temporary directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp_name(path)
    tmp.mkdir()
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def inside(root: str | os.PathLike, relative: str | os.PathLike, *, what: str = "path") -> Path:
    """``root / relative`` resolved, refused (ValueError naming both) if it leaves ``root`` (``..``,
    an absolute path, a symlink pointing out)."""
    root_resolved = Path(root).resolve()
    target = (root_resolved / relative).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise ValueError(f"{what} {os.fspath(relative)!r} points outside {os.fspath(root)}")
    return target


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str | None:
    """What a file of this ``st_mode`` is ("a FIFO", "a directory", ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


class NotRegularFile(ValueError):
    """``read_regular_file`` refused a path that is not a regular file: ``what`` it is (``file_kind``)."""

    def __init__(self, path: str | os.PathLike, what: str):
        super().__init__(f"{os.fspath(path)} is {what}")
        self.what = what


class FileTooLarge(ValueError):
    """``read_regular_file`` refused a file over its bound: ``size`` in bytes (None: it grew while read)."""

    def __init__(self, path: str | os.PathLike, size: int | None, max_bytes: int):
        super().__init__(f"{os.fspath(path)} is larger than {max_bytes} bytes")
        self.size = size


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. It is opened without blocking and its type and
    size are checked on the open file, so a FIFO (which would wait forever for a writer), a device or a folder
    is refused (``NotRegularFile``) and a larger file is never read whole (``FileTooLarge``); OSError as raised."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:  # (checked before fdopen, which refuses a folder with an error of its own)
        info = os.fstat(fd)
        if what := file_kind(info.st_mode):
            raise NotRegularFile(path, what)
        if info.st_size > max_bytes:
            raise FileTooLarge(path, info.st_size, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(path, None, max_bytes)
    return data
