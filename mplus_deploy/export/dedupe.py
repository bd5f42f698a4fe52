"""One shared external-data file for all graphs (platform-notes §7 "duplicated weights across graphs").

Initializers are keyed by (sha256 of raw bytes, dtype, dims); each distinct tensor is written once to
``graphs/weights.data`` (64-byte aligned) and every graph's initializer points at it through
``external_data`` (location/offset/length). Base weights are identical across graph families because
LoRA stays as separate low-rank branches (never merged). Graphs are added one at a time, so only one
graph's tensors are in memory at once.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

WEIGHTS_FILE = "weights.data"
ALIGN = 64
MIN_EXTERNAL_BYTES = 64  # scalars and shape constants stay inline in the .onnx


def _raw(t: TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()



def set_external(t: TensorProto, location: str, off: int, length: int) -> None:
    """Point initializer ``t`` at ``length`` bytes at ``off`` of ``location`` (relative to the .onnx)."""
    for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(fld)
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(off)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v

class WeightStore:
    """``with WeightStore(graphs_dir) as ws: ws.add(name, model)`` → ``graphs_dir/<name>.onnx`` + shared data."""

    def __init__(self, graphs_dir: Path):
        self.dir = Path(graphs_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / WEIGHTS_FILE
        self.index: dict[bytes, tuple[int, int]] = {}
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

    def add(self, name: str, model: onnx.ModelProto) -> Path:
        f = self._f
        for t in model.graph.initializer:
            raw = _raw(t)
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            self.referenced += len(raw)
            key = hashlib.sha256(raw).digest() + repr((t.data_type, tuple(t.dims))).encode()
            if key not in self.index:
                pad = (-self.offset) % ALIGN
                f.write(b"\0" * pad)
                self.offset += pad
                f.write(raw)
                self.index[key] = (self.offset, len(raw))
                self.offset += len(raw)
            off, length = self.index[key]
            set_external(t, WEIGHTS_FILE, off, length)
        out = self.dir / f"{name}.onnx"
        onnx.save_model(model, str(out))
        return out

    def stats(self) -> dict:
        return {"unique_tensors": len(self.index), "external_bytes": self.offset, "referenced_bytes": self.referenced}
