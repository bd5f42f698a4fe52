"""Validation of exported graphs: onnxruntime CPU against the torch reference (``mplus_deploy.model``),
per output max abs / rel error, with per-precision tolerances (Optimum-style report, platform-notes §7).

Tolerance rule for float outputs: ``max_abs <= tol * max(1, max|ref|)``; integer outputs (retrieved
indices) must match exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mplus_deploy.runtime.graph_io import resolve

TOLERANCES = {"fp32": 1e-4, "fp16": 3e-2}  # by graph I/O precision (a bf16 artifact computes in fp32)


class ValidationError(RuntimeError):
    """An exported graph disagrees with the reference beyond tolerance; the message names graph and output."""


@dataclass
class OutputError:
    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    scale: float = 1.0
    mismatches: int = 0  # integer outputs: differing entries

    def ok(self, tol: float) -> bool:
        return self.mismatches == 0 and self.max_abs <= tol * max(1.0, self.scale)


@dataclass
class GraphValidation:
    graph: str
    precision: str
    tol: float
    outputs: dict = field(default_factory=dict)
    skipped: str | None = None
    cases: int = 0

    @property
    def ok(self) -> bool:
        return self.skipped is not None or all(o.ok(self.tol) for o in self.outputs.values())

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs.values()), default=0.0)

    def failures(self) -> list[str]:
        return [f"{self.graph}/{o.name}: max abs {o.max_abs:.3g} (ref scale {o.scale:.3g}, tol {self.tol:g} x scale)"
                + (f", {o.mismatches} integer mismatches" if o.mismatches else "")
                for o in self.outputs.values() if not o.ok(self.tol)]


def np_dtype(precision: str):
    return {"fp32": np.float32, "fp16": np.float16}.get(precision)


def ort_session(path, constant_folding: bool = True, shared=None, **opts):
    """A CPU session. ``constant_folding=False`` for bf16-storage graphs: folding their weight Casts would
    keep an fp32 copy of every weight (measured: 1x bf16 → 2x fp32 bytes at session creation).
    ``shared``: a ``SharedInitializers`` whose weights the session uses instead of loading its own copy."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if shared is not None:
        shared.add_to(so, path)
    for k, v in opts.items():
        so.add_session_config_entry(k, v)
    off = [] if constant_folding else ["ConstantFolding"]
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=off)
    if sess.get_providers()[0] != "CPUExecutionProvider":  # platform-notes §2.2: silent fallbacks
        raise RuntimeError(f"unexpected onnxruntime providers {sess.get_providers()}")
    return sess


def to_feed(t: torch.Tensor, precision: str) -> np.ndarray:
    if t.dtype.is_floating_point:
        return t.detach().to(torch.float32).numpy().astype(np_dtype(precision))
    return t.detach().numpy().astype(np.int64)


def compare(name: str, sess, spec, cases, precision: str) -> GraphValidation:
    tol = TOLERANCES[precision]
    res = GraphValidation(name, precision, tol)
    if np_dtype(precision) is None:
        res.skipped = f"onnxruntime CPU has no {precision} kernels; graph checked with onnx.checker only"
        return res
    out_names = [o.name for o in spec.outputs]
    for feeds, ref in cases:
        got = sess.run(out_names, {i.name: to_feed(resolve(feeds, i.name), precision) for i in spec.inputs})
        want = ref()
        for oname, g in zip(out_names, got):
            w = want[oname].detach()
            e = res.outputs.setdefault(oname, OutputError(oname))
            if tuple(g.shape) != tuple(w.shape):
                raise ValidationError(f"{name}/{oname}: shape {tuple(g.shape)} != reference {tuple(w.shape)}")
            if w.dtype.is_floating_point:
                wn = w.double().numpy()
                d = np.abs(g.astype(np.float64) - wn)
                e.max_abs = max(e.max_abs, float(d.max(initial=0.0)))
                e.scale = max(e.scale, float(np.abs(wn).max(initial=0.0)))
                e.max_rel = max(e.max_rel, float((d / np.maximum(np.abs(wn), 1e-3 * e.scale)).max(initial=0.0)))
            else:
                e.mismatches += int((g != w.numpy()).sum())
        res.cases += 1
    return res
