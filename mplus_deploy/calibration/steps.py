"""The external steps of ``quantize_artifact``: the ModelOpt call, scratch staging, ORT sessions for the
checks, the TensorRT-RTX parse and the manifest update."""
from __future__ import annotations

import re
from pathlib import Path

import onnx

from .data import CalibrationError


def _anchored(names) -> list[str]:
    return [re.escape(n) + "$" for n in names]



# ------------------------------------------------------------------------------------ ModelOpt
def run_modelopt(src: Path, dst: Path, mode: str, nodes: list[str], excluded: list[str], reader, method: str,
                 opts) -> None:
    from modelopt.onnx.quantization import quantize

    kw = dict(quantize_mode=mode, calibration_eps=["cpu"], output_path=str(dst), op_types_to_quantize=["MatMul"],
              calibration_method=method, high_precision_dtype="fp32", log_level="ERROR")
    if mode == "int4":
        kw.update(nodes_to_exclude=_anchored(excluded), block_size=opts.block_size)
        if reader is not None:
            kw["calibration_data_reader"] = reader
        elif method != "rtn_dq":
            raise CalibrationError(f"int4 calibration method {method!r} needs calibration data (or use rtn_dq)")
    else:
        # explicit node list; GEMV detection off: decode is M = 1 by construction and is calibrated on real
        # decode steps (docs/quantization.md)
        kw.update(nodes_to_quantize=_anchored(nodes), dq_only=True, calibration_data_reader=reader,
                  enable_gemv_detection_for_trt=False, disable_mha_qdq=True)
    if large(src):  # paper scale: the output passes protobuf's 2 GiB only with external data
        kw["use_external_data_format"] = True
    kw.update(opts.extra)
    with _no_gpu_probe_noise():
        quantize(str(src), **kw)


class _NoNvmlProbe:
    """A logging filter for exactly one ModelOpt message: its GPU-count probe (``ort_patching``) logs
    ``ERROR - Failed to get GPU count: NVML Shared Library Not Found`` on every calibration run of a machine
    without an NVIDIA driver, then carries on with 0 GPUs. We calibrate on the CPU EP by design
    (``calibration_eps=["cpu"]``), so that line is noise; any other ModelOpt error still shows."""

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Failed to get GPU count") and "NVML" in msg)


def _no_gpu_probe_noise():
    import contextlib
    import logging

    @contextlib.contextmanager
    def ctx():
        log, f = logging.getLogger("modelopt.onnx"), _NoNvmlProbe()
        log.addFilter(f)
        try:
            yield
        finally:
            log.removeFilter(f)
    return ctx()


# ------------------------------------------------------------------------------------ ORT helpers
def ort_session(path, level: str = "basic", shared=None, **cfg):
    """onnxruntime CPU session at ``ORT_ENABLE_BASIC`` (default; the reference level for Q/DQ graphs,
    platform-notes §2.2), ``disable``, ``extended`` or ``all``; ``cfg`` = session config entries;
    ``shared``: a ``SharedInitializers`` (the fp32 weights the quantized graph still reads, not copied)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if shared is not None:
        shared.add_to(so, path)
    so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    for k, v in cfg.items():
        so.add_session_config_entry(k, str(v))
    # MatMulAddFusion turns 2-D DQ->MatMul(+LoRA Add) into Gemm before the QDQ fusions run, which blocks
    # int4 MatMulNBits in decode (M = 1); it is off for every level
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=["MatMulAddFusion"])
    if sess.get_providers()[0] != "CPUExecutionProvider":
        raise RuntimeError(f"unexpected onnxruntime providers {sess.get_providers()}")
    return sess


INLINE_LIMIT = 1 << 30  # staged graphs with more weight bytes than this keep them as external data


def external_bytes(path: Path) -> int:
    """Bytes of the external initializers of an ONNX file (from its proto; no weight is read)."""
    m = onnx.load(str(path), load_external_data=False)
    return sum(int({e.key: e.value for e in t.external_data}.get("length", 0)) for t in m.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL)


def large(path: Path) -> bool:
    return external_bytes(path) > INLINE_LIMIT


def stage_graph(src: Path, tmp: Path) -> Path:
    """Private copy of the graph in a hidden scratch directory of OUT: ModelOpt writes intermediate files
    (and may rewrite its input) next to the model it is given, never next to the artifact's graphs; onnx
    refuses symlinked/hard-linked external data. Up to ``INLINE_LIMIT`` of weights they are embedded; a
    larger graph (paper scale: protobuf's limit is 2 GiB) gets its own external data file beside it."""
    d = tmp / "src"
    d.mkdir(exist_ok=True)
    dst = d / src.name
    if large(src):
        onnx.save_model(onnx.load(str(src), load_external_data=True), str(dst), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=src.stem + ".staged.data", size_threshold=1024)
    else:
        onnx.save_model(onnx.load(str(src), load_external_data=True), str(dst))
    return dst



def trt_parse(path: Path) -> str:
    """"ok" | "unavailable: ..." | "errors: ..." (TensorRT-RTX ONNX parser, no build)."""
    from mplus_deploy.export import trt_check

    try:
        res = trt_check.parse_and_build(Path(path), {}, build=False)
    except RuntimeError as e:  # tensorrt_rtx not importable
        return f"unavailable: {e}"
    return "ok" if not res["errors"] else "errors: " + "; ".join(res["errors"])[:500]
