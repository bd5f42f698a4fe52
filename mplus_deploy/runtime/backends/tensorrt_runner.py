"""TensorRT runner (TensorRT 11 Python API): one engine per graph of the artifact, built from the ONNX
graphs with optimization profiles from the manifest's dynamic-dimension ranges, cached under
``OUT/engines/<gpu>-trt<version>-<artifact hash>/<graph>.engine``. Buffers are torch CUDA tensors;
execution is ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on one stream. Kept
outputs (the decode tails ``present_k.{l}``/``present_v.{l}``) and ``place``d feeds (the decode memory
prefix ``prefix_k.{l}``/``prefix_v.{l}``) are CUDA tensors bound without a copy.

TensorRT 11 is strongly typed only (platform-notes §4.1): precision comes from the ONNX (fp32/fp16 or
explicit Q/DQ), never from builder flags. Nothing here can run on the development machines (no
TensorRT, no GPU); where ``tensorrt`` is not importable the runner raises ``BackendUnavailable``.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from mplus_deploy.artifact import graph_info, graph_path
from mplus_deploy.artifact.graph_io import profile_shapes, resolve
from .base import GRAPHS, BackendUnavailable, Runner

INSTALL_HINT = ("backend='tensorrt' needs NVIDIA TensorRT >= 11 with its Python bindings (`pip install "
                "'mplus-deploy[trt]'`, i.e. `pip install tensorrt`, from a machine that reaches NVIDIA's package "
                "index) plus a CUDA GPU and a CUDA build of torch; use backend='onnxruntime' or 'torch' otherwise")


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001 - ModuleNotFoundError, or a broken install raising OSError
        raise BackendUnavailable(f"{INSTALL_HINT} (import tensorrt failed: {e})") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 11:
        raise BackendUnavailable(f"{INSTALL_HINT} (found tensorrt {trt.__version__})")
    return trt


class TrtRunner(Runner):
    name = "tensorrt"

    def __init__(self, root: Path, manifest: dict, device: str = "cuda", engine_dir: Path | None = None,
                 workspace_gb: float | None = None, graphs: tuple | None = None):
        super().__init__()
        self.trt = import_tensorrt()
        if device != "cuda":
            raise BackendUnavailable("backend='tensorrt' runs on device='cuda' only")
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"{INSTALL_HINT} (torch.cuda.is_available() is False)")
        self.root, self.manifest = Path(root), manifest
        self.workspace_gb = workspace_gb
        names = graphs or GRAPHS
        self._names = [g for g in names if graph_path(self.root, manifest, g) is not None]
        self.engine_dir = Path(engine_dir) if engine_dir else self.root / "engines" / self.cache_key()
        self._engines, self._contexts = {}, {}
        # ``mplus-export --retrieval-op plugin`` graphs hold mplus::TopKRetrieve / MemoryGather nodes: the ONNX parser
        # finds them in the plugin registry, and the JIT TopKRetrieve must be registered where engines deserialize
        self.custom_ops = sorted({op for g in self._names for op in graph_info(manifest, g).get("custom_ops") or ()})
        if self.custom_ops:
            from mplus_deploy.plugins import trt as trt_plugins

            if not trt_plugins.available():
                raise BackendUnavailable(f"the artifact's graphs use {self.custom_ops} (--retrieval-op plugin), whose "
                                         f"TensorRT plugins need tensorrt.plugin: {trt_plugins.unavailable_reason()}")
            trt_plugins.register_plugins()

    # ------------------------------------------------------------------ cache
    def artifact_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest.get("files") or self.manifest, sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]

    def cache_key(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(0)).strip("_")
        return f"{gpu}-trt{self.trt.__version__}-{self.artifact_hash()}"

    # ------------------------------------------------------------------ life cycle
    def activate_impl(self) -> None:
        trt = self.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream()
        self.engine_dir.mkdir(parents=True, exist_ok=True)
        for g in self._names:
            f = self.engine_dir / f"{g}.engine"
            if not f.exists():
                self._build(g, f)
            engine = self.runtime.deserialize_cuda_engine(f.read_bytes())
            if engine is None:
                raise RuntimeError(f"{f}: TensorRT could not deserialize the engine (built for another GPU or "
                                   "TensorRT version?); delete it to rebuild")
            self._engines[g] = engine
            self._contexts[g] = engine.create_execution_context()

    def _build(self, g: str, out: Path) -> None:
        from mplus_deploy.util.io import atomic_write_bytes

        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network()  # strongly typed is the only mode in TensorRT 11
        parser = trt.OnnxParser(network, self.logger)
        path = graph_path(self.root, self.manifest, g)
        if not parser.parse_from_file(str(path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {path}: {errs}")
        config = builder.create_builder_config()
        if self.workspace_gb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * (1 << 30)))
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profile_shapes(graph_info(self.manifest, g)).items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine for graph {g!r} ({path})")
        atomic_write_bytes(out, bytes(plan))

    def deactivate_impl(self) -> None:
        self._contexts.clear()
        self._engines.clear()

    def graphs(self) -> set:
        return set(self._names)

    def describe(self) -> dict:
        return {"backend": self.name, "device": "cuda", "tensorrt": self.trt.__version__,
                "gpu": torch.cuda.get_device_name(0), "engine_dir": str(self.engine_dir), "plugins": self.custom_ops}

    # ------------------------------------------------------------------ inference
    def _torch_dtype(self, dt):
        trt = self.trt
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}[dt]

    def place(self, feeds: dict) -> dict:
        return {k: (v.to("cuda").contiguous() if isinstance(v, torch.Tensor) else v) for k, v in feeds.items()}

    def infer_impl(self, graph: str, feeds: dict, keep: tuple) -> dict:
        trt = self.trt
        engine, ctx = self._engines[graph], self._contexts[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        held = {}
        with torch.cuda.stream(self.stream):
            for n in inputs:
                v = resolve(feeds, n)
                t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
                t = t.to(device="cuda", dtype=self._torch_dtype(engine.get_tensor_dtype(n)), non_blocking=True).contiguous()
                held[n] = t
                ctx.set_input_shape(n, tuple(t.shape))
                ctx.set_tensor_address(n, t.data_ptr())
            outs = {}
            for n in outputs:
                shape = tuple(ctx.get_tensor_shape(n))
                if any(s < 0 for s in shape):
                    raise RuntimeError(f"graph {graph!r} output {n!r} has a data-dependent shape {shape}")
                t = torch.empty(shape, dtype=self._torch_dtype(engine.get_tensor_dtype(n)), device="cuda")
                outs[n] = t
                ctx.set_tensor_address(n, t.data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of graph {graph!r} failed")
        self.stream.synchronize()
        return {n: (t if n in keep else t.cpu()) for n, t in outs.items()}
