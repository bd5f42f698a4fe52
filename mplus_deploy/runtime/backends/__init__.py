"""Backends behind one runner interface (``base.Runner``: activate / infer / deactivate)."""
from __future__ import annotations

from .base import GRAPHS, BackendUnavailable, Runner

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken install raising OSError
        return False
    return True


def pick_backend(backend: str, device: str, has_graphs: bool) -> str:
    """``auto``: tensorrt if importable and device cuda, else onnxruntime if the artifact has graphs, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device == "cuda" and has_graphs and tensorrt_importable():
        return "tensorrt"
    return "onnxruntime" if has_graphs else "torch"


def make_runner(backend: str, source, device: str = "cpu", threads: int | None = None, **opts) -> Runner:
    source.quantized = opts.get("quantized")  # part of source.weights_id (memory snapshots, issue 15)
    if backend == "torch":
        from .torch_runner import TorchRunner

        quant, q = None, opts.pop("quantized", None)
        if q:
            if not source.has_graphs:
                raise ValueError(f"backend='torch' with quantized={q!r} reads the quantized weights of an exported "
                                 f"artifact; {source.name!r} is a {source.kind}")
            quant = (source.root, source.manifest, q)
        unknown = set(opts) - {"fast", "dtype"}
        if unknown:
            raise ValueError(f"backend='torch' takes the options fast, dtype and quantized; got {sorted(unknown)}")
        return TorchRunner(source.torch_model(), device=device, threads=threads, quant=quant, **opts)
    if not source.has_graphs:
        raise ValueError(f"backend={backend!r} needs an exported artifact (a directory with manifest.json and "
                         f"graphs/); {source.name!r} is a {source.kind}; run `mplus-export` or use backend='torch'")
    if backend == "onnxruntime":
        from .onnxruntime_runner import OrtRunner

        return OrtRunner(source.root, source.manifest, device=device, threads=threads, **opts)
    if backend == "tensorrt":
        from .tensorrt_runner import TrtRunner

        if opts.get("quantized"):
            raise ValueError("quantized graphs are not wired into the TensorRT runner yet; build engines from "
                             "graphs/<name>.<mode>.onnx (strongly typed Q/DQ) or use backend='onnxruntime'")

        return TrtRunner(source.root, source.manifest, device=device, **opts)
    raise ValueError(backend)


__all__ = ["Runner", "BackendUnavailable", "GRAPHS", "BACKENDS", "pick_backend", "make_runner", "tensorrt_importable"]
