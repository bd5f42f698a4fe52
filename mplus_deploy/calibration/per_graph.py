"""Per-graph helpers of ``quantize_artifact``: reading the artifact's fp32 weights one tensor at a time
(``ArtifactWeights``), writing a quantized graph and its manifest entry (``finish``), the stage line per graph
(``tick``), the int4 grid hint and the exclusion summary."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mplus_deploy.util.machine import release_memory


def tick(say, bar, msg: str) -> None:
    """One graph done: its stage line, freed memory back to the OS, the progress bar."""
    say(msg)
    release_memory()
    if bar:
        bar.update(1)


def finish(qm, entry, writer, g, base_dir, m0, sel, excl, feeds, g_method, section) -> None:
    """Write one quantized graph (shared weights file) and fill its manifest entry."""
    from .quantize import quantized_matmuls, weight_params

    done = quantized_matmuls(qm)
    entry.update(file=writer.add(qm, g, base_dir), quantized_nodes=len(done), method=g_method,
                 calibration_samples=len(feeds) if feeds else 0)
    mixed_kept = [n for n, why in excl.items() if "mixed precision" in why]
    entry.update(params_quantized=weight_params(m0, done), params_kept=weight_params(m0, mixed_kept))
    missing = sorted(set(sel) - set(done))
    if missing:
        entry["not_quantized_by_modelopt"] = missing[:20]
    section["graphs"][g] = entry


class ArtifactWeights:
    """MatMul node name → its fp32 [in, out] weight, read on demand from the artifact's external data (one
    tensor at a time: a graph's weights are never all in memory). ``by_initializer`` reads by tensor name."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path, nodes):
        want = set(nodes)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.node_weight = {n.name: n.input[1] for n in model.graph.node if n.name in want and n.op_type == "MatMul"}
        self.base = str(base_dir)
        self.saved = {}  # initializer name → its fp32 TensorProto as read (weight_dq replaces the graph's)

    def by_initializer(self, name: str) -> np.ndarray:
        t = self.saved.setdefault(name, _copy(self.inits[name]))
        return numpy_helper.to_array(t, base_dir=self.base)

    def __contains__(self, node: str) -> bool:
        return node in self.node_weight

    def __getitem__(self, node: str) -> np.ndarray:
        return self.by_initializer(self.node_weight[node])


def _copy(t):
    c = onnx.TensorProto()
    c.CopyFrom(t)
    return c


def int4_grid_hint(staged: Path, sel: list[str], block: int) -> list[str]:
    """Symmetric int4 of weights that already sit on an asymmetric 4-bit grid (a Q4_1 GGUF source) loses
    accuracy that ``rtn_asym`` would not: say so (stderr + manifest), do not switch silently."""
    import sys

    from .asym_int4 import on_grid
    from .gptq import staged_weights

    ws = list(staged_weights(staged, sel[:3]).values())
    if not ws or not all(on_grid(w, block) for w in ws):
        return []
    msg = ("the source weights lie on an asymmetric 4-bit block grid (a dequantized Q4_1 checkpoint): symmetric int4 "
           "re-quantizes them onto another grid; calib_method='rtn_asym' (--calib-method rtn_asym) is lossless for them "
           "(ONNX Runtime only)")
    print(f"mplus quantize int4: note: {msg}", file=sys.stderr)
    return [msg]


def summarize(excl: dict) -> dict:
    out = {}
    for reason in excl.values():
        out[reason] = out.get(reason, 0) + 1
    return out
