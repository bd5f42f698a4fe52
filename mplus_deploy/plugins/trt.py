"""TensorRT side of the retrieval plugins.

* Quickly deployable plugins (``tensorrt.plugin``, TensorRT >= 10.9 / 11), registered by
  :func:`register_plugins` (never at import):
  - ``mplus::RetrievalScores(q, keys) -> scores f32[S]``: ``@trtp.aot_impl`` compiling
    :func:`triton_kernels.score_kernel` to PTX, ``@trtp.autotune`` fp32|fp16 inputs, two tile tactics.
  - ``mplus::MemoryGather(pool, indices; axis) -> rows``: AOT :func:`triton_kernels.gather_kernel`, fp32|fp16|bf16.
  - ``mplus::TopKRetrieve(q, keys, valid_len, ages, merged_len; k, score_chunks) -> indices``: the node
    ``mplus-export --retrieval-op plugin`` writes (``export/plugin_nodes.py``); ``@trtp.impl`` (JIT: Triton scores +
    torch selection, needs this module imported where the engine is deserialized). A one-kernel AOT
    selection is not written yet; the AOT engine path is RetrievalScores → TensorRT TopK (K ≤ 3840) →
    the standard-op ordering of :func:`onnx_ops.emit_standard`.
  UNVERIFIED here: full TensorRT cannot be installed on the CPU build machine (platform-notes §2.7).
* TensorRT-RTX helpers used as a CPU-side parser/builder check (:func:`rtx_build`, :func:`rtx_parse`).
  Never register a Python plugin with the RTX parser in-process: it aborts the interpreter.
"""
from __future__ import annotations

from typing import Tuple

_trt = _trtp = None
_reason = None
try:  # full TensorRT only; tensorrt_rtx has no tensorrt.plugin (platform-notes §2.7)
    import tensorrt as _trt  # type: ignore
    import tensorrt.plugin as _trtp  # type: ignore
except Exception as e:  # pragma: no cover - depends on the machine
    _trt = _trtp = None
    _reason = f"tensorrt.plugin unavailable: {type(e).__name__}: {e}"

_REGISTERED = False


def available() -> bool:
    return _trtp is not None


def unavailable_reason() -> str | None:
    return _reason


SCORE_TACTICS = {1: dict(BT=64, BS=64, BD=64, num_warps=4), 2: dict(BT=128, BS=128, BD=32, num_warps=8)}


