"""INT4 ``rtn_asym``: asymmetric min/max block quantization (llama.cpp's Q4_1 grid) as ``MatMulNBits``.

Per block of ``block_size`` weights along K (input channels), ``d = (max - min) / 15`` and
``q = round((w - min) / d)`` in 0..15, so ``w ≈ min + d q``: the block's own range, 16 levels, no level
wasted on a sign (symmetric RTN spends half its grid on values the block may not have). ModelOpt's ONNX
int4 is symmetric (``rtn_dq``, AWQ), and ONNX ``DequantizeLinear`` / ORT's ``MatMulNBits`` take only an
*integer* zero point, which cannot represent an arbitrary ``min``; ORT's float zero points are exact but
10x slower than fp32 on CPU (measured: 1.75 ms vs 0.19 ms for a 576x1536 GEMV). So this pass writes

    Y = MatMulNBits(X, q, d)                      # default zero point 8: (q - 8) d, fast MLAS kernels
      + ReduceSum_block(X) @ M,   M[b, n] = min[b, n] + 8 d[b, n]

the offset term being a [T, K/block] x [K/block, N] ``Gemm`` accumulating onto the kernel's output (1/block of
the weight's size). Exact in real arithmetic; in fp32 it reconstructs ``min + d q`` to rounding. MatMuls reading
one input are packed into one node set (``apply(pack=True)``; names: :func:`join_names` / :func:`members`).

**Q4_1-sourced checkpoints.** llama.cpp's Q4_1 is exactly this grid (block 32, ``d = (max-min)/15``,
``m = min``), and dequantized Q4_1 weights have every block's min and max *on* the grid (q = 0 and 15). So
for them this pass is lossless: it recovers the stored 4-bit values. The ``demo`` preset's backbone is
such a GGUF (SmolLM2-135M-Instruct.Q4_1), which is why ``rtn_asym`` is lossless there while symmetric
re-quantization (``rtn_dq``) moves every weight to a different grid (docs/quantization.md). For bf16
checkpoints (the real M+) it is ordinary asymmetric RTN.

Graphs stay batch-free: every quantized MatMul input must be 2-D ``[T, K]`` (checked). ONNX Runtime only:
``com.microsoft.MatMulNBits`` is an ORT contrib op (TensorRT takes the Q/DQ int4 of ``rtn_dq``).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mplus_deploy.artifact.graph_forms import join_names, members, tied_lm_head

from .q8_blocks import input_uses, install

METHOD = "rtn_asym"
MS_DOMAIN = "com.microsoft"


def quantize_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[K, N] fp32 weight → (q uint8 [N, K/block, block] in 0..15, d fp32 [N, K/block], min fp32 [N, K/block])."""
    K, N = w.shape
    if K % block:
        raise ValueError(f"int4 block size {block} does not divide the input size {K}")
    b = w.T.reshape(N, K // block, block).astype(np.float64)
    mn, mx = b.min(-1), b.max(-1)
    d = (mx - mn) / 15.0
    safe = np.where(d > 0, d, 1.0)
    q = np.where(d[..., None] > 0, np.rint((b - mn[..., None]) / safe[..., None]), 0.0)
    return np.clip(q, 0, 15).astype(np.uint8), d.astype(np.float32), mn.astype(np.float32)


def on_grid(w: np.ndarray, block: int = 32) -> bool:
    """Whether a [K, N] weight already lies on an asymmetric 4-bit block grid (e.g. dequantized Q4_1):
    then ``rtn_asym`` is lossless and symmetric re-quantization is not."""
    if w.ndim != 2 or w.shape[0] % block:
        return False
    q, d, mn = quantize_blocks(w, block)
    return bool(np.abs(dequantize(q, d, mn) - w).max() <= 1e-6 * max(float(np.abs(w).max()), 1e-30))


def dequantize(q: np.ndarray, d: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The weight the rewritten graph multiplies by, [K, N] (for tests and reports)."""
    N, nb, block = q.shape
    return (mn[..., None] + d[..., None] * q.astype(np.float32)).reshape(N, nb * block).T


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [N, K/block, block] → MatMulNBits' B [N, K/block, block/2]: element 2i in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


def apply(model: onnx.ModelProto, nodes, block_size: int = 32, accuracy_level: int = 4, base_dir: str = "",
          weights=None, pack: bool = True) -> int:
    """Rewrite the listed weight MatMuls of ``model`` in place (weights loaded, or external data read from
    ``base_dir`` one tensor at a time; ``weights``: a provider ``name → array`` for the names it contains, e.g.
    the deferred LoRA-folded weights of ``artifact.lora_merge.merge(defer=True)``). → number rewritten.

    ``pack``: the listed MatMuls that read the same input (a layer's q/k/v, gate/up) become one ``MatMulNBits``
    over their concatenated columns, one block-offset ``Gemm`` and a ``Split`` back to their outputs (each output
    column is the same dot product as alone: tests/calibration/test_asym_int4.py); at one row per decode step
    7 -> 4 weight nodes and 21 -> 12 offset nodes a layer. ``pack=False`` writes one node set per MatMul."""
    want = set(nodes)
    inits = {i.name: i for i in model.graph.initializer}
    uses = input_uses(model)
    ranks = _ranks(model)
    picked = []
    for node in model.graph.node:
        if node.name in want and node.op_type == "MatMul" and node.input[1] in inits:
            if ranks.get(node.input[0]) != 2:
                raise ValueError(f"int4 rtn_asym: {node.name}: input {node.input[0]!r} must be 2-D [T, K] "
                                 f"(rank {ranks.get(node.input[0])})")
            picked.append(node)
    if not picked:
        return 0
    groups: dict[str, list] = {}  # input -> its MatMuls (one group each when not packing)
    for node in picked:
        groups.setdefault(node.input[0] if pack else node.name, []).append(node)
    first = {id(g[0]): g for g in groups.values()}
    gone = {id(n) for n in picked}
    shape_name = f"/int4_asym/block_shape_{block_size}"
    new_nodes, new_inits, dead, block_sums = [], [], set(), {}
    for node in model.graph.node:
        if id(node) not in gone:
            new_nodes.append(node)
            continue
        group = first.get(id(node))
        if group is None:
            continue  # emitted with its group's first member
        x = node.input[0]
        qs, ds, ms, Ns, bases = [], [], [], [], []
        for n in group:
            wname = n.input[1]
            w = (weights(wname) if weights is not None and wname in weights
                 else numpy_helper.to_array(inits[wname], base_dir=str(base_dir))).astype(np.float32)
            if w.ndim != 2:
                raise ValueError(f"int4 rtn_asym: {n.name}: weight must be 2-D, got {w.shape}")
            q, d, mn = quantize_blocks(w, block_size)
            K = w.shape[0]
            qs.append(pack_nibbles(q))
            ds.append(d)
            ms.append((mn + 8.0 * d).T.astype(np.float32))  # [K/block, N]
            Ns.append(w.shape[1])
            bases.append(n.name[: -len("/MatMul")] if n.name.endswith("/MatMul") else n.name)
            del w, q
            uses[wname] -= 1
            if uses[wname] == 0:
                dead.add(wname)
        base = join_names(bases)
        b_name, s_name, m_name = f"{base}/int4.B", f"{base}/int4.scales", f"{base}/int4.offset"
        new_inits += [numpy_helper.from_array(np.concatenate(qs, 0), b_name),
                      numpy_helper.from_array(np.concatenate([d.reshape(-1) for d in ds]), s_name),
                      numpy_helper.from_array(np.concatenate(ms, 1), m_name)]
        del qs, ds, ms
        if x not in block_sums:
            r_out, s_out = f"{x}/block_sum/Reshape_output", f"{x}/block_sum/ReduceSum_output"
            tag = f"/int4_asym/block_sum_{len(block_sums)}"
            new_nodes += [helper.make_node("Reshape", [x, shape_name], [r_out], name=f"{tag}/Reshape"),
                          helper.make_node("ReduceSum", [r_out, "/int4_asym/last_axis"], [s_out], name=f"{tag}/ReduceSum",
                                           keepdims=0)]
            block_sums[x] = s_out
        y_main = f"{base}/MatMulNBits_output"
        y = group[0].output[0] if len(group) == 1 else f"{base}/block_offset/Gemm_output"
        new_nodes += [helper.make_node("MatMulNBits", [x, b_name, s_name], [y_main], name=f"{base}/MatMulNBits",
                                       domain=MS_DOMAIN, K=K, N=sum(Ns), bits=4, block_size=block_size,
                                       accuracy_level=accuracy_level),
                      # Y = X @ W + ReduceSum_block(X) @ M, the offset term accumulated onto the MatMulNBits output
                      helper.make_node("Gemm", [block_sums[x], m_name, y_main], [y], name=f"{base}/block_offset/Gemm")]
        if len(group) > 1:
            sizes = f"{base}/split_sizes"
            new_inits.append(numpy_helper.from_array(np.array(Ns, np.int64), sizes))
            new_nodes.append(helper.make_node("Split", [y, sizes], [n.output[0] for n in group], name=f"{base}/Split",
                                              axis=-1))
    new_inits += [numpy_helper.from_array(np.array([0, -1, block_size], np.int64), shape_name),
                  numpy_helper.from_array(np.array([-1], np.int64), "/int4_asym/last_axis")]
    install(model, new_nodes, new_inits, dead)
    return len(picked)


def apply_tied_lm_head(model: onnx.ModelProto, block_size: int = 32, accuracy_level: int = 4, base_dir: str = "",
                       bits: int = 4) -> int:
    """``--quantize-lm-head`` for a tied lm_head (``tied_lm_head``): the logits become ``MatMulNBits(h, q(embed^T))``
    from a quantized copy of the transposed table; the fp32 table stays for the embedding ``Gather``.
    ``bits=4``: this module's asymmetric grid plus its block-offset term (V x d / 2 bytes + scales);
    ``bits=8``: the symmetric Q8_0 grid of :mod:`.q8_blocks` (V x d bytes + scales, no offset term).
    → 1 if rewritten, else 0."""
    if bits not in (4, 8):
        raise ValueError(f"tied lm_head: bits must be 4 or 8, got {bits}")
    found = tied_lm_head(model)
    if found is None:
        return 0
    t_in, mm, t_out, h, wname, out = found
    init = next(i for i in model.graph.initializer if i.name == wname)
    w_t = numpy_helper.from_array(numpy_helper.to_array(init, base_dir=str(base_dir)).astype(np.float32).T.copy(),
                                  "/lm_head_tied/weight.T")
    tmp = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", [h, w_t.name], [out], name="/lm_head_tied/MatMul")], "lm_head_tied",
        [helper.make_tensor_value_info(h, onnx.TensorProto.FLOAT, ["T", int(init.dims[1])])],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)], [w_t]), opset_imports=list(model.opset_import))
    if bits == 8:
        from . import q8_blocks

        done = q8_blocks.apply(tmp, ["/lm_head_tied/MatMul"], block_size, accuracy_level)
    else:
        done = apply(tmp, ["/lm_head_tied/MatMul"], block_size, accuracy_level)
    if done != 1:
        return 0
    for n in tmp.graph.node:  # unique names beside the main pass's block sums
        if n.name.startswith("/int4_asym/block_sum_"):
            n.name = "/lm_head_tied/block_sum/" + n.name.rsplit("/", 1)[-1]
    t_in_used = any(t_in.output[0] in n.input for n in model.graph.node if n is not mm)
    names = {i.name for i in model.graph.initializer}
    new_inits = [i for i in tmp.graph.initializer if i.name not in names]
    nodes = []
    for n in model.graph.node:  # the int4 nodes take the MatMul's place: h is defined before, logits used after
        if n is mm:
            nodes.extend(tmp.graph.node)
        elif n is not t_out and (n is not t_in or t_in_used):
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return 1


def nbits_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls this pass replaced (each member of every ``MatMulNBits`` node, ``/MatMul`` appended)."""
    return [m + "/MatMul" for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.endswith("/MatMulNBits")
            for m in members(n.name[: -len("/MatMulNBits")])]
