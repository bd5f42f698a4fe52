"""Atomic file writes: temp file in the same directory + fsync + rename, so a crash never leaves a
half-written artifact or memory snapshot behind."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def drop_page_cache(fd: int) -> None:
    """Tell the kernel the file's cached pages are not needed again (big files written or read once)."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def atomic_replace_from(tmp_writer, path: Path, drop_cache: bool = False) -> None:
    """Call ``tmp_writer(tmp_path)`` to produce the file, then fsync + rename it onto ``path``. On any
    failure the temp file is removed and ``path`` is untouched. ``drop_cache``: drop the written pages
    from the page cache after the fsync (a multi-GB memory snapshot need not stay cached)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tmp_writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            if drop_cache:
                drop_page_cache(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
