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
BATCH_BYTES = 32 << 20  # fp64 weight bytes solved together (the demo: 4-15 layers per batch; mplus-8b: one)


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
    """(dead channels, column order, upper Cholesky factor of the damped inverse Hessian) of ``h`` [I, I] or a
    batch ``h`` [B, I, I]: what GPTQ needs of a Hessian, shared by every weight that reads the same rows."""
    H = h.detach().to(torch.float64, copy=True)  # one copy, whatever the Hessian's dtype
    one = H.dim() == 2
    H = H[None] if one else H
    B, I = H.shape[0], H.shape[-1]
    d = H.diagonal(dim1=1, dim2=2)
    dead = d == 0
    d[dead] = 1.0
    perm = torch.argsort(d, dim=1, descending=True) if act_order else torch.arange(I).expand(B, I).clone()
    H = torch.take_along_dim(H, perm[:, :, None], 1)
    H = torch.take_along_dim(H, perm[:, None, :], 2)  # one [I, I] copy at a time (mplus-8b down_proj: 1.6 GB each)
    d = H.diagonal(dim1=1, dim2=2)
    d.add_(damp * d.mean(1, keepdim=True))
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info != 0).any()):  # not positive definite even damped: more damping where it failed
        bad = info != 0
        Hb = H[bad]
        Hb.diagonal(dim1=1, dim2=2).add_(0.1 * Hb.diagonal(dim1=1, dim2=2).mean(1, keepdim=True))
        H[bad] = Hb
        L = torch.linalg.cholesky(H)
    del H, d
    Hinv = torch.cholesky_inverse(L)
    del L
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    return (dead[0], perm[0], Hinv[0]) if one else (dead, perm, Hinv)


def solve(W: torch.Tensor, S: torch.Tensor, factor: tuple, mode: str) -> torch.Tensor:
    """The GPTQ column loop for a batch: ``W``, ``S`` [B, O, I] (fp64, weights and their fixed grid scales),
    ``factor`` = :func:`factorize` of the B Hessians → grid values [B, O, I]. One Python loop over the columns
    serves the whole batch (the demo's 30 layers at once), on a column-major copy (each column contiguous):
    on a CPU the loop's small ops are where GPTQ's time goes."""
    dead, perm, Hinv = factor
    B, O, I = W.shape
    W = W.masked_fill(dead[:, None, :], 0.0)
    WT = torch.take_along_dim(W, perm[:, None, :], 2).transpose(1, 2).contiguous()  # [B, I, O]
    ST = torch.take_along_dim(S, perm[:, None, :], 2).transpose(1, 2).contiguous()
    del W, S  # the caller's copies stay; these were this function's own
    QT = torch.empty_like(WT)
    for i1 in range(0, I, BLOCK):
        i2 = min(i1 + BLOCK, I)
        W1, Hi = WT[:, i1:i2].clone(), Hinv[:, i1:i2, i1:i2]
        E1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col, s = W1[:, i], ST[:, i1 + i]
            q = to_grid(col / s, mode)
            QT[:, i1 + i] = q
            err = (col - q * s) / Hi[:, i, i][:, None]
            W1[:, i:] -= Hi[:, i, i:][:, :, None] * err[:, None, :]
            E1[:, i] = err
        WT[:, i2:] -= Hinv[:, i1:i2, i2:].transpose(1, 2) @ E1
    return torch.take_along_dim(QT.transpose(1, 2), torch.argsort(perm, dim=1)[:, None, :], 2)


