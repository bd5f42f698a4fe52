"""Load-time rewrites of an artifact's graph for ONNX Runtime's CPU kernels: the same math, node forms that
MLAS runs faster. The artifact on disk keeps the exporter's standard form (TensorRT parses it; hashes stay).

- **Tied lm_head as a prepacked Gemm** (``tied_lm_head_as_gemm``). The exporter writes a tied lm_head as
  ``Transpose(MatMul(embed, Transpose(h)))`` (``artifact.graph_forms.tied_lm_head``: no transposed copy of the
  table on disk). ORT runs that as ``FusedMatMul`` with the [V, d] table as its *left* operand, which it cannot
  prepack: on the demo (V 49,152, d 576, one row) 6.7-6.9 ms a call, 16 GB/s, against 3.7-4.0 ms for
  ``Gemm(h, embed, transB=1)`` whose table MLAS prepacks once at session creation (unprepacked, that Gemm is
  6.4 ms: no slower). So a per-token graph (``PER_TOKEN``) whose session prepacks (``OrtRunner.prepack``: the
  per-token graph of small fp32 artifacts; int4 graphs always) gets the Gemm: demo decode fp32 +4.5 %, int4
  +11 % (39.0 -> 43.3 tok/s) in one A/B. The packed copy costs V x d x 4 bytes (113 MB on the demo) beside the
  table the embedding ``Gather`` still reads, so ``prefill`` (one lm_head row per query) keeps the exported form. Each logit is the same dot product, summed in another order: within fp32
  rounding (tests/runtime/test_ort_rewrite.py).
"""
from __future__ import annotations

import onnx
from onnx import helper

from mplus_deploy.artifact.graph_forms import tied_lm_head

PER_TOKEN = ("decode", "decode_batch")  # graphs run once per generated token


def tied_lm_head_as_gemm(model: onnx.ModelProto) -> int:
    """Rewrite ``model``'s tied lm_head (if any) in place as ``Gemm(h, embed, transB=1)`` → 1 if rewritten, else 0.
    The input Transpose stays only if something else reads it."""
    found = tied_lm_head(model)
    if found is None:
        return 0
    t_in, mm, t_out, h, embed, logits = found
    gemm = helper.make_node("Gemm", [h, embed], [logits], name="/lm_head_tied/Gemm", transB=1)
    t_in_used = any(t_in.output[0] in n.input for n in model.graph.node if n is not mm)
    nodes = []
    for n in model.graph.node:  # the Gemm takes the MatMul's place: h is defined before it, logits used after
        if n is mm:
            nodes.append(gemm)
        elif n is not t_out and (n is not t_in or t_in_used):
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return 1
