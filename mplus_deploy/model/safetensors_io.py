"""Streaming safetensors I/O for checkpoints: header-validated files read tensor by tensor with
``readinto`` into their final buffers (dtype conversion in 64 MB pieces), and a writer that streams
tensors out one at a time. Used by :mod:`.checkpoint`; keeps peak RSS near one model (bench/load_rss.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

_READ_CHUNK = 64 << 20  # bytes per dtype-conversion piece

_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file/key and what to fix."""


def parse_size(s: int | str) -> int:
    """``2GB`` → 2e9 bytes (HF convention: GB = 10^9, GiB = 2^30); ints pass through."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(s), flags=re.I)
    if not m:
        raise ValueError(f"shard_size {s!r} is not a size; use e.g. 2GB, 500MB, 1GiB or a byte count")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(num * mult)


def nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def split_shards(entries: list, limit: int) -> list[list]:
    """Greedy shards of at most ``limit`` bytes (a tensor larger than ``limit`` gets a shard of its own), in order."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nb = nbytes(e[1], e[2])
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nb
    return shards


def _readinto(fh, buf: memoryview, fname: Path) -> None:
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{fname}: file ended early while reading tensor data (truncated); re-download or re-save it")
        got += n


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# =============================================================================== safetensors I/O
def header_bytes(entries: list, metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (JSON, padded to 8 bytes) of ``entries`` (name, dtype, shape, ...) laid out
    back to back in order: the one place the layout is computed (checkpoints, memory snapshots)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dtype, shape, *_ in entries:
        n = nbytes(dtype, shape)
        header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": [int(x) for x in shape], "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    return hb + b" " * (-len(hb) % 8)


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple, Callable[[], torch.Tensor] | torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> None:
    """Stream a safetensors file tensor by tensor (atomic: temp file + rename).

    ``entries``: (name, dtype, shape, tensor or zero-arg callable producing it). Callables are invoked
    one at a time while writing, so the writer never holds more than one tensor (used by the RSS bench).
    """
    from mplus_deploy.util.io import atomic_replace_from

    hb = header_bytes(entries, metadata)

    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            for name, dtype, shape, src in entries:
                t = src() if callable(src) else src
                t = t.detach().to("cpu", dtype)
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced shape {tuple(t.shape)}, declared {tuple(shape)}")
                if t.numel():
                    f.write(_as_bytes(t))
                del t

    atomic_replace_from(writer, Path(path))


class TensorFile:
    """One validated safetensors file: key → (dtype, shape, absolute byte offset, nbytes)."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        if not path.exists():
            raise CheckpointError(f"{path}: file is missing")
        try:
            with safe_open(str(path), framework="pt") as f:  # validates header + full coverage
                self.metadata = f.metadata() or {}
                names = list(f.keys())
        except SafetensorError as e:
            raise CheckpointError(
                f"{path}: not a valid safetensors file ({e}); the file is truncated or not safetensors - "
                "re-download it or re-save the checkpoint"
            ) from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
        with open(path, "rb") as fh:
            hlen = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(hlen))
        base = 8 + hlen
        self.entries = {}
        for k in names:
            h = header[k]
            if h["dtype"] not in _ST_TO_TORCH:
                raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {h['dtype']}")
            s, e = h["data_offsets"]
            self.entries[k] = (_ST_TO_TORCH[h["dtype"]], tuple(h["shape"]), base + s, e - s)

    def read(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Read ``key`` straight into a ``dtype`` buffer (no full-size temporary when converting)."""
        src, shape, off, nb = self.entries[key]
        dtype = dtype or src
        out = torch.empty(shape, dtype=dtype)
        n = out.numel()
        if n == 0:
            return out
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(off)
            if src == dtype:
                _readinto(fh, _as_bytes_writable(out), self.path)
            else:
                flat = out.view(-1)
                es = nb // n
                step = max(1, _READ_CHUNK // es)
                buf = torch.empty(min(step, n), dtype=src)
                for s in range(0, n, step):
                    c = min(step, n - s)
                    b = buf[:c]
                    _readinto(fh, _as_bytes_writable(b), self.path)
                    flat[s : s + c].copy_(b)
        return out


    def read_rows(self, key: str, a: int, b: int, dtype: torch.dtype | None) -> torch.Tensor:
        """Rows ``a:b`` of ``key`` (first dim) only, converted to ``dtype``."""
        src, shape, off, nb = self.entries[key]
        row = nb // max(1, shape[0])
        a, b = max(0, a), min(shape[0], b)
        out = torch.empty((b - a, *shape[1:]), dtype=src)
        if out.numel():
            with open(self.path, "rb", buffering=0) as fh:
                fh.seek(off + a * row)
                _readinto(fh, _as_bytes_writable(out), self.path)
        return out if dtype is None else out.to(dtype)


def _as_bytes_writable(t: torch.Tensor) -> memoryview:
    assert t.is_contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy())

