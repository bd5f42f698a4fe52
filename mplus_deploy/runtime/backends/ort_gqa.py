"""Load-time rewrite of the ``decode`` graph's attention into ONNX Runtime's fused ``GroupQueryAttention``
over one preallocated KV buffer per layer, written in place (ORT's "past-present share buffer" mode).

Why: the exported step attends over the memory prefix and the tail without concatenating them
(``export.common.attend_split``): per layer ~40 nodes (score MatMuls, softmax, split, value MatMuls, the
tail's Concat). At one query row MLAS packs each [P, Dh] key / value block as a GEMM's B side at every call,
so on the demo (P + C = 705 rows, 30 layers, 32 MB of K/V a step) the attention alone took 7.1-7.6 ms a
token, 4.5 GB/s; ``GroupQueryAttention`` with its past and present bound to one buffer reads the same rows in
3.5 ms and appends the new row in place (the tail is never copied; measured in one process, bench/RESULTS.md).

The rewritten graph's decode contract (``GQA_*`` names below; the artifact's ``decode`` keeps the standard one):

- inputs ``ids``, ``pos`` as before; ``kv_k.{l}`` / ``kv_v.{l}`` [1, Hkv, S, Dh]: the whole cache of layer l
  (memory prefix, then the tail) in the first ``kv_len`` rows of a buffer of S >= kv_len + 1 rows;
  ``kv_len`` (int64 scalar): rows already in the buffer (P + C);
- outputs ``logits`` and ``present_k.{l}`` / ``present_v.{l}``: the same buffers (bound to the inputs' memory
  by the runner), row ``kv_len`` now holding the step's post-RoPE K/V.

The math is the exported one. RoPE moves into the op (``do_rotary``, ``rotary_interleaved`` 0 = rotate_half) when
every layer rotates q and k by the graph's one cos/sin pair: the op reads the graph's own cos/sin row for ``pos``
(repeated to the ``total_sequence_length`` rows the op insists on, read at ``position_ids`` 0), so the angles are
the exported ones bit for bit; ~24 RoPE nodes a layer go (demo int4 step 11.8 -> 11.2 and 13.9 -> 12.3 ms in two
A/Bs); otherwise the op takes the rotated q and k (``do_rotary`` 0). The scale is the graph's constant, softmax in fp32 over every row < kv_len + 1 (rows past it are never read: the buffer
may hold anything there). The op reads q, k and v straight from their projections (``_flat``: the exported
head views, a Reshape and a Transpose each, are one token's memory order). Only summation order differs (tests/runtime/test_ort_gqa.py: logits within fp32
rounding of the standard graph over several steps, greedy tokens equal). ORT only: TensorRT parses the
artifact's standard graph.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mplus_deploy.artifact.graph_io import PAST, PREFIX, PRESENT

GQA_KV = ("kv_k", "kv_v")  # per-layer buffer inputs of the rewritten decode graph
GQA_LEN = "kv_len"  # rows already in the buffers (int64 scalar)
MS = "com.microsoft"


def _scalar(model: onnx.ModelProto, name: str):
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    return None


def _layer(model, prod, cons, l: int, Hkv: int, Dh: int):
    """(q_rot, k_rot, v_new, attn_flat, scale) of layer l, or a reason string when the graph is not the exported form."""
    pk, pv, tk, tv = (f"{PREFIX[0]}.{l}", f"{PREFIX[1]}.{l}", f"{PAST[0]}.{l}", f"{PAST[1]}.{l}")
    cat_k, cat_v = prod.get(f"{PRESENT[0]}.{l}"), prod.get(f"{PRESENT[1]}.{l}")
    if cat_k is None or cat_k.op_type != "Concat" or list(cat_k.input)[:1] != [tk] or len(cat_k.input) != 2:
        return f"layer {l}: present_k is not Concat(past_k, k)"
    if cat_v is None or cat_v.op_type != "Concat" or list(cat_v.input)[:1] != [tv] or len(cat_v.input) != 2:
        return f"layer {l}: present_v is not Concat(past_v, v)"
    k_rot, v_new = cat_k.input[1], cat_v.input[1]
    t_pk = [n for n in cons.get(pk, []) if n.op_type == "Transpose"]
    s_mm = [n for t in t_pk for n in cons.get(t.output[0], []) if n.op_type == "MatMul"]
    if len(s_mm) != 1:
        return f"layer {l}: no single MatMul(q, Transpose(prefix_k))"
    q_resh = prod.get(s_mm[0].input[0])
    if q_resh is None or q_resh.op_type != "Reshape":
        return f"layer {l}: the query of the prefix scores is not a Reshape"
    q_rot = q_resh.input[0]
    scale = None
    for c in cons.get(s_mm[0].output[0], []):  # Concat of both blocks' scores, then Mul by the scale
        for m in cons.get(c.output[0], []):
            if c.op_type == "Concat" and m.op_type == "Mul":
                other = [i for i in m.input if i != c.output[0]]
                val = _scalar(model, other[0]) if other else None
                if val is not None and val.size == 1:
                    scale = float(val.reshape(()))
    if scale is None:
        return f"layer {l}: no constant score scale after the scores' Concat"
    v_mm = [n for n in cons.get(pv, []) if n.op_type == "MatMul"]
    add = [n for m in v_mm for n in cons.get(m.output[0], []) if n.op_type == "Add"]
    if len(add) != 1:
        return f"layer {l}: no single Add of the two value products"
    out_r = [n for n in cons.get(add[0].output[0], []) if n.op_type == "Reshape"]
    if len(out_r) != 1 or len(cons.get(add[0].output[0], [])) != 1:
        return f"layer {l}: the attention output is not one Reshape"
    return q_rot, k_rot, v_new, out_r[0].output[0], scale


def _unrope(prod, x_rot: str):
    """(x, cos, sin) when ``x_rot`` is the exported RoPE ``x * cos + rotate_half(x) * sin`` (rotate_half =
    ``Concat(Neg(x[..., h:]), x[..., :h])``), else None."""
    add = prod.get(x_rot)
    if add is None or add.op_type != "Add":
        return None
    m1, m2 = prod.get(add.input[0]), prod.get(add.input[1])
    if m1 is None or m2 is None or m1.op_type != "Mul" or m2.op_type != "Mul":
        return None
    x, cos = m1.input
    rot, sin = m2.input
    cat = prod.get(rot)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
        return None
    neg, lo = prod.get(cat.input[0]), prod.get(cat.input[1])
    hi = prod.get(neg.input[0]) if neg is not None and neg.op_type == "Neg" else None
    if hi is None or lo is None or hi.op_type != "Slice" or lo.op_type != "Slice" or hi.input[0] != x or lo.input[0] != x:
        return None
    return x, cos, sin


def _flat(prod, x: str) -> str:
    """The projection's own output when ``x`` is its head view ``Transpose(Reshape(y, [1, H, Dh]), [1, 0, 2])`` (the
    batch-free export; ``[0, 2, 1, 3]`` over ``[1, 1, H, Dh]`` with a batch axis):
    at one token that view is ``y``'s memory order, so the op's ``[1, 1, H * Dh]`` input is a Reshape of ``y`` and
    the view's two nodes (the Transpose a copy) go. Else ``x``."""
    t = prod.get(x)
    if t is None or t.op_type != "Transpose":
        return x
    perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
    r = prod.get(t.input[0])
    if perm not in ([1, 0, 2], [0, 2, 1, 3]) or r is None or r.op_type != "Reshape":
        return x
    return r.input[0]


