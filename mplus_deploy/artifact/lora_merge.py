"""Fold a graph's LoRA branches into its base weights: ``W' = W + s * A @ B`` (spec §10.4, R3: an exact rewrite).

Two users: quantization folds before quantizing (``calibration``, ``merge_lora``; issue 7), and the ONNX Runtime
runner folds the fp32 per-token graph it prepacks at load (``runtime.backends.ort_rewrite.fold_lora``). Here
because both may import ``artifact`` and neither may import the other (docs/design.md, the dependency rule).

The exported graphs keep LoRA as separate low-rank branches, ``y = x @ W + s * ((x @ A) @ B)``, so every
graph shares one copy of the base weights (docs/design-export.md). A quantized graph has its own weights
anyway, and each graph uses one fixed adapter (``default`` in memory_update, ``decoder_adapter`` in
prefill/decode), so the branch can be folded: ``W' = W + s * A @ B`` (exact in real arithmetic, spec
§10.4) and quantized as one weight. At decode (M = 1) the three small MatMuls, the Mul and the Add of every
LoRA target are pure overhead: ~4 of 44 ms per step on the demo (CPU), which is what lifts int4 decode
past 1.5x fp32. The price: the low-rank delta is quantized together with W (with a zero delta, as in the
demo, nothing changes) and the quantized weights of memory_update no longer deduplicate with prefill's.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def _const_value(model: onnx.ModelProto, name: str, inits: dict, base_dir: str = "") -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name], base_dir=str(base_dir))
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


class Deferred:
    """Folded weights not built yet (``merge(..., defer=True)``): ``name → W + s·A@B`` computed when asked, from
    the graph's (external) tensors. The graph carries a data-less stub for each; the quantizer that consumes
    them (``asym_int4.apply(weights=...)``) replaces every stub, so no folded fp32 weight ever sits in the
    protobuf (whose memory upb returns only with the whole graph: +1 GB at peak on the demo's int4)."""

    def __init__(self, base_dir: str):
        self.base_dir, self.parts = str(base_dir), {}

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def __call__(self, name: str) -> np.ndarray:
        w, a, b, s = (numpy_helper.to_array(t, base_dir=self.base_dir) if not isinstance(t, float) else t
                      for t in self.parts[name])
        return (w.astype(np.float64) + s * (a.astype(np.float64) @ b.astype(np.float64))).astype(np.float32)


def merge(model: onnx.ModelProto, nodes, base_dir: str = "", defer: bool = False):
    """Fold the LoRA branch of each base MatMul named in ``nodes`` into its weight; → number merged.

    Pattern (as exported): ``Add(x @ W, Mul((x @ A) @ B, s))`` with A, B, W initializers and s a scalar
    constant; anything else is left alone. External weights are read from ``base_dir`` when needed.
    ``defer=True``: → (number merged, a :class:`Deferred` provider of the folded weights), the graph holding
    data-less stubs in their place.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    by_out = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in g.node}
    lazy = Deferred(base_dir)
    rename: dict[str, str] = {}
    made: dict[tuple, str] = {}  # (W, A, B, s) → merged initializer (bos K/V reuse the k/v_proj weights)
    done = 0
    for name in nodes:
        base = by_name.get(name)
        if base is None or base.input[1] not in inits:
            continue
        adds = [c for c in consumers.get(base.output[0], []) if c.op_type == "Add"]
        if len(adds) != 1 or len(consumers[base.output[0]]) != 1:
            continue
        add = adds[0]
        other = add.input[1] if add.input[0] == base.output[0] else add.input[0]
        mul = by_out.get(other)
        if mul is None or mul.op_type != "Mul":
            continue
        mb = by_out.get(mul.input[0])
        s = _const_value(model, mul.input[1], inits, base_dir)
        if mb is None or mb.op_type != "MatMul" or s is None or s.size != 1 or mb.input[1] not in inits:
            continue
        ma = by_out.get(mb.input[0])
        if ma is None or ma.op_type != "MatMul" or ma.input[0] != base.input[0] or ma.input[1] not in inits:
            continue
        key = (base.input[1], ma.input[1], mb.input[1], float(s.reshape(())))
        if key not in made and defer:
            made[key] = f"{base.input[1]}.lora_merged.{len(made)}"
            src = inits[base.input[1]]
            stub = onnx.TensorProto(name=made[key], data_type=onnx.TensorProto.FLOAT, dims=list(src.dims))
            g.initializer.append(stub)
            lazy.parts[made[key]] = (_copy(src), _copy(inits[ma.input[1]]), _copy(inits[mb.input[1]]), key[3])
        if key not in made:
            w = numpy_helper.to_array(inits[base.input[1]], base_dir=str(base_dir)).astype(np.float64)
            a = numpy_helper.to_array(inits[ma.input[1]], base_dir=str(base_dir)).astype(np.float64)
            b = numpy_helper.to_array(inits[mb.input[1]], base_dir=str(base_dir)).astype(np.float64)
            merged = (w + key[3] * (a @ b)).astype(np.float32)
            made[key] = f"{base.input[1]}.lora_merged.{len(made)}"
            g.initializer.append(numpy_helper.from_array(merged, made[key]))
        base.input[1] = made[key]
        rename[add.output[0]] = base.output[0]
        done += 1
    if not done:
        return (0, lazy) if defer else 0
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    for o in g.output:
        if o.name in rename:
            raise ValueError(f"LoRA merge: graph output {o.name} is a LoRA Add; not supported")
    # drop what no longer feeds an output (the folded branches and their Adds)
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = {i for n in g.node for i in n.input}
    kept_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    return (done, lazy) if defer else done


def _copy(t: onnx.TensorProto) -> onnx.TensorProto:
    c = onnx.TensorProto()
    c.CopyFrom(t)
    return c


def merge_file(path, nodes) -> int:
    m = onnx.load(str(path), load_external_data=True)
    n = merge(m, nodes)
    if n:
        onnx.save_model(m, str(path))
    return n
