"""One shared external-data file for all graphs (platform-notes §7 "duplicated weights across graphs").

``WeightStore.put(key, make)`` writes a tensor once per key (the official checkpoint key plus its
transform, see ``bind.py``) into ``graphs/weights.data`` and returns where it lies; every graph's
initializer points there through ``external_data`` (location/offset/length). Tensors are produced by
``make()`` one at a time and dropped after writing, so the store never holds more than one. Tensors of
1 MiB or more start on a 4 KiB boundary (ONNX Runtime memory-maps page-aligned external data); smaller
ones on 64 bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import torch
from onnx import TensorProto

WEIGHTS_FILE = "weights.data"
ALIGN, PAGE, PAGE_FROM = 64, 4096, 1 << 20
BLOCK_BYTES = 64 << 20  # transposed writes go out in blocks of this size

_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
         torch.float64: TensorProto.DOUBLE, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
         torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8, torch.bool: TensorProto.BOOL}


def set_external(t: TensorProto, location: str, off: int, length: int) -> None:
    """Point initializer ``t`` at ``length`` bytes at ``off`` of ``location`` (relative to the .onnx)."""
    for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(fld)
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(off)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


@dataclass(frozen=True)
class Entry:
    offset: int
    length: int
    dims: tuple
    data_type: int


class WeightStore:
    """``with WeightStore(graphs_dir) as ws: e = ws.put(key, make); ws.tensor_proto(name, e)``."""

    def __init__(self, graphs_dir: Path):
        self.dir = Path(graphs_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / WEIGHTS_FILE
        self.index: dict[Hashable, Entry] = {}
        self.offset = 0
        self.referenced = 0
        self._f = None

    def __enter__(self):
        self._f = open(self.path, "wb")
        return self

    def __exit__(self, *exc):
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def put(self, key: Hashable, make: Callable[[], torch.Tensor], transpose: bool = False) -> Entry:
        """Write ``make()`` (``transpose``: its 2-D transpose, written in row blocks so no transposed copy
        of the whole tensor exists) once per ``key``."""
        if key not in self.index:
            t = make()
            shape = tuple(t.shape[::-1]) if transpose else tuple(t.shape)
            nbytes = t.numel() * t.element_size()
            pad = (-self.offset) % (PAGE if nbytes >= PAGE_FROM else ALIGN)
            self._f.write(b"\0" * pad)
            self.offset += pad
            if nbytes and not transpose:
                self._f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            elif nbytes:
                rows = max(1, BLOCK_BYTES // max(1, t.shape[0] * t.element_size()))
                for a in range(0, t.shape[1], rows):
                    blk = t[:, a:a + rows].t().contiguous()
                    self._f.write(memoryview(blk.reshape(-1).view(torch.uint8).numpy()))
            self.index[key] = Entry(self.offset, nbytes, shape, _ONNX[t.dtype])
            self.offset += nbytes
            del t
        e = self.index[key]
        self.referenced += e.length
        return e

    def tensor_proto(self, name: str, e: Entry) -> TensorProto:
        t = TensorProto()
        t.name, t.data_type = name, e.data_type
        t.dims.extend(e.dims)
        set_external(t, WEIGHTS_FILE, e.offset, e.length)
        return t

    def stats(self) -> dict:
        return {"unique_tensors": len(self.index), "external_bytes": self.offset, "referenced_bytes": self.referenced}
