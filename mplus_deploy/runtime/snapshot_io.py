"""Crash-safe file I/O of memory snapshots (``snapshot.py`` owns the format, save/load and validation).

Writing: ``atomic_write`` fills a locked temp file beside the target, fsyncs it, renames it onto the
target and fsyncs the folder; temp files that killed saves left behind are removed by the next save of
the same target (``remove_stale_temps``), never one a running save holds locked.

Reading: everything comes through one open file (``_open``): ``_header`` validates the safetensors
header against the file's size, ``_Reader`` reads tensor data with ``readinto`` at absolute offsets into
buffers the caller owns (nothing memory-mapped), and ``_identity`` lets the caller detect an in-place
rewrite during the read.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from mplus_deploy.model.safetensors_io import _ST_TO_TORCH
from mplus_deploy.util.io import fsync_dir, drop_page_cache

try:  # POSIX: a save holds an exclusive flock on its temp file until the rename
    import fcntl
except ImportError:  # pragma: no cover - no flock: stale temp files are left alone
    fcntl = None

_MAX_HEADER = 100 << 20


class SnapshotError(ValueError):
    """A snapshot that cannot be restored into this engine; the message says why."""


def nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _bytes(t: torch.Tensor) -> memoryview:
    assert t.is_contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------------------- atomic write, temp files
# A save writes ``.<name>.XXXXXXXX.tmp`` beside the target (``tempfile.mkstemp``'s 8 characters), holds an
# exclusive ``flock`` on it until it is renamed onto the target, and removes it on any failure. A process
# killed mid-save (kill -9, power loss) leaves its temp file behind, unlocked: the next save of the same
# target removes every such file nobody holds locked. Only names of exactly this pattern for this target
# are touched, and never one a running save holds.
def temp_pattern(path: Path) -> re.Pattern:
    return re.compile(r"\." + re.escape(Path(path).name) + r"\.[a-z0-9_]{8}\.tmp\Z")


def _try_lock(fd: int, block: bool) -> bool:
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def temp_files(path) -> list[Path]:
    """The temp files of saves of ``path`` present now (running or interrupted ones): our pattern only."""
    path = Path(path)
    pat = temp_pattern(path)
    try:
        return [path.parent / n for n in sorted(os.listdir(path.parent)) if pat.match(n)]
    except OSError:
        return []


def remove_stale_temps(path) -> list[Path]:
    """Remove the temp files that interrupted saves of ``path`` left (not locked by a running save); returns them.
    Each is unlinked while this process holds its lock and only if the name still refers to the locked
    file, so a save that has just created (and not yet locked) its temp file notices and starts over."""
    removed = []
    if fcntl is None:
        return removed
    for p in temp_files(path):
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _try_lock(fd, block=False):
                continue  # a save in progress (this or another process)
            st = os.fstat(fd)
            if os.path.isfile(p) and os.stat(p, follow_symlinks=False).st_ino == st.st_ino:
                os.unlink(p)
                removed.append(p)
        except OSError:
            pass  # best effort: a temp we cannot remove must not fail the save
        finally:
            os.close(fd)
    return removed


def _locked_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside ``path``, created and locked by this process (retried if a concurrent
    cleanup removed it between creation and locking)."""
    for _ in range(100):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if fcntl is None:
            return fd, tmp
        try:
            _try_lock(fd, block=True)
            if os.fstat(fd).st_nlink > 0 and os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(f"{path}: could not create a temp file beside it (removed by concurrent cleanups)")


