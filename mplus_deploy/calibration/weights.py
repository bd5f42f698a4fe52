"""Writing quantized graphs next to the fp32 ones: unchanged fp32 tensors point into the existing
``graphs/weights.data`` (no second copy), new tensors (quantized weights, scales) go to one shared,
deduplicated, 64-byte aligned ``graphs/weights.<mode>.data``."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from mplus_deploy.export.dedupe import set_external as _set_external

ALIGN = 64  # byte alignment of tensors in weights.<mode>.data
MIN_EXTERNAL_BYTES = 64  # smaller tensors stay inside the .onnx file

def _raw(t: TensorProto, base: Path) -> bytes:
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def _info(t: TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def _location(t: TensorProto) -> str:
    return _info(t).get("location", "")


def _key(t: TensorProto, raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest() + repr((t.data_type, tuple(t.dims))).encode()


def fp32_weight_index(graphs_dir: Path, files: list[str]) -> dict[bytes, tuple[int, int]]:
    """(sha256, dtype, dims) → (offset, length) of every tensor already in ``graphs/weights.data``."""
    idx = {}
    for f in files:
        m = onnx.load(str(graphs_dir / f), load_external_data=False)
        for t in m.graph.initializer:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            if info.get("location") != "weights.data":
                continue
            raw = _raw(t, graphs_dir)
            idx.setdefault(_key(t, raw), (int(info["offset"]), len(raw)))
    return idx




class SharedWriter:
    """Writes quantized graphs next to the fp32 ones, reusing ``weights.data`` and appending new tensors
    to ``weights.<mode>.data`` (deduplicated, 64-byte aligned)."""

    def __init__(self, graphs_dir: Path, mode: str, fp32_index: dict):
        self.dir, self.mode, self.fp32 = Path(graphs_dir), mode, fp32_index
        self.data_name = f"weights.{mode}.data"
        self.tmp_data = self.dir / f".{self.data_name}.tmp"
        self.f = open(self.tmp_data, "wb")
        self.off = 0
        self.index: dict[bytes, tuple[int, int]] = {}
        self.stats = {"reused_fp32_bytes": 0, "new_bytes": 0}
        self.pending: list[tuple[onnx.ModelProto, Path]] = []

    def add(self, model: onnx.ModelProto, name: str, src_dir: Path) -> str:
        same_dir = Path(src_dir).resolve() == self.dir.resolve()
        for t in model.graph.initializer:
            if same_dir and t.data_location == TensorProto.EXTERNAL and _location(t) == "weights.data":
                self.stats["reused_fp32_bytes"] += int(_info(t).get("length", 0))  # already the fp32 file: as is
                continue
            raw = _raw(t, src_dir)
            if len(raw) < MIN_EXTERNAL_BYTES:
                if t.data_location == TensorProto.EXTERNAL:
                    t.data_location = TensorProto.DEFAULT
                    del t.external_data[:]
                    t.raw_data = raw
                continue
            k = _key(t, raw)
            if k in self.fp32:
                off, ln = self.fp32[k]
                _set_external(t, "weights.data", off, ln)
                self.stats["reused_fp32_bytes"] += ln
                continue
            if k not in self.index:
                pad = (-self.off) % ALIGN
                self.f.write(b"\0" * pad)
                self.off += pad
                self.f.write(raw)
                self.index[k] = (self.off, len(raw))
                self.off += len(raw)
                self.stats["new_bytes"] += len(raw)
            off, ln = self.index[k]
            _set_external(t, self.data_name, off, ln)
        rel = f"{name}.{self.mode}.onnx"
        # keep a fresh copy (every tensor now points into a data file, so it is small): protobuf (upb) frees a
        # message's memory only with the whole message, so holding ``model`` would keep the quantized bytes it
        # carried until commit (measured: +0.2 GB per demo graph)
        small = onnx.ModelProto()
        small.ParseFromString(model.SerializeToString())
        self.pending.append((small, self.dir / rel))
        return f"graphs/{rel}"

    def commit(self) -> str:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp_data, self.dir / self.data_name)
        for model, path in self.pending:
            tmp = path.with_name("." + path.name + ".tmp")
            onnx.save_model(model, str(tmp))
            os.replace(tmp, path)
            os.chmod(path, 0o644)
        os.chmod(self.dir / self.data_name, 0o644)
        return f"graphs/{self.data_name}"

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        if self.tmp_data.exists():
            self.tmp_data.unlink()
