"""Per-input-channel scaling before quantization: SmoothQuant (fp8/int8) and AWQ-style (int4) (issue 7).

ModelOpt 0.47's ONNX PTQ has no SmoothQuant for INT8/FP8 and its AWQ costs ~6 s per MatMul on this CPU,
so this pass is ours. For a MatMul ``Y = X @ W`` (W [in, out]) it rewrites the graph to
``Y = (X * (1/s)) @ (s[:, None] * W)`` — the same function — with one ``s`` per input channel:

    s_j = amax(X_j)^alpha / amax(W_j)^(1 - alpha)      (SmoothQuant, Xiao et al. 2023)

so activation outlier channels shrink before the per-tensor activation scale is chosen (fp8/int8), or the
channels that carry large activations get finer weight quantization steps (int4 weight-only, as AWQ's
scaling does; we fix alpha instead of searching it per layer). ``amax(X_j)`` comes from the torch
reference on calibration text (:func:`channel_amax`); the Mul is a separate fp32 node, never folded into
the preceding RMSNorm, because the same normed rows also feed the unquantized LoRA branches and the
retriever projectors. ModelOpt then calibrates and quantizes the *scaled* graph as usual.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .sensitivity import channel_amax, targets

NODE_RX = re.compile(r"^/layers\.(\d+)/(?:mlp/)?(?:bos/)?(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/"
                     r"(?:base_layer/)?MatMul$")
DEFAULT_ALPHA = {"fp8": None, "int8": 0.7, "int4": 0.7}  # measured on the demo (docs/quantization.md)


GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up",
          "o_proj": "o_proj", "down_proj": "down_proj"}  # modules that read the same activation share one s


def group_of(module: str) -> str:
    i, name = module.split(".")[1:]
    return f"layers.{i}.{GROUPS[name]}"


def smooth_scales(model, amax: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``s`` [in] per target module, one tensor per group of modules reading the same activation (q/k/v,
    gate/up): ``amax(W_j)`` is the max over the group. s = 1 where a channel never fired."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    lins = targets(model)
    groups: dict[str, list[str]] = {}
    for n in lins:
        if n in amax:
            groups.setdefault(group_of(n), []).append(n)
    out = {}
    for members in groups.values():
        xa_raw = torch.stack([amax[n] for n in members]).amax(0)
        xa = xa_raw.clamp_min(1e-5)
        wa = torch.stack([lins[n].weight.detach().abs().amax(0).float() for n in members]).amax(0).clamp_min(1e-5)
        s = (xa ** alpha / wa ** (1.0 - alpha)).clamp(1e-4, 1e4)
        s = torch.where(xa_raw > 0, s, torch.ones_like(s))
        for n in members:
            out[n] = s
    return out


def module_of(node_name: str) -> str | None:
    m = NODE_RX.match(node_name)
    return f"layers.{m.group(1)}.{m.group(2)}" if m else None


def apply(model: onnx.ModelProto, scales: dict[str, torch.Tensor], nodes) -> int:
    """Scale the MatMuls named in ``nodes`` (those with a scale) in place; → number rewritten.

    Weights must be embedded initializers (the staged copy). Each rewritten MatMul gets its own scaled
    weight (a weight shared with an unscaled consumer stays untouched); MatMuls reading the same
    activation with the same ``s`` share one ``Mul``.
    """
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    muls: dict[tuple[str, str], str] = {}
    new_nodes: list[tuple[int, onnx.NodeProto]] = []
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    done = 0
    for name in nodes:
        mod = module_of(name)
        node = by_name.get(name)
        if mod is None or mod not in scales or node is None or node.input[1] not in inits:
            continue
        s = scales[mod].numpy().astype(np.float32)
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.shape[0] != s.shape[0]:
            raise ValueError(f"{name}: weight {w.shape} does not match {s.shape[0]} channel scales of {mod}")
        w_name = f"{node.input[1]}.smooth.{done}"
        model.graph.initializer.append(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), w_name))
        key = (node.input[0], group_of(mod))
        if key not in muls:
            inv = f"{name}/smooth/inv_s"
            model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
            out = f"{name}/smooth/x"
            new_nodes.append((order[name], helper.make_node("Mul", [node.input[0], inv], [out], name=f"{name}/smooth/Mul")))
            muls[key] = out
        node.input[0], node.input[1] = muls[key], w_name
        done += 1
    # insert each Mul right before its first consumer (keeps the node list topologically sorted)
    for idx, mul in sorted(new_nodes, key=lambda t: t[0], reverse=True):
        model.graph.node.insert(idx, mul)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


def prepare(model, enc, texts, alpha: float, max_tokens: int = 128, prompt_len: int | None = None) -> dict:
    """Activation statistics and scales for :func:`apply` (one pass of the reference over ``texts``: memorize
    ``max_tokens`` tokens, prefill ``prompt_len``)."""
    ch = channel_amax(model, enc, texts, max_tokens, prompt_len)
    return {"alpha": float(alpha), "texts": len(texts), "max_tokens": int(max_tokens), "modules": len(ch),
            "channel_amax": ch, "scales": smooth_scales(model, ch, alpha)}


def apply_file(path, scales: dict[str, torch.Tensor], nodes) -> int:
    """:func:`apply` on a self-contained ONNX file, rewritten in place."""
    m = onnx.load(str(path), load_external_data=True)
    n = apply(m, scales, nodes)
    onnx.save_model(m, str(path))
    return n
