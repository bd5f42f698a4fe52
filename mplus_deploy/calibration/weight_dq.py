"""Weight-only FP8 / INT8 Q/DQ written directly (the default fp8/int8 scheme; ``weight_only``).

ModelOpt's ONNX FP8/INT8 is W8A8: it runs an augmented-graph calibration of every activation, inserts
``Q → DQ`` pairs on the activations and the weights, folds the weight pairs into quantized initializers
(``dq_only``) and we then strip the activation pairs again (:mod:`.weight_only`). For weights only, all of
that calibration is thrown away; on the demo it was most of the time and the memory of ``--fp8`` (issue 21:
637 s and 11 GiB for the five graphs), and at real width it ran out of memory (issue 13).

This pass writes what ModelOpt + :func:`.weight_only.strip_activation_qdq` produce, without running
ModelOpt: per selected MatMul, the ``[in, out]`` fp32 weight initializer becomes a quantized initializer of
the same name read by ``DequantizeLinear(axis=1)`` with a per-output-channel scale and a zero zero point,
named as ModelOpt names them (``{w}_DequantizeLinear``, ``{w}_scale``, ``{w}_zero_point``). The numbers are
ModelOpt's, operation for operation (``tests/calibration/test_weight_dq.py`` checks them bit for bit
against ModelOpt's output):

- int8: onnxruntime's symmetric per-channel rule ``scale = f32(2 * absmax / 254)`` (computed in float64,
  ``quant_utils.compute_scale_zp`` with qmin/qmax -127/127), ``q = clip(round(w / scale), -128, 127)``;
- fp8: ModelOpt converts that int8 scale (``int8_to_fp8``: ``scale * 448 / 127`` in float32), then
  ``q = e4m3fn(clamp(w / scale, -448, 448))`` (round to nearest even, torch's cast), zero point fp8 zeros.

A weight read by a MatMul that is not selected keeps its fp32 initializer (the quantized one is then named
``{w}_quantized``). Everything else in the graph is untouched, so this needs no calibration data: only
GPTQ (which changes the integers, not the format) uses the Hessians of calibration text.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

MODES = ("fp8", "int8")
INT8_QMAX = 127  # onnxruntime's symmetric int8 range is [-127, 127] (compute_scale_zp)


def channel_scales(w: np.ndarray, mode: str) -> np.ndarray:
    """ModelOpt's per-output-channel scale [out] (float32) of an [in, out] fp32 weight."""
    if mode not in MODES:
        raise ValueError(f"weight_dq mode must be one of {MODES}, got {mode!r}")
    rmin = np.minimum(w.min(axis=0), np.float32(0))
    rmax = np.maximum(w.max(axis=0), np.float32(0))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax)).astype(np.float64)
    scale = ((absmax + absmax) / np.float64(2 * INT8_QMAX)).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale)  # an all-zero channel
    if mode == "fp8":
        scale = (scale * np.float32(448.0)) / np.float32(127.0)
    return scale.astype(np.float32)


def quantize_values(w: np.ndarray, scale: np.ndarray, mode: str) -> np.ndarray:
    """[in, out] weight → its stored values: int8, or E4M3 bytes (uint8 view) for fp8."""
    x = w / scale[None, :]
    if mode == "int8":
        return np.clip(np.round(x), -128, 127).astype(np.int8)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clamp(-448, 448)
    return t.to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def _tensor(values: np.ndarray, name: str, mode: str) -> TensorProto:
    if mode == "int8":
        return numpy_helper.from_array(values, name)
    t = numpy_helper.from_array(values, name)  # uint8 bytes → relabelled E4M3
    t.data_type = TensorProto.FLOAT8E4M3FN
    return t


def apply(model: onnx.ModelProto, nodes, mode: str, weights) -> int:
    """Quantize, in ``model``, the weight of every MatMul named in ``nodes``.

    ``weights``: a callable ``initializer name → fp32 [in, out] array`` (the caller reads them from the
    artifact's ``weights.data`` or a staged copy; nothing here loads external data). Returns the number
    of weights quantized. Raises ``ValueError`` for a selected node whose weight is not a 2-D fp32
    initializer."""
    g = model.graph
    want = set(nodes)
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    todo: dict[str, list] = {}
    for n in g.node:
        if n.name in want and n.op_type == "MatMul":
            w = n.input[1]
            if w not in inits or inits[w].data_type != TensorProto.FLOAT or len(inits[w].dims) != 2:
                raise ValueError(f"weight_dq: {n.name} does not read a 2-D fp32 weight initializer ({w!r})")
            todo.setdefault(w, []).append(n)
    new_nodes: dict[int, list] = {}
    order = {id(n): i for i, n in enumerate(g.node)}
    for w, consumers in todo.items():
        arr = np.asarray(weights(w), dtype=np.float32)
        if tuple(arr.shape) != tuple(inits[w].dims):
            raise ValueError(f"weight_dq: {w}: read {arr.shape}, the graph says {list(inits[w].dims)}")
        scale = channel_scales(arr, mode)
        q = quantize_values(arr, scale, mode)
        shared = len(readers.get(w, [])) > len(consumers)  # also read by a node left in fp32
        qname = f"{w}_quantized" if shared else w
        zp = np.zeros(scale.shape, np.int8) if mode == "int8" else np.zeros(scale.shape, np.uint8)
        if shared:
            g.initializer.append(_tensor(q, qname, mode))
        else:
            inits[w].CopyFrom(_tensor(q, w, mode))
        g.initializer.extend([numpy_helper.from_array(scale, f"{w}_scale"), _tensor(zp, f"{w}_zero_point", mode)])
        out = f"{w}_DequantizeLinear_Output"
        dq = helper.make_node("DequantizeLinear", [qname, f"{w}_scale", f"{w}_zero_point"], [out],
                              name=f"{w}_DequantizeLinear", axis=1)
        first = min(order[id(c)] for c in consumers)
        new_nodes.setdefault(first, []).append(dq)
        for c in consumers:
            c.input[1] = out
    if new_nodes:  # each DQ right before its first reader: the node list stays topologically sorted
        merged = []
        for i, n in enumerate(g.node):
            merged.extend(new_nodes.get(i, []))
            merged.append(n)
        del g.node[:]
        g.node.extend(merged)
    return len(todo)
