"""One shared external-data file for all graphs (platform-notes §7 "duplicated weights across graphs").

Initializers are keyed by (dtype, dims, raw bytes) hash; each distinct tensor is written once to
``graphs/weights.data`` (64-byte aligned) and every graph's initializer points at it through
``external_data`` (location/offset/length). Base weights are identical across graph families because
LoRA stays as separate low-rank branches (never merged).
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
    if t.HasField("raw_data") or t.data_location == TensorProto.EXTERNAL:
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def share_weights(models: dict[str, onnx.ModelProto], graphs_dir: Path) -> dict:
    """Write ``graphs_dir/weights.data`` and ``graphs_dir/<name>.onnx`` for every model. Returns stats."""
    graphs_dir = Path(graphs_dir)
    graphs_dir.mkdir(parents=True, exist_ok=True)
    data_path = graphs_dir / WEIGHTS_FILE
    index: dict[bytes, tuple[int, int]] = {}
    total_refs = 0
    with open(data_path, "wb") as f:
        offset = 0
        for name in sorted(models):
            for t in models[name].graph.initializer:
                raw = _raw(t)
                if len(raw) < MIN_EXTERNAL_BYTES:
                    continue
                total_refs += len(raw)
                key = hashlib.sha256(raw).digest() + bytes(str((t.data_type, tuple(t.dims))), "ascii")
                if key not in index:
                    pad = (-offset) % ALIGN
                    f.write(b"\0" * pad)
                    offset += pad
                    f.write(raw)
                    index[key] = (offset, len(raw))
                    offset += len(raw)
                off, length = index[key]
                t.ClearField("raw_data")
                for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                    t.ClearField(fld)
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(off)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
        f.flush()
        os.fsync(f.fileno())
    for name, m in models.items():
        onnx.save_model(m, str(graphs_dir / f"{name}.onnx"))
    return {"unique_tensors": len(index), "external_bytes": data_path.stat().st_size, "referenced_bytes": total_refs}