def gptq(w: torch.Tensor, h: torch.Tensor, mode: str, block_size: int = 32, damp: float = DAMP,
         act_order: bool = True, scale: torch.Tensor | None = None, factor: tuple | None = None,
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one [out, in] weight with Hessian ``h`` [in, in] on the fixed grid of :func:`grid_scales`.

    → (grid values [out, in] in ``w``'s dtype: integers for int8/int4, E4M3-representable values for fp8;
    the scales [out, in]). ``values * scales`` is the dequantized weight. ``act_order`` quantizes the
    channels with the largest ``H_jj`` first (the scales are fixed beforehand, so order changes nothing in
    the format). ``scale``: use these [out, in] scales instead of recomputing them (ModelOpt's, read from a
    graph). ``factor``: ``factorize(h, damp, act_order)`` computed once for several weights."""
    S = (scale if scale is not None else grid_scales(w, mode, block_size)).double()
    dead, perm, Hinv = factor if factor is not None else factorize(h, damp, act_order)
    Q = solve(w.detach().double()[None].clone(), S[None], (dead[None], perm[None], Hinv[None]), mode)[0]
    return Q.to(w.dtype), S.to(w.dtype)


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
          damp: float = DAMP, act_order: bool = True, cache: dict | None = None,
          batch_bytes: int = BATCH_BYTES) -> int:
    """Rewrite, in ``qmodel`` (the quantized graph, weights loaded), the quantized weight of every target
    MatMul (``smooth.module_of`` maps the node to its module) with the GPTQ values on the graph's own scales.

    ``fp32_weights``: a mapping MatMul node name → the fp32 [in, out] weight that was quantized (the staged
    graph's, after smoothing / LoRA folding; read on demand when it is lazy). ``cache``: kept across the graphs
    of one artifact: the same weight (by content), Hessian, scales and mode gives the same GPTQ values, so the
    base weights the memory_update, prefill and decode graphs share are solved once. Weights of one shape are
    solved together (:func:`solve`), up to ``batch_bytes`` of fp64 weights per batch. Returns the number of
    weights rewritten. Scales, zero points and node structure are untouched."""
    tasks = _tasks(qmodel, fp32_weights, hessians, mode, damp, act_order)
    cache = {} if cache is None else cache
    todo = [t for t in tasks if cache.get(t["key"]) is None]
    groups: dict[tuple, list] = {}
    for t in todo:
        groups.setdefault(t["shape"], []).append(t)
    for shape, ts in groups.items():
        per = max(1, int(batch_bytes // (8 * shape[0] * shape[1])))
        for j in range(0, len(ts), per):
            chunk = ts[j: j + per]
            W = torch.stack([torch.from_numpy(np.ascontiguousarray(fp32_weights[t["node"]].T)).double() for t in chunk])
            S = torch.stack([torch.from_numpy(np.ascontiguousarray(t["scale_of"]().T)).double() for t in chunk])
            f = factorize(torch.stack([hessians[t["hkey"]] for t in chunk]), damp, act_order)
            Q = solve(W, S, f, mode)
            for t, q in zip(chunk, Q):
                cache[t["key"]] = q.float().T.numpy().astype(t["dtype"])
            del W, S, f, Q
    for t in tasks:
        new = np.asarray(cache.get(t["key"]))
        t["init"].CopyFrom(numpy_helper.from_array(new, t["init"].name))
        if t["init"].data_type != t["data_type"]:
            raise AssertionError(f"gptq: {t['node']}: the stored type changed")
    return len(tasks)


def _tasks(qmodel, fp32_weights, hessians, mode, damp, act_order) -> list[dict]:
    """One entry per distinct quantized weight of a target MatMul: node, initializer, scales, Hessian key."""
    from .smooth import module_of

    inits = {i.name: i for i in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    seen, tasks = set(), []
    for node in qmodel.graph.node:
        mod = module_of(node.name) if node.op_type == "MatMul" else None
        dq = producer.get(node.input[1]) if mod else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or node.name not in fp32_weights:
            continue
        if dq.input[0] in seen:
            continue
        seen.add(dq.input[0])
        q_init, s_init = inits[dq.input[0]], inits[dq.input[1]]
        if len(dq.input) > 2 and dq.input[2] and np.any(numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32)):
            raise ValueError(f"gptq: {node.name} has a non-zero zero point (asymmetric weights are not supported)")
        shape = tuple(q_init.dims)
        w = fp32_weights[node.name]
        if tuple(w.shape) != shape:
            raise ValueError(f"gptq: {node.name}: fp32 weight {w.shape} vs quantized {list(shape)}")
        def scale_of(dq=dq, s_init=s_init, shape=shape):  # expanded on use: int4 block scales are [in, out]
            return _dq_scales(dq, numpy_helper.to_array(s_init).astype(np.float32), shape)
        sc = scale_of()
        if sc is None:
            raise ValueError(f"gptq: {node.name}: unsupported DequantizeLinear layout")
        hk = hessian_key(mod)
        if hk not in hessians:
            raise KeyError(f"gptq: no Hessian {hk!r} for {node.name}")
        tasks.append({"node": node.name, "init": q_init, "data_type": q_init.data_type,
                      "dtype": helper.tensor_dtype_to_np_dtype(q_init.data_type), "shape": (shape[1], shape[0]),
                      "scale_of": scale_of, "hkey": hk, "key": _cache_key(w, sc, hk, mode, damp, act_order)})
        del w, sc
    return tasks


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


def staged_weights(path, nodes) -> dict[str, np.ndarray]:
    """MatMul node name → its [in, out] fp32 initializer, for ``nodes`` of the (staged) graph at ``path``."""
    m = onnx.load(str(path), load_external_data=True)
    inits = {i.name: i for i in m.graph.initializer}
    want = set(nodes)
    return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in m.graph.node
            if n.name in want and n.op_type == "MatMul" and n.input[1] in inits}