def atomic_write(path: Path, writer) -> None:
    """``writer(f)`` writes the file through ``f``; then fsync + rename onto ``path`` + fsync of the folder.
    Stale temp files of earlier interrupted saves of ``path`` are removed first; on any failure (also
    KeyboardInterrupt) this save's temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the memory snapshot a file name, e.g. "
                                f"{path / 'memory.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = _locked_temp(path)
    done = False
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            writer(f)
            f.flush()
            os.fsync(fd)
        drop_page_cache(fd)
        os.replace(tmp, path)  # still locked: a concurrent cleanup cannot take the temp file meanwhile
        done = True
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        os.close(fd)
    fsync_dir(path.parent)


# ====================================================================================== read
def _header(path: Path, fh) -> tuple[dict, int]:
    """The safetensors header of the open file ``fh`` (validated: offsets cover the data exactly) and the
    data start."""
    bad = f"{path}: not a readable safetensors memory snapshot"
    size = os.fstat(fh.fileno()).st_size
    if size < 8:
        raise SnapshotError(f"{bad} (file of {size} bytes)")
    fh.seek(0)
    hlen = int.from_bytes(fh.read(8), "little")
    if not 2 <= hlen <= min(_MAX_HEADER, size - 8):
        raise SnapshotError(f"{bad} (header length {hlen} does not fit the file of {size} bytes)")
    raw = fh.read(hlen)
    if len(raw) != hlen:
        raise SnapshotError(f"{bad} (the file ended inside its header)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{bad} (the safetensors header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"{bad} (the safetensors header is not a JSON object)")
    md = header.pop("__metadata__", None) or {}
    if not isinstance(md, dict):
        raise SnapshotError(f"{bad} (__metadata__ is not a JSON object)")
    base, spans, out = 8 + hlen, [], {}
    for name, h in header.items():
        try:
            dtype = _ST_TO_TORCH[h["dtype"]]
            shape = tuple(int(x) for x in h["shape"])
            s, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SnapshotError(f"{bad} (tensor {name!r}: missing or unsupported dtype/shape/data_offsets: {h!r})") from None
        if any(x < 0 for x in shape) or e - s != nbytes(dtype, shape):
            raise SnapshotError(f"{bad} (tensor {name!r}: data_offsets {[s, e]} do not hold {h['dtype']} {list(shape)})")
        spans.append((s, e, name))
        out[name] = (dtype, shape, base + s, e - s)
    pos = 0
    for s, e, name in sorted(spans):
        if s != pos:
            raise SnapshotError(f"{bad} (tensor {name!r} starts at {s}, expected {pos}: overlapping or gapped data)")
        pos = e
    if base + pos != size:
        what = "truncated" if base + pos > size else "has trailing bytes"
        raise SnapshotError(f"{bad} (the file is {what}: header says {base + pos} bytes, file has {size})")
    return {"metadata": md, "tensors": out}, base


def _open(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such memory snapshot")
    if path.is_dir():
        raise SnapshotError(f"{path} is a directory, not a memory snapshot file; give the file save_memory wrote")
    try:
        return open(path, "rb", buffering=0)
    except OSError as e:
        raise SnapshotError(f"{path}: cannot open the memory snapshot ({e.strerror or e})") from None


class _Reader:
    """``readinto`` at absolute offsets of the one open file ``fh`` into owned buffers (dtype conversion and
    K/V re-layout through a bounded chunk of at most ``chunk_bytes``). ``plan``: the validated snapshot
    (``path`` for messages, ``tensors``: name -> (dtype, shape, absolute offset, nbytes))."""

    def __init__(self, plan, fh, chunk_bytes: int):
        self.plan, self.fh, self.chunk_bytes = plan, fh, chunk_bytes

    def _fill(self, off: int, view: memoryview) -> None:
        self.fh.seek(off)
        got = 0
        while got < len(view):
            n = self.fh.readinto(view[got:])
            if not n:
                raise SnapshotError(f"{self.plan.path}: the file ended early while reading (it changed or was "
                                    "truncated after validation)")
            got += n

    def into(self, name: str, dst: torch.Tensor, first: int = 0) -> None:
        """Elements [first, first + dst.numel()) of tensor ``name`` into the contiguous ``dst``."""
        src, _, off, _ = self.plan.tensors[name]
        es, n = torch.empty((), dtype=src).element_size(), dst.numel()
        if n == 0:
            return
        off += first * es
        if src == dst.dtype:
            self._fill(off, _bytes(dst))
            return
        flat, step = dst.view(-1), max(1, self.chunk_bytes // es)
        buf = torch.empty(min(step, n), dtype=src)
        for s in range(0, n, step):
            c = min(step, n - s)
            self._fill(off + s * es, _bytes(buf[:c]))
            flat[s: s + c].copy_(buf[:c])

    def new(self, name: str) -> torch.Tensor:
        dtype, shape, _, _ = self.plan.tensors[name]
        out = torch.empty(shape, dtype=dtype)
        self.into(name, out)
        return out

    def kv_rows(self, name: str, first_row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """File rows [first_row, first_row + n) of ``name`` ([.., rows, 2*Hkv*Dh]) into k, v [Hkv, n, Dh]."""
        dtype, _, off, _ = self.plan.tensors[name]
        H, n, D = k.shape
        W = 2 * H * D
        row = W * torch.empty((), dtype=dtype).element_size()
        step = max(1, self.chunk_bytes // row)
        buf = torch.empty(min(step, max(n, 1)), 2, H, D, dtype=dtype)
        for r in range(0, n, step):
            c = min(step, n - r)
            t = buf[:c]
            self._fill(off + (first_row + r) * row, _bytes(t))
            k[:, r: r + c].copy_(t[:, 0].transpose(0, 1))
            v[:, r: r + c].copy_(t[:, 1].transpose(0, 1))

    def close(self) -> None:
        drop_page_cache(self.fh.fileno())


def _identity(fh) -> tuple:
    st = os.fstat(fh.fileno())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
