"""ONNX side of the retrieval plugins: custom-op schemas (domain ``mplus``), the standard-op lowering,
graph-surgeon fuse/lower passes, and CPU oracles (``onnx.reference`` ops, onnxruntime-extensions ops).

Custom nodes (TensorRT plugin hook, platform-notes §4.5): op_type = plugin name, domain = ``mplus``,
string attributes ``plugin_namespace="mplus"``, ``plugin_version="1"``.

* ``mplus::TopKRetrieve(q f32[T,D], keys f32[S,D], valid_len i64[1], ages i64[S][, merged_len i64[1]])
  -> indices i64[k]``, attrs ``k``, ``score_chunks`` (optional, a hint: row blocks of the keys, i.e. column
  blocks of the [T, S] score matrix, in the standard-op lowering, R7; kernels stream anyway).
  ``merged_len`` (default ``valid_len``): rows past it are pending rows, ignored by the small-LTM branch
  (``retrieval.select``).
* ``mplus::MemoryGather(pool, indices i64[k]) -> rows``, attr ``axis`` (default 0): ``pool`` [N, H] → [k, H]
  on axis 0; the prefill gathers axis 1 of the per-layer LTM K/V [Hkv, S, Dh] → [Hkv, k, Dh].

The lowered (standard-op) form handles both branches in-graph: scores masked to -inf past
``valid_len`` and padded with k more -inf (so TopK never sees fewer than k entries), TopK, ascending
sort (TopK largest=0 on the indices), the cyclic small-LTM list ``(arange(k) - k + m*k) mod m``
(``m = max(merged_len, 1)``) selected by ``Where(merged_len < k)``, then the stable oldest-first order as
``TopK(largest=1)`` of the unique composite key ``age * k + position``. Requires integer ages.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import helper
from onnx.defs import OpSchema

from .reference import memory_gather, topk_retrieve

DOMAIN = "mplus"
PREFIX = "mplus_retrieval"  # name prefix of the nodes of one lowered retrieval (what fuse matches)
OPSET = 18


def register_schemas() -> None:
    """Register the two custom-op schemas with onnx (idempotent)."""
    if onnx.defs.has("TopKRetrieve", DOMAIN):
        return
    ATTR = OpSchema.Attribute
    AT = OpSchema.AttrType
    P = OpSchema.FormalParameter
    common = [ATTR("plugin_namespace", AT.STRING, "TensorRT plugin namespace", required=False),
              ATTR("plugin_version", AT.STRING, "TensorRT plugin version", required=False)]
    onnx.defs.register_schema(OpSchema(
        "TopKRetrieve", DOMAIN, 1,
        doc="M+ LTM retrieval: mean_T sigmoid(q keys^T) over keys[:valid_len], top-k (ties: lower index), "
            "ascending, then oldest first by ages (stable); valid_len < k: cyclic fill then age order.",
        inputs=[P("q", "T", ""), P("keys", "T", ""), P("valid_len", "tensor(int64)", ""), P("ages", "tensor(int64)", ""),
                P("merged_len", "tensor(int64)", "", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[P("indices", "tensor(int64)", "")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[ATTR("k", AT.INT, "rows to retrieve", required=True),
                    ATTR("score_chunks", AT.INT, "row blocks of the keys in the lowering", required=False),
                    *common],
    ))
    onnx.defs.register_schema(OpSchema(
        "MemoryGather", DOMAIN, 1, doc="rows = pool[indices]",
        inputs=[P("pool", "T", ""), P("indices", "tensor(int64)", "")],
        outputs=[P("rows", "T", "")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[ATTR("axis", AT.INT, "the pool axis the indices pick (default 0)", required=False), *common],
    ))


register_schemas()


# ---------------------------------------------------------------- standard-op lowering (graph surgeon)
def _c(name: str, value) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))


def emit_standard(graph: gs.Graph, q, keys, valid_len, ages, out: gs.Variable, k: int, tag: str, merged_len=None,
                  chunks: int = 1) -> None:
    """Append the standard-op retrieval subgraph writing ``out`` (int64 [k]) to ``graph``; ``merged_len``:
    see the module docstring; ``chunks``: the scores in that many row blocks of ``ceil(S / chunks)`` keys
    (each key scored exactly as unchunked; trailing blocks may be empty)."""
    p = f"{PREFIX}/{tag}/"
    nodes = graph.nodes

    def op(kind, inputs, n_out=1, dtype=None, **attrs):
        i = sum(1 for n in nodes if n.name.startswith(p))
        outs = [gs.Variable(f"{p}{kind}_{i}_o{j}", dtype=dtype) for j in range(n_out)]
        nodes.append(gs.Node(kind, f"{p}{kind}_{i}", attrs=attrs, inputs=list(inputs), outputs=outs))
        return outs if n_out > 1 else outs[0]

    qT = op("Transpose", [q], perm=[1, 0])

    def mean_sigmoid(block):  # sigmoid(keys @ q^T) [S_block, T], averaged along T (export.retriever.mean_sigmoid)
        sg = op("Sigmoid", [op("MatMul", [block, qT])])
        return op("ReduceMean", [sg, _c(p + "axes1", np.array([1], np.int64))], keepdims=0)   # [S_block]

    S = op("Gather", [op("Shape", [keys]), _c(p + "zero", np.int64(0))], dtype=np.int64)
    if chunks <= 1:
        mean = mean_sigmoid(keys)
    else:
        c = op("Div", [op("Add", [S, _c(p + "cm1", np.int64(chunks - 1))]), _c(p + "cn", np.int64(chunks))], dtype=np.int64)
        c1 = op("Reshape", [c, _c(p + "shape1", np.array([1], np.int64))], dtype=np.int64)
        blocks = []
        for i in range(chunks):
            lo = op("Mul", [c1, _c(p + f"b{i}", np.array([i], np.int64))], dtype=np.int64)
            hi = op("Mul", [c1, _c(p + f"b{i + 1}", np.array([i + 1], np.int64))], dtype=np.int64)
            blocks.append(mean_sigmoid(op("Slice", [keys, lo, hi, _c(p + "axis0", np.array([0], np.int64))])))
        mean = op("Concat", blocks, axis=0)
    ar = op("Range", [_c(p + "r0", np.int64(0)), S, _c(p + "r1", np.int64(1))], dtype=np.int64)
    scalar = _c(p + "shape_scalar", np.array([], np.int64))
    vl = op("Reshape", [valid_len, scalar], dtype=np.int64)
    ml = vl if merged_len is None else op("Reshape", [merged_len, scalar], dtype=np.int64)
    valid = op("Less", [ar, vl])
    masked = op("Where", [valid, mean, _c(p + "ninf", np.float32(-np.inf))])
    padded = op("Concat", [masked, _c(p + "pad", np.full(k, -np.inf, np.float32))], axis=0)
    K = _c(p + "K", np.array([k], np.int64))
    _, top = op("TopK", [padded, K], n_out=2, axis=0, largest=1, sorted=1)
    _, asc = op("TopK", [top, K], n_out=2, axis=0, largest=0, sorted=1)   # values of sorting top ascending
    asc = op("Gather", [top, asc], dtype=np.int64)
    # small-LTM branch: cyclic_indices(m, k)[j] = (j - k) mod m over the merged rows (m >= 1: no Mod by zero)
    m = op("Max", [ml, _c(p + "one", np.int64(1))], dtype=np.int64)
    ark = _c(p + "ark", np.arange(k, dtype=np.int64))
    off = op("Sub", [op("Mul", [m, _c(p + "k", np.int64(k))]), _c(p + "k2", np.int64(k))])
    cyc = op("Mod", [op("Add", [ark, off]), m], fmod=0)
    small = op("Less", [ml, _c(p + "k3", np.int64(k))])
    idx = op("Where", [small, cyc, asc], dtype=np.int64)
    sel_ages = op("Gather", [ages, idx], dtype=np.int64)
    key = op("Add", [op("Mul", [sel_ages, _c(p + "k4", np.int64(k))]), ark])   # unique: age*k + position
    _, perm = op("TopK", [key, K], n_out=2, axis=0, largest=1, sorted=1)
    nodes.append(gs.Node("Gather", f"{p}Gather_out", inputs=[idx, perm], outputs=[out]))


def _io(T, S, D):
    q = gs.Variable("q", np.float32, (T, D))
    keys = gs.Variable("keys", np.float32, (S, D))
    vl = gs.Variable("valid_len", np.int64, (1,))
    ages = gs.Variable("ages", np.int64, (S,))
    return q, keys, vl, ages


def build_retrieval_model(k: int, D: int, T="T", S="S", with_gather: bool = False, H="H", custom: bool = False,
                          merged: bool = False, chunks: int = 1) -> onnx.ModelProto:
    """Test/export graph: (q, keys, valid_len, ages[, merged_len][, pool]) -> indices[, rows]; standard ops by
    default, the custom ``mplus::TopKRetrieve`` / ``MemoryGather`` nodes when ``custom``."""
    q, keys, vl, ages = _io(T, S, D)
    ml = gs.Variable("merged_len", np.int64, (1,)) if merged else None
    idx = gs.Variable("indices", np.int64, (k,))
    g = gs.Graph(inputs=[q, keys, vl, ages] + ([ml] if merged else []), outputs=[idx], opset=OPSET)
    if custom:
        g.nodes.append(_custom_node("TopKRetrieve_0", [q, keys, vl, ages] + ([ml] if merged else []), idx, k, chunks))
    else:
        emit_standard(g, q, keys, vl, ages, idx, k, "0", merged_len=ml, chunks=chunks)
    if with_gather:
        pool = gs.Variable("pool", np.float32, (S, H))
        rows = gs.Variable("rows", np.float32, (k, H))
        g.inputs.append(pool)
        g.outputs.append(rows)
        if custom:
            g.nodes.append(gs.Node("MemoryGather", "MemoryGather_0", domain=DOMAIN, inputs=[pool, idx], outputs=[rows],
                                   attrs=dict(PLUGIN_ATTRS)))
        else:
            g.nodes.append(gs.Node("Gather", "Gather_rows", inputs=[pool, idx], outputs=[rows], attrs={"axis": 0}))
    return _export(g)


PLUGIN_ATTRS = {"plugin_namespace": DOMAIN, "plugin_version": "1"}


def _custom_node(name, inputs, out, k, chunks: int = 1):
    attrs = {"k": int(k), "score_chunks": int(chunks), **PLUGIN_ATTRS}
    return gs.Node("TopKRetrieve", name, domain=DOMAIN, inputs=list(inputs), outputs=[out], attrs=attrs)


def _export(g: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """gs graph → model; ``like``: keep that model's opsets, IR version and producer (a lowered or fused
    artifact graph stays at its own opset), with the ``mplus`` domain imported only while a node uses it."""
    g.cleanup().toposort()
    m = gs.export_onnx(g)
    del m.opset_import[:]
    custom = any(n.domain == DOMAIN for n in m.graph.node)
    if like is None:
        m.opset_import.extend([helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
        m.ir_version = 8
        return m
    m.opset_import.extend(o for o in like.opset_import if o.domain != DOMAIN)
    if custom:
        m.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    m.ir_version, m.producer_name, m.producer_version = like.ir_version, like.producer_name, like.producer_version
    m.graph.name = like.graph.name
    return m


def _from_outside(sub, pick):
    """Variables (not constants) that nodes ``pick`` of ``sub`` read from outside ``sub``, in node order."""
    inner = {id(t) for n in sub for t in n.outputs}
    return [t for n in sub if pick(n) for t in n.inputs if id(t) not in inner and not isinstance(t, gs.Constant)]


def fuse_retrieval(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every lowered retrieval subgraph (nodes named ``mplus_retrieval/<tag>/...``, as emitted by
    :func:`emit_standard`) with one ``mplus::TopKRetrieve`` node."""
    g = gs.import_onnx(model)
    tags = sorted({n.name.split("/")[1] for n in g.nodes if n.name.startswith(PREFIX + "/")})
    for tag in tags:
        p = f"{PREFIX}/{tag}/"
        sub = [n for n in g.nodes if n.name.startswith(p)]
        ops = [n.op for n in sub]
        for need in ("MatMul", "Sigmoid", "ReduceMean", "Where", "TopK", "Mod", "Gather"):
            if need not in ops:
                raise ValueError(f"fuse_retrieval: subgraph {p} lacks a {need} node; not a lowered retrieval")
        q = next(n for n in sub if n.op == "Transpose").inputs[0]  # the scores read q^T (emit_standard)
        keys = next(n for n in sub if n.op == "Shape").inputs[0]
        lens = _from_outside(sub, lambda n: n.op == "Reshape")  # valid_len, then merged_len when it has its own
        ages = next(n for n in sub if n.op == "Gather" and n.inputs[0] in _from_outside(sub, lambda n: n.op == "Gather")
                    and n.inputs[0] is not keys).inputs[0]
        out = next(n for n in sub if n.name == p + "Gather_out").outputs[0]
        k = int(next(n for n in sub if n.op == "TopK").inputs[1].values.reshape(-1)[0])
        chunks = ops.count("Sigmoid")
        for n in sub:
            n.outputs.clear()
        g.nodes = [n for n in g.nodes if not n.name.startswith(p)]
        g.nodes.append(_custom_node(f"TopKRetrieve_{tag}", [q, keys, lens[0], ages, *lens[1:2]], out, k, chunks))
    return _export(g, like=model)


