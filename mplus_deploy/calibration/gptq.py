"""GPTQ weight rounding on ModelOpt's grid (issue 7; Frantar et al. 2022, arXiv 2210.17323).

ModelOpt's ONNX PTQ rounds every weight to the nearest grid point (RTN). GPTQ keeps ModelOpt's *grid* —
the same per-channel (fp8 / int8) or per-block (int4) scales, computed from the original weight — and only
changes *which* grid point each weight takes: column by column, it quantizes one input channel and spreads
the rounding error over the channels not yet quantized, weighted by the inverse Hessian ``H = X^T X`` of
the layer's calibration inputs, so that ``X @ W_q`` stays close to ``X @ W`` rather than ``W_q`` close to
``W``. The artifact format does not change (same Q/DQ nodes, same scales, other integers); TensorRT and ORT
run it as they run ModelOpt's output. ModelOpt's ONNX path has no GPTQ (``int4`` offers RTN and AWQ only,
fp8/int8 none), so this pass is ours.

Hessians come from the torch reference on calibration text (memorize + prefill, the paths the quantized
graphs serve), through forward pre-hooks on the base linears; the modules that read the same rows (k/v,
gate/up) share one Hessian. With channel smoothing the quantized weight is ``W * s`` and its input
``x / s``; pass the smoothing scales and the Hessian is that of ``x / s``.

Weight layout here is torch's ``[out, in]`` (ONNX MatMul initializers are ``[in, out]``: transpose).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .sensitivity import FP8_AMAX_AT, FP8_MAX, observe, targets

# modules reading the same rows share one Hessian; q is separate from k/v because memory rows (spec R1: the
# memory's K/V projections, the bos row) go through k/v only
GROUP = {"q_proj": "q_in", "k_proj": "kv_in", "v_proj": "kv_in", "o_proj": "o_in",
         "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (the paper's default)
BLOCK = 128  # columns per lazy-update block (speed only; the result does not depend on it)


def hessian_key(module: str) -> str:
    i, name = module.split(".")[1], module.split(".")[2]
    return f"layers.{i}.{GROUP[name]}"


def collect_hessians(model, enc, texts, max_tokens: int = 256, prompt_len: int = 224, scales=None,
                     row_norm: bool = False, progress: bool = False) -> dict[str, torch.Tensor]:
    """``layers.{i}.{q_in|kv_in|o_in|mlp_in|down_in}`` → ``H = sum x x^T / rows`` ([in, in], fp32) over the
    inputs of the target linears on ``texts`` (memorize ``max_tokens`` tokens, prefill ``prompt_len``)."""
    acc: dict[str, list] = {}
    hooks, seen = {}, set()
    for n in targets(model):
        key = hessian_key(n)
        if key in seen:  # k/v (gate/up) read the same rows: one Hessian
            continue
        seen.add(key)
        s = scales.get(n) if scales else None

        def fn(x, key=key, s=s):
            x = x.reshape(-1, x.shape[-1]).float()
            if s is not None:
                x = x / s.float()
            if row_norm:
                x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            h = acc.get(key)
            if h is None:
                h = acc[key] = [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32), 0]
            h[0].addmm_(x.t(), x)  # fp32 (as GPTQ's reference code): damping is 1 % of the diagonal
            h[1] += x.shape[0]
        hooks[n] = fn
    observe(model, enc, texts, max_tokens, prompt_len, hooks, "gptq hessians" if progress else None)
    if not acc:
        raise ValueError("gptq: no calibration rows reached the quantized linears (empty or too short texts)")
    # kept in fp32 (the demo's 150 Hessians are 0.44 GB, half of fp64); gptq() solves in fp64
    return {k: _sym(h) / max(1, n) for k, (h, n) in acc.items()}


def _sym(h: torch.Tensor) -> torch.Tensor:
    return (h + h.t()) * 0.5  # fp32 gemm sums (i, j) and (j, i) in different orders


def grid_scales(w: torch.Tensor, mode: str, block_size: int = 32) -> torch.Tensor:
    """ModelOpt's scales for a [out, in] weight, expanded to one per column of each row: [out, in]."""
    O, I = w.shape
    if mode == "int4":
        if I % block_size:
            raise ValueError(f"int4 block size {block_size} does not divide the input size {I}")
        s = w.reshape(O, I // block_size, block_size).abs().amax(-1).clamp_min(1e-12) / 7.0
        return s.repeat_interleave(block_size, dim=1)
    amax = w.abs().amax(1, keepdim=True).clamp_min(1e-12)
    if mode == "fp8":
        return (amax / FP8_AMAX_AT).expand(O, I)
    if mode == "int8":
        return (amax / 127.0).expand(O, I)
    raise ValueError(f"mode must be fp8, int8 or int4, got {mode!r}")


def to_grid(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to the grid: the integer / E4M3 value ModelOpt stores."""
    if mode == "int4":
        return torch.round(x).clamp(-8, 7)
    if mode == "int8":
        return torch.round(x).clamp(-128, 127)
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def factorize(h: torch.Tensor, damp: float = DAMP, act_order: bool = True) -> tuple:
    """(dead channels, column order, upper Cholesky factor of the damped inverse Hessian) of ``h``: what GPTQ
    needs of a Hessian, shared by every weight that reads the same rows (k/v, gate/up)."""
    H = h.detach().double().clone()
    I = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(I)
    H = H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError:  # not positive definite even damped: more damping
        H.diagonal().add_(0.1 * torch.mean(torch.diag(H)))
        L = torch.linalg.cholesky(H)
    return dead, perm, torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq(w: torch.Tensor, h: torch.Tensor, mode: str, block_size: int = 32, damp: float = DAMP,
         act_order: bool = True, scale: torch.Tensor | None = None, factor: tuple | None = None,
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one [out, in] weight with Hessian ``h`` [in, in] on the fixed grid of :func:`grid_scales`.

    → (grid values [out, in] in ``w``'s dtype: integers for int8/int4, E4M3-representable values for fp8;
    the scales [out, in]). ``values * scales`` is the dequantized weight. ``act_order`` quantizes the
    channels with the largest ``H_jj`` first (the scales are fixed beforehand, so order changes nothing in
    the format). ``scale``: use these [out, in] scales instead of recomputing them (ModelOpt's, read from a
    graph). ``factor``: ``factorize(h, damp, act_order)`` computed once for several weights."""
    W = w.detach().double().clone()
    O, I = W.shape
    S = (scale if scale is not None else grid_scales(w, mode, block_size)).double()
    dead, perm, Hinv = factor if factor is not None else factorize(h, damp, act_order)
    W[:, dead] = 0.0
    W, S = W[:, perm], S[:, perm]
    Q = torch.zeros_like(W)
    for i1 in range(0, I, BLOCK):
        i2 = min(i1 + BLOCK, I)
        W1, Hi = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, s = W1[:, i], S[:, i1 + i]
            q = to_grid(col / s, mode)
            Q[:, i1 + i] = q
            err = (col - q * s) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return Q[:, inv].to(w.dtype), S[:, inv].to(w.dtype)


def gptq_weights(model, hessians: dict[str, torch.Tensor], mode: str, block_size: int = 32, scales=None,
                 damp: float = DAMP, act_order: bool = True, progress: bool = False) -> dict[str, torch.Tensor]:
    """``layers.{i}.{name}`` → the dequantized GPTQ weight [out, in] of every target (``W * s`` quantized
    and divided back by ``s`` when smoothing ``scales`` are given, as :func:`sensitivity.simulated` does)."""
    out = {}
    items = list(targets(model).items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"gptq {mode}", unit="linear")
    for n, lin in items:
        s = scales.get(n) if scales else None
        w = lin.weight.data.float() if s is None else lin.weight.data.float() * s
        q, sc = gptq(w, hessians[hessian_key(n)], mode, block_size, damp, act_order)
        deq = q * sc
        out[n] = deq if s is None else deq / s
    return out


# ------------------------------------------------------------------------------------ ONNX pass
def _dq_scales(dq: onnx.NodeProto, scale: np.ndarray, shape: tuple) -> np.ndarray:
    """ModelOpt's weight scale of a ``DequantizeLinear`` expanded to the weight's [in, out] shape."""
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
    if scale.ndim == 0 or scale.size == 1:
        return np.broadcast_to(scale.reshape(()), shape)
    if block:
        return np.repeat(scale, block, axis=axis)
    return np.broadcast_to(np.expand_dims(scale, 1 - axis), shape) if axis in (0, 1) else None


def apply(qmodel: onnx.ModelProto, fp32_weights, hessians: dict[str, torch.Tensor], mode: str,
          damp: float = DAMP, act_order: bool = True, cache: dict | None = None) -> int:
    """Rewrite, in ``qmodel`` (ModelOpt's output, external data loaded), the quantized weight of every target
    MatMul (``smooth.module_of`` maps the node to its module) with the GPTQ values on ModelOpt's own scales.

    ``fp32_weights``: a mapping MatMul node name → the fp32 [in, out] weight that was quantized (the staged
    graph's, after smoothing / LoRA folding; read on demand when it is lazy). ``cache``: a dict kept across the
    graphs of one artifact: the same weight (by content), Hessian, scales and mode gives the same GPTQ values,
    so the base weights the memory_update, prefill and decode graphs share are solved once. Returns the number
    of weights rewritten. Scales, zero points and node structure are untouched."""
    from .smooth import module_of

    inits = {i.name: i for i in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    done: dict[str, bool] = {}
    factors: dict[str, tuple] = {}
    for node in qmodel.graph.node:
        mod = module_of(node.name) if node.op_type == "MatMul" else None
        dq = producer.get(node.input[1]) if mod else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or node.name not in fp32_weights:
            continue
        if dq.input[0] in done:
            continue
        q_init, s_init = inits[dq.input[0]], inits[dq.input[1]]
        if len(dq.input) > 2 and dq.input[2] and np.any(numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32)):
            raise ValueError(f"gptq: {node.name} has a non-zero zero point (asymmetric weights are not supported)")
        q_old = numpy_helper.to_array(q_init)
        w = fp32_weights[node.name]
        if w.shape != q_old.shape:
            raise ValueError(f"gptq: {node.name}: fp32 weight {w.shape} vs quantized {q_old.shape}")
        s = _dq_scales(dq, numpy_helper.to_array(s_init).astype(np.float32), w.shape)
        if s is None:
            raise ValueError(f"gptq: {node.name}: unsupported DequantizeLinear layout")
        key = _cache_key(w, s, hessian_key(mod), mode, damp, act_order) if cache is not None else None
        new = cache.get(key) if key is not None else None
        if new is None:
            hk = hessian_key(mod)
            if hk not in factors:
                factors.clear()  # readers of one Hessian are adjacent in the graph: keep one factor at a time
                factors[hk] = factorize(hessians[hk], damp, act_order)
            q, _ = gptq(torch.from_numpy(np.ascontiguousarray(w.T)).float(), hessians[hk], mode, damp=damp,
                        act_order=act_order, scale=torch.from_numpy(np.ascontiguousarray(s.T)).float(),
                        factor=factors[hk])
            new = q.T.numpy().astype(q_old.dtype)
            if key is not None:
                cache[key] = new
        q_init.CopyFrom(numpy_helper.from_array(np.asarray(new), q_init.name))
        if q_old.dtype != new.dtype or q_init.data_type != _dtype_of(q_old):
            raise AssertionError(f"gptq: {node.name}: the stored type changed")
        done[dq.input[0]] = True
    return len(done)


class ResultCache:
    """GPTQ results of one quantization run kept on disk (a scratch file the caller owns and deletes), so that
    a weight shared by several graphs is solved once without holding every layer's result in memory (at
    mplus-8b: 7 GB of fp8 weights). ``get``/``put`` as a dict; values come back as read-only memory maps."""

    def __init__(self, path):
        self.path, self.index, self.size = str(path), {}, 0
        open(self.path, "wb").close()

    def get(self, key):
        hit = self.index.get(key)
        if hit is None:
            return None
        off, shape, dtype = hit
        return np.memmap(self.path, dtype=dtype, mode="r", offset=off, shape=shape)

    def __setitem__(self, key, value: np.ndarray) -> None:
        a = np.ascontiguousarray(value)
        with open(self.path, "ab") as f:
            f.write(a.view(np.uint8).tobytes())
        self.index[key] = (self.size, a.shape, a.dtype)
        self.size += a.nbytes


def _cache_key(w: np.ndarray, s: np.ndarray, hkey: str, mode: str, damp: float, act_order: bool) -> tuple:
    import hashlib

    h = hashlib.blake2b(np.ascontiguousarray(w).view(np.uint8).ravel(), digest_size=16)
    h.update(np.ascontiguousarray(s, dtype=np.float32).view(np.uint8).ravel())
    return (h.hexdigest(), w.shape, hkey, mode, damp, act_order)


def _dtype_of(a: np.ndarray) -> int:
    return numpy_helper.from_array(a[:0]).data_type


def staged_weights(path, nodes) -> dict[str, np.ndarray]:
    """MatMul node name → its [in, out] fp32 initializer, for ``nodes`` of the (staged) graph at ``path``."""
    m = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in m.graph.initializer}
    want = set(nodes)
    return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in m.graph.node
            if n.name in want and n.op_type == "MatMul" and n.input[1] in inits}