def register_plugins() -> None:
    """Register the QDPs with TensorRT (idempotent). Raises if tensorrt.plugin is unavailable."""
    global _REGISTERED
    if _REGISTERED:
        return
    if not available():
        raise RuntimeError(_reason)
    import numpy as np
    import triton

    from . import triton_kernels as K

    trt, trtp = _trt, _trtp

    def _ty(desc) -> str:
        return {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16", trt.int64: "i64"}[desc.dtype]

    # ---- RetrievalScores (AOT)
    @trtp.register("mplus::RetrievalScores")
    def _scores_desc(q: trtp.TensorDesc, keys: trtp.TensorDesc) -> trtp.TensorDesc:
        return trtp.from_shape_expr((keys.shape_expr[0],), dtype=trt.float32)

    @trtp.autotune("mplus::RetrievalScores")
    def _scores_tune(q: trtp.TensorDesc, keys: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]):
        c = trtp.AutoTuneCombination()
        c.pos([0, 1], "FP32|FP16")
        c.pos(2, "FP32")
        c.tactics(list(SCORE_TACTICS))
        return [c]

    @trtp.aot_impl("mplus::RetrievalScores")
    def _scores_aot(q: trtp.TensorDesc, keys: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int):
        t = SCORE_TACTICS[tactic]
        ty = _ty(q)
        # kernel args: q, k, out, T, S, D, stride_qt, stride_k (inputs, outputs, then extra scalars)
        src = triton.compiler.ASTSource(
            fn=K.score_kernel,
            signature={"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "out_ptr": "*fp32", "T": "i32", "S": "i32",
                       "D": "i32", "stride_qt": "i32", "stride_kd_row": "i32",
                       "BT": "constexpr", "BS": "constexpr", "BD": "constexpr"},
            constexprs={"BT": t["BT"], "BS": t["BS"], "BD": t["BD"]},
        )
        ck = triton.compile(src, options={"num_warps": t["num_warps"]})
        T, D, S = q.shape_expr[0], q.shape_expr[1], keys.shape_expr[0]
        lp = trtp.KernelLaunchParams()
        lp.grid_x = trtp.cdiv(S, t["BS"])
        lp.block_x = ck.metadata.num_warps * 32
        lp.shared_mem = ck.metadata.shared
        extra = trtp.SymIntExprs(5)
        for i, e in enumerate((T, S, D, D, D)):
            extra[i] = trtp.SymInt32(e)
        return ck.metadata.name.encode(), ck.asm["ptx"].encode(), lp, extra

    # ---- MemoryGather (AOT): [N, D] pools on axis 0, [B, N, D] pools (LTM K/V [Hkv, S, Dh]) on axis 1
    @trtp.register("mplus::MemoryGather")
    def _gather_desc(pool: trtp.TensorDesc, indices: trtp.TensorDesc, axis: int) -> trtp.TensorDesc:
        dims = [pool.shape_expr[i] for i in range(pool.ndim)]
        dims[axis] = indices.shape_expr[0]
        return trtp.from_shape_expr(tuple(dims), dtype=pool.dtype)

    @trtp.autotune("mplus::MemoryGather")
    def _gather_tune(pool: trtp.TensorDesc, indices: trtp.TensorDesc, axis: int, outputs: Tuple[trtp.TensorDesc]):
        c = trtp.AutoTuneCombination()
        c.pos([0, 2], "FP32|FP16|BF16")
        c.pos(1, "INT64")
        return [c]

    @trtp.aot_impl("mplus::MemoryGather")
    def _gather_aot(pool: trtp.TensorDesc, indices: trtp.TensorDesc, axis: int, outputs: Tuple[trtp.TensorDesc],
                    tactic: int):
        if (pool.ndim, axis) not in ((2, 0), (3, 1)):
            raise ValueError(f"mplus::MemoryGather: pool rank {pool.ndim} with axis {axis} (supported: [N, D] on "
                             "axis 0, [B, N, D] on axis 1)")
        ty, BLOCK_D = _ty(pool), 1024
        src = triton.compiler.ASTSource(
            fn=K.gather_kernel,
            signature={"pool_ptr": f"*{ty}", "idx_ptr": "*i64", "out_ptr": f"*{ty}", "D": "i32",
                       "stride_pool": "i32", "stride_out": "i32", "stride_pool_b": "i32", "stride_out_b": "i32",
                       "BLOCK_D": "constexpr"},
            constexprs={"BLOCK_D": BLOCK_D},
        )
        ck = triton.compile(src)
        D, k = pool.shape_expr[pool.ndim - 1], indices.shape_expr[0]
        lp = trtp.KernelLaunchParams()
        lp.grid_x = k
        lp.grid_y = trtp.cdiv(D, BLOCK_D)
        lp.block_x = ck.metadata.num_warps * 32
        lp.shared_mem = ck.metadata.shared
        if pool.ndim == 3:
            lp.grid_z = pool.shape_expr[0]
            strides = (D, D, D, pool.shape_expr[1] * D, k * D)
        else:  # grid_z = 1: program_id(2) is 0, the batch strides are never used
            strides = (D, D, D, D, D)
        extra = trtp.SymIntExprs(5)
        for i, e in enumerate(strides):
            extra[i] = trtp.SymInt32(e)
        return ck.metadata.name.encode(), ck.asm["ptx"].encode(), lp, extra

    # ---- TopKRetrieve (JIT); merged_len: rows past it are pending (ignored by the small-LTM branch)
    @trtp.register("mplus::TopKRetrieve")
    def _topk_desc(q: trtp.TensorDesc, keys: trtp.TensorDesc, valid_len: trtp.TensorDesc, ages: trtp.TensorDesc,
                   merged_len: trtp.TensorDesc, k: int, score_chunks: int) -> trtp.TensorDesc:
        return trtp.from_shape_expr((k,), dtype=trt.int64)

    @trtp.impl("mplus::TopKRetrieve")
    def _topk_impl(q: trtp.Tensor, keys: trtp.Tensor, valid_len: trtp.Tensor, ages: trtp.Tensor,
                   merged_len: trtp.Tensor, k: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        tq, tk, tv, ta, tm = (torch.as_tensor(x, device="cuda") for x in (q, keys, valid_len, ages, merged_len))
        out = torch.as_tensor(outputs[0], device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out.copy_(K.topk_retrieve_triton(tq, tk, int(tv.reshape(-1)[0]), ta, k, merged_len=int(tm.reshape(-1)[0])))

    del np
    _REGISTERED = True


# ---------------------------------------------------------------- TensorRT-RTX (CPU parse/build check)
def rtx_available() -> bool:
    try:
        import tensorrt_rtx  # noqa: F401
        return True
    except Exception:
        return False


def rtx_parse(model_bytes: bytes):
    """Parse with the TensorRT-RTX ONNX parser → (ok, errors, (builder, network, logger))."""
    import tensorrt_rtx as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model_bytes)
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    return ok, errors, (builder, network, logger, parser)


def rtx_build(model_bytes: bytes, profile: dict[str, tuple]) -> int:
    """Parse and build (CPU AOT) with one optimization profile {input: (min, opt, max)}; engine size in bytes."""
    ok, errors, (builder, network, _logger, _parser) = rtx_parse(model_bytes)
    if not ok:
        raise RuntimeError("TensorRT-RTX parse failed: " + "; ".join(errors))
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profile.items():
        prof.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(prof)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT-RTX build returned None")
    return engine.nbytes
