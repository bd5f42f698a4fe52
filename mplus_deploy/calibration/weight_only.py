"""Weight-only FP8 / INT8 (``weight_only``, ``--quant-weight-only``): ModelOpt's Q/DQ graph without the
activation Q/DQ pairs.

ModelOpt's ONNX FP8/INT8 is W8A8: a static per-tensor ``QuantizeLinear → DequantizeLinear`` on every quantized
MatMul input plus per-channel weights. On the demo the activation side costs most of the accuracy (docs/
quantization.md: int8 with GPTQ, every layer, 0.922 W8A8 vs 0.990 weights only, simulated), because one
static scale per tensor cannot cover SmolLM2's massive per-token activations. ModelOpt has no weight-only
FP8/INT8 ONNX mode, so this pass removes the activation pair after ModelOpt: each quantized MatMul reads the
activation the ``QuantizeLinear`` read, and the weight keeps its ``DequantizeLinear`` (W8A16 / W8A32).
TensorRT runs DQ-on-weights-only as weight-only quantization (smaller weights, fp16/fp32 math); on ORT CPU
it is DQ + fp32 MatMul. It changes the issue's scheme (per-tensor activations), so it is opt-in and recorded
in the manifest and report.
"""
from __future__ import annotations

import onnx


def strip_activation_qdq(model: onnx.ModelProto, nodes) -> int:
    """Rewire the listed MatMuls around their input ``Q → DQ`` pair; drop pairs (and their scale / zero-point
    initializers) nothing reads any more. Returns the number of MatMuls rewired."""
    g = model.graph
    want = set(nodes)
    prod = {o: n for n in g.node for o in n.output}
    pairs: dict[str, str] = {}  # activation DQ output -> the tensor its Q read
    done = 0
    for node in g.node:
        if node.name not in want or node.op_type not in ("MatMul", "Gemm"):
            continue
        dq = prod.get(node.input[0])
        q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        pairs[dq.output[0]] = q.input[0]
        done += 1
    for node in g.node:  # every reader of the pair (the LoRA branch reads the same activation) gets the original
        for i, name in enumerate(node.input):
            if name in pairs:
                node.input[i] = pairs[name]
    while True:  # remove Q/DQ nodes whose outputs are unused (DQ first, then its Q)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return done


def activation_qdq_count(model: onnx.ModelProto) -> int:
    """QuantizeLinear nodes left in the graph (0 after :func:`strip_activation_qdq` of every quantized MatMul)."""
    return sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
