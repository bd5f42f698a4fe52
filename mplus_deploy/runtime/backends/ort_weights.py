"""Weights shared by every onnxruntime session of a process (platform-notes §2.2): each initializer stored
in an artifact's external data is memory-mapped once (copy-on-write) into one ``OrtValue`` that every
session gets through ``SessionOptions.add_initializer``; ``session.disable_prepacking = 1`` keeps a
session from making its own prepacked copy. bf16 and fp8 tensors (no numpy type) are mapped as their bits and
handed over with their ONNX type, so quantized fp8 graphs share their weights too. Used by the runtime's
``OrtRunner`` (which validation, calibration and the report run on too), so no process holds a copy of the weights per graph
(at real width the embeddings and lm_head alone are 2.1 GB each in fp32, in four graphs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

_PLAIN = None


def _plain_types():
    import onnx

    global _PLAIN
    if _PLAIN is None:
        T = onnx.TensorProto
        _PLAIN = {T.FLOAT, T.FLOAT16, T.DOUBLE, T.BFLOAT16, T.INT8, T.UINT8, T.INT32, T.INT64}
    return _PLAIN


class SharedInitializers:
    """One ``OrtValue`` per (file, offset, length) of external data, over a memory map of the file."""

    def __init__(self):
        self._values: dict = {}
        self._maps: list = []
        self._derived: dict = {}  # values computed from mapped ones (e.g. fp8 weights dequantized once: ort_dequant)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def derived_bytes(self) -> int:
        """Bytes of the derived values (each ``make()`` returns ``(array, OrtValue)``)."""
        return sum(int(arr.nbytes) for arr, _ in self._derived.values())

    def for_graph(self, path: Path, model=None) -> dict:
        """``{initializer name: OrtValue}`` for the external initializers of the ONNX file ``path``."""
        return {name: val for name, (_, val) in self.entries(path, model).items()}

    def entries(self, path: Path, model=None) -> dict:
        """``{initializer name: (key, OrtValue)}``; ``key`` names the bytes (the same for every graph reading them).
        ``model``: ``path``'s ``ModelProto`` when the caller has loaded it already (without its external data)."""
        import onnx
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype

        path = Path(path)
        model = onnx.load(str(path), load_external_data=False) if model is None else model
        out = {}
        for init in model.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                continue
            fp8 = init.data_type == onnx.TensorProto.FLOAT8E4M3FN  # no numpy fp8: its bytes as uint8
            if init.data_type not in _plain_types() and not fp8:  # packed int4: ORT loads it itself
                continue
            info = {e.key: e.value for e in init.external_data}
            loc = (path.parent / info["location"]).resolve()
            off, length = int(info.get("offset", 0)), int(info.get("length", 0))
            key = (str(loc), off, length)
            if key not in self._values:
                bf16 = init.data_type == onnx.TensorProto.BFLOAT16  # no numpy bf16: its bits as uint16
                dt = (np.dtype(np.uint16) if bf16 else np.dtype(np.uint8) if fp8
                      else np.dtype(tensor_dtype_to_np_dtype(init.data_type)))
                shape = tuple(init.dims)
                count = int(np.prod(shape)) if shape else 1
                arr = np.memmap(loc, dtype=dt, mode="c", offset=off, shape=(count,)).reshape(shape)
                self._maps.append(arr)
                self._values[key] = (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, init.data_type) if bf16 or fp8
                                     else ort.OrtValue.ortvalue_from_numpy(arr))
            out[init.name] = (key, self._values[key])
        return out

    def derived(self, key, make):
        """The value ``make()`` computed once per ``key`` and kept with the mapped ones (``clear`` drops it)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def add_to(self, so, path: Path) -> None:
        """Put ``path``'s shared initializers into SessionOptions ``so`` (and turn prepacking off)."""
        so.add_session_config_entry("session.disable_prepacking", "1")
        for name, val in self.for_graph(path).items():
            so.add_initializer(name, val)

    def clear(self) -> None:
        self._values.clear()
        self._maps.clear()
        self._derived.clear()
