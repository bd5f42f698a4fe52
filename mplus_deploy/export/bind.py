"""Bind a weightless traced graph to its weights (docs/design-export.md "Streaming export").

TorchScript traces the wrapper with ``export_params=False, keep_initializers_as_inputs=True``, so every
parameter is a graph input named after the wrapper's state dict and the proto holds no weight bytes.
:func:`bind_weights` turns each such input into an initializer in the shared external-data file:

- a parameter read only through ``Transpose(perm=[1, 0])`` (``nn.Linear`` becomes ``MatMul(x, W^T)``) is
  stored transposed and the Transpose disappears (what the exporter's constant folding did, without
  ever holding the model);
- ``storage`` != the traced dtype (``--precision bf16``: bf16 bytes, fp32 math): each weight gets one
  ``Cast`` to the compute dtype in front of its consumers, except a ``Gather`` reading it as data
  (embeddings, per-layer ``bos_embedding`` rows), whose *output* is cast instead, so a 128256-row table is
  never converted whole.

Weights are produced one at a time by the caller's ``sources`` and written once per (source key,
transposed, dtype) by the ``WeightStore``: every graph that reads a tensor points at the same bytes.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import onnx
import torch
from onnx import TensorProto, helper

from .dedupe import WeightStore

TORCH_TO_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                 torch.bfloat16: TensorProto.BFLOAT16, torch.float64: TensorProto.DOUBLE,
                 torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32}

Source = tuple[str, Callable[[], torch.Tensor]]  # (dedupe key, producer of the CPU tensor)


def _init_name(input_name: str, key: str) -> str:
    """Initializers are named by their official checkpoint key (``model.layers.3.self_attn.q_proj.base_layer
    .weight``, ``.T`` when stored transposed); derived ones (stacked retriever weights) by the wrapper's."""
    return input_name if key.startswith(("stack:", "rows:")) else key


def _is_t2d(node: onnx.NodeProto) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm == [1, 0]


def bind_weights(mp: onnx.ModelProto, sources: dict[str, Source], store: WeightStore,
                 storage: torch.dtype | None = None) -> dict:
    """Replace the graph inputs named in ``sources`` by external initializers (in place). ``storage``: the
    float dtype to store (default: as produced). Returns ``{"bound": n, "cast": n}``."""
    g = mp.graph
    bound = [i.name for i in g.input if i.name in sources]
    renamed = {name: _init_name(name, sources[name][0]) for name in bound}
    missing = sorted(set(sources) - {i.name for i in g.input})
    if missing:  # a source the tracer dropped (unused parameter): nothing to bind
        for m in missing:
            sources.pop(m)
    users: dict[str, list] = defaultdict(list)
    for n in g.node:
        for slot, x in enumerate(n.input):
            if x in sources:
                users[x].append((n, slot))
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    inits: list[TensorProto] = []
    for name in bound:
        key, produce = sources[name]
        cons = users[name]
        tr = [n for n, _ in cons if _is_t2d(n)]
        plain = [c for c in cons if not _is_t2d(c[0])]
        for suffix, transpose in (("", False), (".T", True)):
            if (transpose and not tr) or (not transpose and not plain):
                continue

            def make(produce=produce):
                t = produce()
                return t.to(storage) if storage is not None and t.dtype.is_floating_point else t

            entry = store.put((key, transpose, str(storage)), make, transpose=transpose)
            inits.append(store.tensor_proto(_init_name(name, key) + suffix, entry))
        for n in tr:
            rename[n.output[0]] = _init_name(name, key) + ".T"
            dropped.add(id(n))
    rename.update({k: v for k, v in renamed.items() if k != v})
    keep = [n for n in g.node if id(n) not in dropped]
    for n in keep:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    del g.node[:]
    g.node.extend(keep)
    names = set(bound)
    kept_inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(kept_inputs)
    g.initializer.extend(inits)
    gone = set(rename)
    kept_vi = [v for v in g.value_info if v.name not in gone]
    del g.value_info[:]
    g.value_info.extend(kept_vi)
    casts = 0
    compute = _traced_float(mp)
    if storage is not None and TORCH_TO_ONNX[storage] != compute:
        casts = insert_compute_casts(mp, {t.name for t in inits if t.data_type == TORCH_TO_ONNX[storage]}, compute)
    return {"bound": len(inits), "cast": casts}


def _traced_float(mp: onnx.ModelProto) -> int:
    """The float type the graph was traced in (its first float input or output)."""
    for v in list(mp.graph.input) + list(mp.graph.output):
        et = v.type.tensor_type.elem_type
        if et in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            return et
    return TensorProto.FLOAT


def insert_compute_casts(mp: onnx.ModelProto, stored: set[str], compute: int) -> int:
    """One ``Cast(to=compute)`` per stored initializer, placed before its first consumer; a ``Gather`` that
    reads it as data is cast on its output instead (the table stays in storage precision)."""
    g = mp.graph
    out: list[onnx.NodeProto] = []
    cast_of: dict[str, str] = {}
    n_cast = 0
    for n in g.node:
        if n.op_type == "Gather" and n.input[0] in stored:
            raw = n.output[0] + "/stored"
            final = n.output[0]
            n.output[0] = raw
            out.append(n)
            out.append(helper.make_node("Cast", [raw], [final], to=compute, name=f"{n.name or final}/cast"))
            n_cast += 1
            continue
        for i, x in enumerate(n.input):
            if x in stored:
                if x not in cast_of:
                    cast_of[x] = x + "/cast"
                    out.append(helper.make_node("Cast", [x], [cast_of[x]], to=compute, name=f"/cast/{x}"))
                    n_cast += 1
                n.input[i] = cast_of[x]
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    return n_cast
