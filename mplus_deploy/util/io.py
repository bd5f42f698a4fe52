"""Atomic file writes: temp file in the same directory + fsync + rename, so a crash never leaves a
half-written artifact or memory snapshot behind."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(d: Path) -> None:
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


def write_error(e: OSError, what: str, path, fix: str = "write it elsewhere") -> str:
    """One wording for a failed write of ``path`` (``what``: the flag or role, e.g. ``--plot``): the cause
    by errno, then the fix (the caller's ``fix`` where the cause is the target, not the permissions)."""
    import errno

    where = f"{what} {path}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: out of disk space (the disk is full); free space or {fix}"
    if e.errno == errno.EROFS:
        return f"{where}: on a read-only filesystem; {fix}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; choose a directory you can write or fix its permissions"
    if e.errno == errno.EISDIR:
        return f"{where}: is a directory; name a file"
    if e.errno == errno.ENOTDIR:
        return f"{where}: a parent of it is a file, not a directory; {fix}"
    return f"{where}: cannot write it ({e.strerror or e})"


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """``data`` onto ``path`` (temp + fsync + rename). ``mode``: the file's permission bits (the temp file is
    0600, as ``mkstemp`` makes it, unless given; the umask applies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def jsonl_objects(path, text: str | None = None):
    """``(line number, object)`` for every non-blank line of a JSONL file (``text``: its content, if already read).
    A line that is not JSON raises ``ValueError("PATH:LINE: not valid JSON (...)")``."""
    import json

    raw = Path(path).read_text(encoding="utf-8") if text is None else text
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ staged directories
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _staging_prefix(target: Path, tag: str) -> str:
    return f".{target.name}.{tag}-"


def remove_stale_staging(target: Path, tag: str = "staging") -> list[Path]:
    """Remove the staging folders of ``target`` (``.NAME.TAG-PID-XXXX`` beside it) left by processes that no
    longer run (a kill -9 or power loss mid-export). Folders of live processes are left alone."""
    target = Path(target)
    removed = []
    prefix = _staging_prefix(target, tag)
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


class StagedDir:
    """Build a directory beside ``target`` and swap it in only when complete.

    ``path``: a hidden folder ``.NAME.TAG-PID-XXXX`` in ``target``'s parent (same filesystem, so the final
    rename is atomic). ``commit()`` swaps it onto ``target`` (an existing ``target`` is exchanged
    atomically where the kernel supports it, and removed only after the new one is in place);
    ``discard()`` removes it. As a context manager, leaving without ``commit()`` (an error, a refusal, a
    KeyboardInterrupt) discards it: ``target`` is never touched before the commit.
    """

    def __init__(self, target: Path, tag: str = "staging"):
        self.target = Path(target)
        self.created_parents: list[Path] = []
        parent = self.target.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            d.mkdir()
            self.created_parents.append(d)
        remove_stale_staging(self.target, tag)
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(self.target, tag)}{os.getpid()}-",
                                              dir=self.target.parent))
            os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp makes it 0700; OUT gets the usual mode
        except BaseException:
            if hasattr(self, "path"):
                shutil.rmtree(self.path, ignore_errors=True)
            self._remove_parents()
            raise
        self.committed = False

    def _remove_parents(self) -> None:
        for d in reversed(self.created_parents):
            try:
                d.rmdir()
            except OSError:
                break
        self.created_parents = []

    def commit(self) -> Path:
        t, new = self.target, self.path
        if os.path.lexists(t):
            if _exchange(new, t):
                old = new  # the staging name now holds the previous target
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{t.name}.old-", dir=t.parent))
                os.rmdir(old)
                os.rename(t, old)
                try:
                    os.rename(new, t)
                except BaseException:
                    os.rename(old, t)
                    raise
            fsync_dir(t.parent)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.rename(new, t)
            fsync_dir(t.parent)
        self.committed = True
        self.created_parents = []
        return t

    def discard(self) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
            self._remove_parents()

    def __enter__(self) -> "StagedDir":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