def _tag(name: str, i: int) -> str:
    """A ``PREFIX/<tag>/`` scope for the lowering of node ``name`` (no ``/`` inside the tag)."""
    t = re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")
    return t or f"node{i}"


def has_custom_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in model.graph.node)


def lower_retrieval(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every ``mplus::TopKRetrieve`` node by the standard-op subgraph (:func:`emit_standard`, with
    its ``merged_len`` input and ``score_chunks`` hint) and every ``mplus::MemoryGather`` by
    ``Gather(axis)``. Works on artifact graphs loaded with ``load_external_data=False`` (the external
    weight references are kept as they are); opsets and IR version stay the model's."""
    g = gs.import_onnx(model)
    for i, n in enumerate([n for n in g.nodes if n.domain == DOMAIN]):
        ins, outs = list(n.inputs), list(n.outputs)
        n.inputs.clear()
        n.outputs.clear()
        g.nodes.remove(n)
        if n.op == "TopKRetrieve":
            tag = n.name[len("TopKRetrieve_"):] if n.name.startswith("TopKRetrieve_") else _tag(n.name, i)
            emit_standard(g, *ins[:4], outs[0], int(n.attrs["k"]), tag, merged_len=ins[4] if len(ins) > 4 else None,
                          chunks=int(n.attrs.get("score_chunks", 1)))
        elif n.op == "MemoryGather":
            g.nodes.append(gs.Node("Gather", n.name + "_lowered", inputs=ins, outputs=outs,
                                   attrs={"axis": int(n.attrs.get("axis", 0))}))
        else:
            raise ValueError(f"lower_retrieval: unknown mplus op {n.op}")
    return _export(g, like=model)


# ---------------------------------------------------------------- CPU oracles
def _np_topk_retrieve(q, keys, valid_len, ages, k, merged_len=None):
    out = topk_retrieve(torch.from_numpy(np.asarray(q, np.float32)), torch.from_numpy(np.asarray(keys, np.float32)),
                        int(np.asarray(valid_len).reshape(-1)[0]), torch.from_numpy(np.asarray(ages)), int(k),
                        merged_len=None if merged_len is None else int(np.asarray(merged_len).reshape(-1)[0]))
    return out.numpy().astype(np.int64)


def _np_memory_gather(pool, indices, axis=0):
    return memory_gather(torch.from_numpy(np.ascontiguousarray(pool)), torch.from_numpy(np.asarray(indices, np.int64)),
                         int(axis or 0)).numpy()


def reference_ops() -> list:
    """``onnx.reference.ReferenceEvaluator(model, new_ops=reference_ops())``."""
    from onnx.reference.op_run import OpRun

    class TopKRetrieve(OpRun):
        op_domain = DOMAIN

        def _run(self, q, keys, valid_len, ages, merged_len=None, k=None, score_chunks=None, plugin_namespace=None,
                 plugin_version=None):
            return (_np_topk_retrieve(q, keys, valid_len, ages, k, merged_len),)

    class MemoryGather(OpRun):
        op_domain = DOMAIN

        def _run(self, pool, indices, axis=None, plugin_namespace=None, plugin_version=None):
            return (_np_memory_gather(pool, indices, axis),)

    return [TopKRetrieve, MemoryGather]


_ORTX_DONE = False


def register_ortx_ops() -> None:
    """Register both ops as onnxruntime-extensions Python ops (idempotent)."""
    global _ORTX_DONE
    if _ORTX_DONE:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    @onnx_op(op_type=f"{DOMAIN}::TopKRetrieve",
             inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_int64],
             outputs=[PyCustomOpDef.dt_int64],
             attrs={"k": PyCustomOpDef.dt_int64, "plugin_namespace": PyCustomOpDef.dt_string,
                    "plugin_version": PyCustomOpDef.dt_string})
    def _topk_retrieve(q, keys, valid_len, ages, **kw):
        return _np_topk_retrieve(q, keys, valid_len, ages, kw["k"])

    @onnx_op(op_type=f"{DOMAIN}::MemoryGather", inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
             outputs=[PyCustomOpDef.dt_float],
             attrs={"plugin_namespace": PyCustomOpDef.dt_string, "plugin_version": PyCustomOpDef.dt_string})
    def _memory_gather(pool, indices, **kw):
        return _np_memory_gather(pool, indices)

    _ORTX_DONE = True


def ort_session(model: onnx.ModelProto, custom: bool = False):
    """CPU ORT session; with ``custom`` the extensions library (and our Python ops) is loaded."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if custom:
        from onnxruntime_extensions import get_library_path

        register_ortx_ops()
        so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
