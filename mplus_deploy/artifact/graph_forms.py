"""Node patterns the exporter writes that later passes look for (the one owner of each pattern's shape).

- The **tied lm_head** (``export.common.lm_logits``): ``Transpose(MatMul(embed, Transpose(h)))``, which reads the
  [V, d] embedding table in place instead of storing a transposed copy. Used by ``--quantize-lm-head``
  (``calibration.asym_int4.apply_tied_lm_head``) and by the ONNX Runtime runner's load-time rewrite
  (``runtime.backends.ort_rewrite``).
"""
from __future__ import annotations

import onnx


def tied_lm_head(model: onnx.ModelProto) -> tuple | None:
    """The tied lm_head of an exported graph as (in-Transpose, MatMul, out-Transpose, h, embedding name,
    logits name), or None."""
    inits = {i.name: i for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    cons: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)

    def perm10(n):
        return n.op_type == "Transpose" and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([[1, 0]], [])

    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[0] not in inits or len(inits[n.input[0]].dims) != 2:
            continue
        t_in, users = prod.get(n.input[1]), cons.get(n.output[0], [])
        if t_in is None or not perm10(t_in) or len(users) != 1 or not perm10(users[0]):
            continue
        return t_in, n, users[0], t_in.input[0], n.input[0], users[0].output[0]
    return None


def join_names(bases: list[str]) -> str:
    """One readable node-name base for a packed group: the members' bases differing in one path segment become
    ``/layers.0/{q_proj,k_proj,v_proj}/base_layer``; otherwise ``{a,b}`` of the whole bases. :func:`members` inverts it."""
    if len(bases) == 1:
        return bases[0]
    parts = [b.split("/") for b in bases]
    if len({len(p) for p in parts}) == 1:
        diff = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(diff) == 1 and not any("," in p[diff[0]] or "{" in p[diff[0]] for p in parts):
            i = diff[0]
            return "/".join(parts[0][:i] + ["{" + ",".join(p[i] for p in parts) + "}"] + parts[0][i + 1:])
    return "{" + ",".join(bases) + "}"


def members(base: str) -> list[str]:
    """The MatMul name bases a (possibly packed, :func:`join_names`) MatMulNBits node base stands for, in column order."""
    if "{" not in base:
        return [base]
    head, rest = base.split("{", 1)
    inner, tail = rest.split("}", 1)
    return [head + m + tail for m in inner.split(",")]