def rewrite(model: onnx.ModelProto, num_heads: int, kv_heads: int, head_dim: int, rotary: bool = True) -> int:
    """Rewrite a ``decode`` graph in place to the GroupQueryAttention form (module docstring) → layers rewritten
    (all of them), or 0 with ``model`` untouched when any layer is not the exported form."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    L = sum(1 for i in g.input if i.name.startswith(PREFIX[0] + "."))
    if L == 0:
        return 0
    found = [_layer(model, prod, cons, l, kv_heads, head_dim) for l in range(L)]
    if any(isinstance(f, str) for f in found):
        return 0
    H, Hkv, Dh = num_heads, kv_heads, head_dim
    # RoPE inside the fused op (do_rotary) when every layer rotates q and k by the same exported cos/sin: the op gets
    # the graph's own [1, Dh] rows for ``pos`` (their first halves: rotate_half repeats the angles) as a one-row
    # cache read at position_ids 0, so the angles are the exported ones bit for bit
    ropes = [(_unrope(prod, f[0]), _unrope(prod, f[1])) for f in found] if rotary else []
    trig = {(q[1], q[2]) for r in ropes for q in r if q is not None}
    rotary = rotary and all(q is not None and k is not None for q, k in ropes) and len(trig) == 1
    new, inits = [], [numpy_helper.from_array(np.array([1, 1, H * Dh], np.int64), "/gqa/q_shape"),
                      numpy_helper.from_array(np.array([1, 1, Hkv * Dh], np.int64), "/gqa/kv_shape"),
                      numpy_helper.from_array(np.array([1, H * Dh], np.int64), "/gqa/out_shape"),
                      numpy_helper.from_array(np.array([1], np.int64), "/gqa/one_shape"),
                      numpy_helper.from_array(np.array(1, np.int64), "/gqa/one")]
    new += [helper.make_node("Cast", [GQA_LEN], ["/gqa/seqlens_k64"], name="/gqa/Cast_len", to=TensorProto.INT32),
            helper.make_node("Reshape", ["/gqa/seqlens_k64", "/gqa/one_shape"], ["/gqa/seqlens_k"], name="/gqa/Reshape_len"),
            helper.make_node("Add", [GQA_LEN, "/gqa/one"], ["/gqa/total64"], name="/gqa/Add_total"),
            helper.make_node("Cast", ["/gqa/total64"], ["/gqa/total"], name="/gqa/Cast_total", to=TensorProto.INT32)]
    rope_in, trig_nodes = [], []
    if rotary:
        cos, sin = next(iter(trig))
        # the op insists on a cache of >= total_sequence_length rows: the one row, repeated (a few KB a step)
        inits += [numpy_helper.from_array(np.array([0], np.int64), "/gqa/half_start"),
                  numpy_helper.from_array(np.array([Dh // 2], np.int64), "/gqa/half_end"),
                  numpy_helper.from_array(np.array([-1], np.int64), "/gqa/last_axis"),
                  numpy_helper.from_array(np.array([1, Dh // 2], np.int64), "/gqa/trig_shape"),
                  numpy_helper.from_array(np.array([Dh // 2], np.int64), "/gqa/half_dim"),
                  numpy_helper.from_array(np.zeros((1, 1), np.int64), "/gqa/position_ids")]
        new += [helper.make_node("Reshape", ["/gqa/total64", "/gqa/one_shape"], ["/gqa/total_1"], name="/gqa/Reshape_total"),
                helper.make_node("Concat", ["/gqa/total_1", "/gqa/half_dim"], ["/gqa/cache_shape"], name="/gqa/Concat_shape",
                                 axis=0)]
        for name, src in (("cos", cos), ("sin", sin)):  # placed before the first layer's attention (after cos/sin)
            trig_nodes += [helper.make_node("Slice", [src, "/gqa/half_start", "/gqa/half_end", "/gqa/last_axis"],
                                     [f"/gqa/{name}_half"], name=f"/gqa/Slice_{name}"),
                    helper.make_node("Reshape", [f"/gqa/{name}_half", "/gqa/trig_shape"], [f"/gqa/{name}_row"],
                                     name=f"/gqa/Reshape_{name}"),
                    helper.make_node("Expand", [f"/gqa/{name}_row", "/gqa/cache_shape"], [f"/gqa/{name}_cache"],
                                     name=f"/gqa/Expand_{name}")]
        rope_in = ["/gqa/cos_cache", "/gqa/sin_cache", "/gqa/position_ids"]
    replaced = set()  # outputs whose old producers go
    per_layer = {}
    for l, (q_rot, k_rot, v_new, attn_flat, scale) in enumerate(found):
        p = f"/layers.{l}/gqa"
        q_in, k_in = (ropes[l][0][0], ropes[l][1][0]) if rotary else (q_rot, k_rot)  # un-rotated when the op rotates
        q_in, k_in, v_in = _flat(prod, q_in), _flat(prod, k_in), _flat(prod, v_new)
        per_layer[attn_flat] = [
            helper.make_node("Reshape", [q_in, "/gqa/q_shape"], [f"{p}/q"], name=f"{p}/Reshape_q"),
            helper.make_node("Reshape", [k_in, "/gqa/kv_shape"], [f"{p}/k"], name=f"{p}/Reshape_k"),
            helper.make_node("Reshape", [v_in, "/gqa/kv_shape"], [f"{p}/v"], name=f"{p}/Reshape_v"),
            helper.make_node("GroupQueryAttention", [f"{p}/q", f"{p}/k", f"{p}/v", f"{GQA_KV[0]}.{l}", f"{GQA_KV[1]}.{l}",
                                                     "/gqa/seqlens_k", "/gqa/total"] + rope_in,
                             [f"{p}/out", f"{PRESENT[0]}.{l}", f"{PRESENT[1]}.{l}"], name=f"{p}/GroupQueryAttention",
                             domain=MS, num_heads=H, kv_num_heads=Hkv, scale=scale, do_rotary=int(rotary),
                             rotary_interleaved=0),
            helper.make_node("Reshape", [f"{p}/out", "/gqa/out_shape"], [attn_flat], name=f"{p}/Reshape_out")]
        replaced |= {attn_flat, f"{PRESENT[0]}.{l}", f"{PRESENT[1]}.{l}"}
    nodes = []
    for n in g.node:
        if any(o in replaced for o in n.output):
            if n.output[0] in per_layer:  # the new attention takes the old output Reshape's place
                nodes += trig_nodes + per_layer[n.output[0]]
                trig_nodes = []
            continue
        nodes.append(n)
    nodes = new + nodes
    graph_outs = {o.name for o in g.output}
    while True:  # drop what only fed the old attention
        used = {i for n in nodes for i in n.input} | graph_outs
        keep = [n for n in nodes if any(o in used for o in n.output)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits + inits)
    ins = [i for i in g.input if not i.name.startswith(PREFIX + PAST)]
    ins.append(helper.make_tensor_value_info(GQA_LEN, TensorProto.INT64, []))
    for l in range(L):
        ins += [helper.make_tensor_value_info(f"{n}.{l}", TensorProto.FLOAT, [1, Hkv, "S", Dh]) for n in GQA_KV]
    del g.input[:]
    g.input.extend(ins)
    for o in g.output:
        if o.name.startswith(PRESENT):
            o.CopyFrom(helper.make_tensor_value_info(o.name, TensorProto.FLOAT, [1, Hkv, "S", Dh]))
    del g.value_info[:]
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return L


def aliases(L: int) -> dict[str, str]:
    """Output → input the runner binds to the same memory (the in-place KV append)."""
    return {f"{PRESENT[c]}.{l}": f"{GQA_KV[c]}.{l}" for l in range(L) for c in (0, 1)}


def _tensor(v):
    import torch

    return v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v.numpy() if hasattr(v, "numpy") else v))


def standard_call(run, feeds: dict, keep: tuple, L: int, place) -> dict:
    """One call in the artifact's decode contract (``prefix_*``/``past_*`` in, the grown tail out) on the
    rewritten graph: the layer's rows copied into a buffer of P + C + 1 rows, ``run`` (the fused graph with its
    outputs aliased) and the tail + new row sliced back out; outputs named in ``keep`` placed (``place``). For
    callers that hold their own cache (tests, benches, recorders); the decode loop's ``kvcache.BufferCache``
    feeds the buffers directly and copies nothing."""
    import torch

    f = {"ids": feeds["ids"], "pos": feeds["pos"]}
    bufs = {}
    for l in range(L):
        for c in (0, 1):
            pre, tail = _tensor(feeds[f"{PREFIX[c]}.{l}"]), _tensor(feeds[f"{PAST[c]}.{l}"])
            Hkv, P, Dh = pre.shape
            C = tail.shape[1]
            b = torch.empty(1, Hkv, P + C + 1, Dh, dtype=pre.dtype)
            b[0, :, :P], b[0, :, P : P + C] = pre, tail
            bufs[f"{GQA_KV[c]}.{l}"] = (b, P, C)
    f[GQA_LEN] = torch.tensor(P + C, dtype=torch.int64)
    f.update(place({k: b for k, (b, _, _) in bufs.items()}))
    out = run(f)
    res = {"logits": out["logits"]}
    for l in range(L):
        for c in (0, 1):
            b, P, C = bufs[f"{GQA_KV[c]}.{l}"]
            name = f"{PRESENT[c]}.{l}"
            t = b[0, :, P : P + C + 1].contiguous()
            res[name] = place({name: t})[name] if name in keep else t
    return res
