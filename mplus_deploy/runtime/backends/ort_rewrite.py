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
- **LoRA folded into the base weights** (``fold_lora``; opt-in, ``Engine(..., fold_lora=True)``). The same per-token
  graph runs each LoRA target as ``x @ W + s * ((x @ A) @ B)``: at one row per step the two rank-r MatMuls, the
  Mul and the Add are ~12 nodes per layer of pure dispatch (360 of the demo decode's 1,812). Folded at load,
  ``W' = W + s * A @ B`` (``artifact.lora_merge``, computed in fp64 and rounded once; spec §10.4 calls the merged
  sets exact), embedded in the session's model: demo fp32 decode 28.3 -> 31.2 tok/s (+10 %, one A/B, the
  tied-lm_head Gemm in both), tokens equal. The cost is memory: ORT keeps the embedded W' beside its packed
  copy, while the other graphs keep reading the shared W, so the demo's process grows by ~350 MiB (1.80 -> 2.15
  GiB after a generation; measured with ``session.use_device_allocator_for_initializers`` too, no change).
  It is not the default because it moves numbers past the export's validation: the shipped demo's trained LoRA
  amplifies the changed rounding through 30 layers to 4.8e-3 max abs on the decode logits (scale 32.9, tolerance
  1e-4 x scale; 1.4e-3 unfolded), so the validated path stays the default (tests compare the fold at 1e-5 on tiny). fp32 graphs only (a quantized graph's weights are not fp32; ``--int4``'s default scheme folds before
  quantizing), and only up to ``FOLD_MAX_BYTES`` of folded weights (they travel in the protobuf, 2 GiB at most).
"""
from __future__ import annotations

import onnx
from onnx import helper

from pathlib import Path

from mplus_deploy.artifact.graph_forms import tied_lm_head
from mplus_deploy.artifact.lora_merge import merge

PER_TOKEN = ("decode", "decode_batch")  # graphs run once per generated token
FOLD_MAX_BYTES = 1 << 30  # folded fp32 weights embedded in one session's protobuf
LORA_BASE = "/base_layer/"  # the exporter's node names of a LoRA target's base MatMul (PEFT layout)


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


def fold_lora(model: onnx.ModelProto, base_dir) -> int:
    """Fold every LoRA branch of ``model`` into its base weight (``artifact.lora_merge.merge``, weights read from
    ``base_dir``), the folded weights embedded in ``model`` → number folded; 0 (``model`` untouched) when they would
    exceed ``FOLD_MAX_BYTES``."""
    inits = {i.name: i for i in model.graph.initializer}
    names = [n.name for n in model.graph.node
             if n.op_type == "MatMul" and LORA_BASE in n.name and len(n.input) == 2 and n.input[1] in inits]
    nbytes = 0
    for n in model.graph.node:
        if n.name in names:
            d = inits[n.input[1]].dims
            nbytes += 4 * (d[0] * d[1] if len(d) == 2 else 0)
    if not names or nbytes > FOLD_MAX_BYTES:
        return 0
    return merge(model, names, base_dir=str(base_dir))


def per_token_graph(path: Path, fold: bool, gemm: bool = True, gqa: tuple | None = None
                    ) -> tuple[onnx.ModelProto | None, list[str]]:
    """The rewrites of a per-token graph: LoRA folding (``fold``), the tied lm_head Gemm (``gemm``: prepacked
    sessions), the fused attention over one in-place KV buffer (``gqa`` = (heads, kv heads, head dim):
    :mod:`.ort_gqa`, ``decode`` only) → (the rewritten model, or None if nothing applied; what was done, for
    ``OrtRunner.describe``: ``gqa_attention:<layers>`` changes the graph's decode contract). External weights
    stay references into the graph's folder."""
    model = onnx.load(str(path), load_external_data=False)
    done = []
    if fold:
        k = fold_lora(model, Path(path).parent)
        if k:
            done.append(f"lora_folded:{k}")
    if gemm and tied_lm_head_as_gemm(model):
        done.append("tied_lm_head_gemm")
    if gqa is not None:
        from .ort_gqa import rewrite

        k = rewrite(model, *gqa)
        if k:
            done.append(f"gqa_attention:{k}")
    return (model if done else None), done
