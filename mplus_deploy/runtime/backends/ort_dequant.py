"""Weight-only FP8 / INT8 weights dequantized once per process for the CPU (``OrtRunner(fold_dq=...)``).

onnxruntime has no fp8 kernel on the CPU and no fused kernel for a per-channel int8 weight beside fp32
activations, so a weight ``DequantizeLinear(w, scale, zero)`` of a weight-only graph runs at every call: the demo's decode took 485 ms per step (42 ms with the weights in
fp32) and each memorize/prefill call dequantized every weight again (0.95 s vs 0.6 s per memorize; the fp32
outputs of the DQs are a transient copy of the weights in the arena at every call).

``fold(path, shared)`` returns the graph with those DQs removed: each DQ's output becomes an initializer of
the same name (fp32, the weight's shape) whose value is computed once, ``float(w) * scale`` along the DQ's
axis (what onnxruntime's own DQ and its constant folding compute: ``tests/runtime/test_ort_dequant.py``
checks the outputs bit for bit), and kept in the ``SharedInitializers`` of the process, so every graph and
every engine that reads the same fp8 bytes with the same scale shares one fp32 copy. The fp8 initializers the
graph no longer reads are dropped from it. The placeholder initializers keep the fp8 tensor's external-data
entry (a file onnxruntime validates exists); their value always comes from ``SessionOptions.add_initializer``,
and the entry's length (a quarter of the fp32 bytes) makes onnxruntime fail loudly if it ever read the file.

Only DQs whose input is an fp8 or int8 initializer with a constant scale and an all-zero (or absent) zero
point, per tensor or per axis, are folded; anything else (activation Q/DQ pairs, blocked DQs, and an int8
weight whose reader also takes a DQ'd activation: W8A8, which onnxruntime fuses into integer kernels) is left
in the graph. The int8 placeholders are a quarter of the fp32 length too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .ort_weights import SharedInitializers


def _attr(node, name: str, default):
    return next((a.i for a in node.attribute if a.name == name), default)


def _numpy(val, init) -> np.ndarray:
    """An initializer's value: its shared ``OrtValue`` (external) or its inline bytes."""
    from onnx import numpy_helper

    return val.numpy() if val is not None else numpy_helper.to_array(init)


def _with_value(ort, arr: np.ndarray) -> tuple:
    return arr, ort.OrtValue.ortvalue_from_numpy(arr)


def _dequantize(xq: np.ndarray, scale: np.ndarray, axis: int, fp8: bool) -> np.ndarray:
    """``float(x) * scale`` in fp32 along ``axis``, ``x`` E4M3 bytes or int8 (onnxruntime's DequantizeLinear
    with a zero zero point)."""
    xq = np.require(np.asarray(xq).view(np.uint8 if fp8 else np.int8), requirements=("C", "W"))  # copy if read-only
    x = torch.from_numpy(xq)
    x = (x.view(torch.float8_e4m3fn) if fp8 else x).float()
    s = torch.from_numpy(np.asarray(scale, dtype=np.float32))
    if s.dim():
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        s = s.reshape(shape)
    return (x * s).numpy()


def _read_names(graph) -> set:
    """Every name a node of ``graph`` or of its subgraphs (If/Loop/Scan bodies) reads."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names |= _read_names(sub)
    return names


def constant_reads(model, names) -> list:
    """The nodes that read one of ``names`` and whose every input is a constant (an initializer, or computed from
    initializers only): onnxruntime's constant folding would evaluate them at load and so read those inputs'
    data. An over-approximation (every op counts as foldable), which is the safe side."""
    graph_inputs = {i.name for i in model.graph.input}
    const = {i.name for i in model.graph.initializer} - graph_inputs
    const.add("")  # an omitted optional input
    hits = []
    for node in model.graph.node:  # topologically sorted (ONNX requires it)
        if node.op_type in ("Constant", "Shape", "Size"):  # Shape/Size of a static shape fold too
            const.update(node.output)
        elif node.input and all(i in const for i in node.input):
            const.update(node.output)
            if any(i in names for i in node.input):
                hits.append(node)
    return hits


def foldable(model) -> list:
    """The weight DQ nodes of ``model`` that ``fold`` replaces."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    readers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or n.input[1] not in inits:
            continue
        kind = inits[n.input[0]].data_type
        if kind not in (TensorProto.FLOAT8E4M3FN, TensorProto.INT8) or _attr(n, "block_size", 0):
            continue
        if len(n.input) > 2 and n.input[2] and n.input[2] not in inits:
            continue
        if kind == TensorProto.INT8 and any(i in dq_out and i != n.output[0]
                                            for r in readers.get(n.output[0], []) for i in r.input):
            continue  # int8 W8A8 (a DQ'd activation beside it): ORT fuses the pair into integer kernels
        out.append(n)
    return out


def fold(path: Path, shared: SharedInitializers) -> tuple[bytes, dict, dict, int]:
    """``path`` with its fp8 weight DQs folded: ``(model bytes, {initializer: OrtValue} of the mapped weights
    (``SessionOptions.add_initializer``), {folded initializer: OrtValue} (``add_external_initializers``), DQs
    folded)``."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    entries = shared.entries(path, model)
    inits = {i.name: i for i in model.graph.initializer}
    values = {name: val for name, (_, val) in entries.items()}
    nodes = []
    for n in foldable(model):
        zero = n.input[2] if len(n.input) > 2 and n.input[2] else None
        zp = _numpy(values.get(zero), inits[zero]).view(np.uint8) if zero is not None else None
        fp8 = inits[n.input[0]].data_type == TensorProto.FLOAT8E4M3FN
        if zp is not None and np.any(zp & 0x7F if fp8 else zp):
            continue  # a non-zero zero point (fp8: +0 is 0x00, -0 is 0x80): leave the DQ to onnxruntime
        x, s = inits[n.input[0]], inits[n.input[1]]
        axis = _attr(n, "axis", 1)
        key = ("dq", entries[x.name][0] if x.name in entries else (str(path), x.name),
               entries[s.name][0] if s.name in entries else (str(path), s.name), axis)

        def make(x=x, s=s, axis=axis, fp8=fp8):
            return _dequantize(_numpy(values.get(x.name), x), _numpy(values.get(s.name), s), axis, fp8)

        if x.data_location == TensorProto.EXTERNAL:  # shared: one fp32 copy per process
            values[n.output[0]] = shared.derived(key, lambda make=make: _with_value(ort, make()))[1]
            holder = TensorProto(name=n.output[0], data_type=TensorProto.FLOAT, dims=list(x.dims),
                                 data_location=TensorProto.EXTERNAL)
            holder.external_data.extend(x.external_data)
        else:  # an inline fp8 weight (tiny graphs): the folded value inline too
            holder = onnx.numpy_helper.from_array(make(), n.output[0])
        nodes.append((n, holder))
    for n, holder in nodes:
        model.graph.node.remove(n)
        model.graph.initializer.append(holder)
    used = _read_names(model.graph) | {o.name for o in model.graph.output}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    names = {i.name for i in model.graph.initializer}
    folded = {n.output[0]: values.pop(n.output[0]) for n, _ in nodes if n.output[0] in values}
    return model.SerializeToString(), {k: v for k, v in values.items() if k in names}, folded, len(nodes)
