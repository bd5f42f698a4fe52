"""ONNX Runtime runner over the graphs of an exported artifact (docs/graphs.md, platform-notes §2.2).

- One ``InferenceSession`` per graph listed in the manifest (hashes verified when the manifest is read).
- Weight sharing: every initializer stored in the shared external-data file (``graphs/weights.data``)
  is read once (a copy-on-write memory map) into one ``OrtValue`` and handed to every session with
  ``SessionOptions.add_initializer``; ``session.disable_prepacking = 1`` stops each session from
  making its own prepacked copy (without it sharing saves nothing, platform-notes §2.2).
- IOBinding for every call; outputs named in ``keep`` (the decode KV-cache tails ``present_k.{l}``/
  ``present_v.{l}``) stay ``OrtValue``s on the session's device and are bound straight back as the next
  step's inputs; ``place`` turns the decode memory prefix into ``OrtValue``s once per generation (on CPU
  they wrap the tensors' memory: no copy).
- ``quantized="fp8"|"int8"|"int4"``: the graphs of that ``mplus-export --fp8/--int8/--int4`` section of the
  manifest replace their fp32 versions (graphs it does not list, e.g. ``retriever``, stay fp32). Q/DQ graphs
  run at ``ORT_ENABLE_BASIC`` for fp8 (the level the accuracy report was measured at, platform-notes §2.2);
  int4 sessions disable ``MatMulAddFusion`` so ORT forms ``MatMulNBits`` (docs/quantization.md); on the CPU
  the fp8 graphs' weight DQs are folded to fp32 once per process, one copy shared by every graph and engine
  (``fold_dq``, :mod:`.ort_dequant`: onnxruntime has no fp8 kernel there).
- ``flush_denormals=True`` (default, CPU): floating-point denormals are flushed to zero in ORT's threads
  (``session.set_denormal_as_zero``) and, for the duration of each call, in the calling thread. MLAS's
  softmax computes ``exp`` of every masked (-inf) score through the denormal range: with denormals
  handled by microcode the causal softmax of memory_update ran 5x slower (issue 16; bench/RESULTS.md).
  Only values below 1.2e-38 change (to 0); ``flush_denormals=False`` keeps IEEE denormals.
- ``spin="run"`` (default): ORT's intra-op workers spin between the ops of a run and stop the moment the run
  returns (``session.force_spinning_stop``). Every graph has its own session and thread pool, so workers
  still spinning after a run (``spin=True``, ORT's default) took the cores from the next graph and from the
  host bookkeeping between them (issue 16: memorize 4.5k tok/s spinning, 10.2k without); workers that never
  spin (``spin=False``) pay a wake-up per parallel op instead: decode 1.1-1.3k tok/s against 1.7-2.0k with
  ``"run"``, query T=64 11.4 against 9.8-10.4 ms, memorize unchanged (same machine, bench/RESULTS.md).
- Execution providers are checked after session creation: a silent fallback (e.g. CUDA → CPU when the
  CUDA libraries are missing) raises ``BackendUnavailable``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from mplus_deploy.artifact import graph_info, graph_path
from mplus_deploy.artifact.graph_io import resolve
from mplus_deploy.model.config import MPlusConfig
from .base import GRAPHS, BackendUnavailable, Runner
from .ort_binding import BufferBindings
from .ort_dequant import constant_reads, fold
from .ort_rewrite import PER_TOKEN, per_token_graph
from .ort_weights import SharedInitializers
from mplus_deploy.util.machine import rss_bytes

_ORT_TO_NP = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8,
}
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
# CPU memory arena: "shared" = one arena for every session of the process (registered in ORT's environment,
# allocating exactly what is asked), shrunk at the end of a run of a graph in SHRINK_GRAPHS once the process has
# grown by more than ``arena_keep_mib`` since the last shrink, so peaks of different graphs do not add up and a
# large prefill's peak is not kept through decode; "session" = ORT's default (one growing arena per session,
# never returned); "off" = plain malloc.
# Why a budget and not a shrink after every run: a shrink hands every free chunk back to the OS, and the next
# run faults all of its transients in again (issue 16's T=512 query: 82 -> 64-71 ms without it; its
# [T, S] retrieval scores are 35 MB a layer). Up to ``arena_keep_mib`` of free chunks stay for the next run.
ARENA_MODES = ("shared", "session", "off")
SHRINK_GRAPHS = ("memory_update", "memory_update_short", "memory_project", "retriever", "prefill")
ARENA_KEEP_MIB = 256
# Weight prepacking with shared weights (share_weights=True turns it off: each session would keep its own packed
# copy). MLAS packs an unprepacked weight at every call of a GEMM with M > 1, which is what decode_batch runs: on
# the demo a B=8 step took 67 ms unprepacked against 52 ms prepacked (B=1: 37 vs 25 ms; bench/RESULTS.md issue 19),
# and the M=1 decode graph gains too (demo decode 32-37 -> 38-41 tok/s, +400 MB RSS). So by default (prepack=None)
# the per-token graph in use keeps prepacking (decode_batch when the runner has it, i.e. Engine(max_batch > 1),
# else decode), at the cost of one packed copy of the weights, when they are at most PREPACK_MAX_BYTES (the demo's
# 530 MB) and the graphs are fp32; above that (real width) nothing is prepacked, one copy of the weights.
# A prepacked per-token graph also gets its tied lm_head as a prepacked Gemm (ort_rewrite: +113 MB on the demo).
PREPACK_MAX_BYTES = 2 << 30
ATTENTION = ("gqa", "graph")
_ENV_ARENA = {"registered": False}


def _register_env_arena(ort) -> None:
    """One CPU arena in ORT's environment (once per process; sessions opt in with use_env_allocators)."""
    if _ENV_ARENA["registered"]:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    cfg = ort.OrtArenaCfg({"arena_extend_strategy": 1})  # kSameAsRequested: no power-of-two overshoot
    ort.create_and_register_allocator(info, cfg)
    _ENV_ARENA["registered"] = True


def _to_numpy(v, dtype) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            raise TypeError("bfloat16 feeds are not supported by the ORT runner; export fp32 or fp16")
        v = v.numpy()
    a = np.asarray(v)
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return np.require(a, requirements="C")  # keeps 0-d feeds 0-d (ascontiguousarray makes them [1])


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, root: Path, manifest: dict, device: str = "cpu", threads: int | None = None,
                 share_weights: bool = True, graph_optimization: str = "all", graphs: tuple | None = None,
                 quantized: str | None = None, arena: str = "shared", shared: SharedInitializers | None = None,
                 fold_dq: tuple | None = None, flush_denormals: bool = True, spin: bool | str = "run",
                 arena_keep_mib: float = ARENA_KEEP_MIB, prepack: tuple | None = None, fold_lora: bool = False,
                 attention: str = "gqa"):
        super().__init__()
        self.fold_lora = bool(fold_lora)  # opt-in: a prepacked fp32 per-token graph runs its LoRA folded (ort_rewrite)
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        # "gqa": decode's attention runs as ORT's GroupQueryAttention over one in-place KV buffer (ort_gqa) on the CPU;
        # "graph": the exported nodes (the artifact's decode contract, e.g. to capture its feeds)
        self.attention = attention if device == "cpu" else "graph"
        if arena_keep_mib < 0:
            raise ValueError(f"arena_keep_mib must be >= 0 (0 = shrink after every run), got {arena_keep_mib}")
        self.arena_keep = int(arena_keep_mib * 2**20)
        self._arena_base = None  # RSS after the last shrinking run (None: the next shrinkable run shrinks)
        if spin not in (False, True, "run"):
            raise ValueError(f"spin must be False, True or 'run', got {spin!r}")
        self.spin = spin
        self.flush_denormals = bool(flush_denormals) and device == "cpu"
        if arena not in ARENA_MODES:
            raise ValueError(f"arena must be one of {ARENA_MODES}, got {arena!r}")
        self.arena = arena
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a hard dependency of the package
            raise BackendUnavailable(f"backend='onnxruntime' needs `pip install onnxruntime` ({e})") from None
        self.ort = ort
        self.root, self.manifest = Path(root), manifest
        self.device, self.threads, self.share_weights = device, threads, share_weights
        self.graph_optimization = graph_optimization
        if device not in PROVIDERS:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "backend='onnxruntime' with device='cuda' needs onnxruntime-gpu (`pip install onnxruntime-gpu` in "
                f"place of onnxruntime) and the CUDA libraries; this onnxruntime {ort.__version__} has "
                f"{ort.get_available_providers()}")
        self.quantized, self._qfiles = quantized, {}
        if quantized is not None:
            sec = (manifest.get("quantized") or {}).get(quantized)
            if sec is None:
                have = sorted(manifest.get("quantized") or {}) or "none"
                raise ValueError(f"quantized={quantized!r}: the artifact has no {quantized} graphs (it has: {have}); "
                                 f"add them with `mplus-export SRC -o OUT --{quantized} --calib FILE|builtin`")
            self._qfiles = {g: self.root / e["file"] for g, e in sec["graphs"].items() if "file" in e}
            if quantized == "fp8" and graph_optimization in ("all", "extended"):
                self.graph_optimization = "basic"
        # graphs whose weight-only fp8/int8 DQs are folded to fp32 at load (ort_dequant): default on the CPU every
        # fp8/int8 graph. ORT has no kernel for them there, so the DQ runs at every call (fp8 demo decode 485 ms/step
        # vs 42 ms folded, outputs identical); the fp32 copy is made once per weight and shared by every graph
        if fold_dq is None:
            fold_dq = tuple(self._qfiles) if quantized in ("fp8", "int8") and device == "cpu" and share_weights else ()
        unknown = set(fold_dq) - set(GRAPHS)
        if unknown:
            raise ValueError(f"fold_dq names unknown graphs {sorted(unknown)}; graphs: {list(GRAPHS)}")
        if fold_dq and not share_weights:
            raise ValueError("fold_dq shares one fp32 copy of each folded weight between sessions; it needs "
                             "share_weights=True (or pass fold_dq=())")
        self.fold_dq = tuple(g for g in GRAPHS if g in fold_dq)
        names = graphs or tuple(g for g in GRAPHS if graph_path(self.root, manifest, g) is not None)
        self._names = [g for g in names if graph_path(self.root, manifest, g) is not None]
        if prepack is None:
            data = self.root / manifest.get("weights_file", "graphs/weights.data")
            small = data.exists() and data.stat().st_size <= PREPACK_MAX_BYTES
            hot = "decode_batch" if "decode_batch" in self._names else "decode"
            # quantized graph sets keep their own rules (int4 always prepacks; folded fp8/int8 weights stay unpacked so
            # that folding changes no number: tests/calibration/test_weight_dq.py)
            prepack = (hot,) if small and device == "cpu" and quantized is None else ()
        unknown = set(prepack) - set(GRAPHS)
        if unknown:
            raise ValueError(f"prepack names unknown graphs {sorted(unknown)}; graphs: {list(GRAPHS)}")
        self.prepack = tuple(g for g in GRAPHS if g in prepack)
        self._sessions: dict = {}
        self._bindings = BufferBindings()  # the fused decode's per-generation IOBindings (ort_binding)
        # ``shared``: another runner's weights (e.g. the fp32 and the quantized engine of the accuracy report map
        # weights.data once); the caller owns it and it is not cleared here
        self._own_shared = shared is None
        self._shared = SharedInitializers() if shared is None else shared

    # ------------------------------------------------------------------ life cycle
    def activate_impl(self) -> None:
        ort = self.ort
        level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                 "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                 "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[self.graph_optimization]
        shared_arena = self.arena == "shared" and self.device == "cpu"
        if shared_arena:
            _register_env_arena(ort)
        self._run_options, self._folded, self._lowered, self._rewritten, self._aliases = {}, {}, [], {}, {}
        for g in self._names:
            path = self._qfiles.get(g) or graph_path(self.root, self.manifest, g)
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            if shared_arena:
                so.add_session_config_entry("session.use_env_allocators", "1")
                if g in SHRINK_GRAPHS:
                    ro = ort.RunOptions()
                    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
                    self._run_options[g] = ro
            elif self.arena == "off":
                so.enable_cpu_mem_arena = False
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
            if self.flush_denormals:
                so.add_session_config_entry("session.set_denormal_as_zero", "1")  # ORT's pool threads
            if not self.spin:
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            elif self.spin == "run":
                so.add_session_config_entry("session.force_spinning_stop", "1")
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # exact weight-only (§2.2)
            prepacks = not (self.share_weights and g not in self.prepack and not (self.quantized == "int4" and g in self._qfiles))
            if not prepacks:
                # int4 graphs keep prepacking: MatMulNBits without its prepacked layout ran 4x slower than fp32
                # (demo decode 176 vs 43 ms/token); their int4 weights are not shared anyway (weights.int4.data)
                so.add_session_config_entry("session.disable_prepacking", "1")
            model, values, folded = str(path), {}, {}
            kept = None  # the initializers of a rewritten graph (folded LoRA weights are embedded, their parts gone)
            gqa = g == "decode" and self.attention == "gqa"
            if (g in PER_TOKEN and (prepacks or gqa) and not (g in self.fold_dq and g in self._qfiles)
                    and not graph_info(self.manifest, g).get("custom_ops")):
                c = MPlusConfig.from_dict(self.manifest["config"]) if gqa else None
                dims = (c.num_attention_heads, c.num_key_value_heads, c.dh) if gqa else None
                proto, done = per_token_graph(path, prepacks and self.fold_lora and g not in self._qfiles,
                                              gemm=prepacks, gqa=dims)  # ort_rewrite
                if proto is not None:
                    kept = {i.name for i in proto.graph.initializer}
                    model = proto.SerializeToString()
                    del proto
                    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
                    self._rewritten[g] = done
                    n_gqa = [int(d.split(":")[1]) for d in done if d.startswith("gqa_attention:")]
                    if n_gqa:
                        from .ort_gqa import aliases

                        self._aliases[g] = aliases(n_gqa[0])
            if graph_info(self.manifest, g).get("custom_ops"):
                # --retrieval-op plugin graphs: ORT has no mplus::TopKRetrieve / MemoryGather kernels; their
                # standard-op lowering (the same math as a standard-op export) runs instead
                if g in self._qfiles:
                    raise ValueError(f"graph {g!r}: quantized graphs with custom ops are not supported")
                from mplus_deploy.plugins.onnx_ops import lower_retrieval

                model = lower_retrieval(onnx.load(str(path), load_external_data=False)).SerializeToString()
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
                self._lowered.append(g)
            if g in self.fold_dq and g in self._qfiles:
                model, values, folded, self._folded[g] = fold(path, self._shared)
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
                values = {**values, **folded}  # bound after graph optimization: see ConstantFolding below
            elif self.share_weights:
                values = self._shared.for_graph(path)
                if kept is not None:
                    values = {k: v for k, v in values.items() if k in kept}
            for name, val in values.items():
                so.add_initializer(name, val)
            off = ["MatMulAddFusion"] if (self.quantized == "int4" and g in self._qfiles) else []
            if folded and constant_reads(onnx.load_from_string(model), set(folded)):
                # the folded weights reach the session with add_initializer, i.e. after graph optimization: constant
                # folding would read their placeholders (prefill's constant BOS row through k_proj) and fail on the
                # placeholder's length. The unfolded fp8 graph computes that row at run time too (ORT does not fold
                # through a DQ); add_external_initializers, which optimizers see, copies the weights per session.
                off.append("ConstantFolding")
            if graph_info(self.manifest, g).get("weights_dtype") == "bfloat16" and g not in self._qfiles:
                # bf16 weights, fp32 math: folding the weight Casts would keep an fp32 copy of every weight
                off.append("ConstantFolding")
            sess = ort.InferenceSession(model, so, providers=PROVIDERS[self.device], disabled_optimizers=off)
            got = sess.get_providers()
            if got[0] != PROVIDERS[self.device][0]:
                raise BackendUnavailable(
                    f"onnxruntime silently fell back to {got} for graph {g!r} (asked for {PROVIDERS[self.device]}); "
                    "install a matching onnxruntime-gpu and CUDA libraries, or use device='cpu'")
            self._sessions[g] = sess

    def deactivate_impl(self) -> None:
        self._bindings.clear()
        self._sessions.clear()
        if self._own_shared:
            self._shared.clear()

    def graphs(self) -> set:
        return set(self._names)

    def describe(self) -> dict:
        s = next(iter(self._sessions.values()), None)
        return {"backend": self.name, "device": self.device, "onnxruntime": self.ort.__version__,
                "providers": s.get_providers() if s else None, "threads": self.threads,
                "share_weights": self.share_weights, "shared_initializers": len(self._shared), "prepack": list(self.prepack),
                "precision": graph_info(self.manifest, self._names[0]).get("precision") if self._names else None,
                "quantized": self.quantized, "quantized_graphs": sorted(self._qfiles),
                "graph_optimization": self.graph_optimization, "arena": self.arena,
                "arena_keep_mib": self.arena_keep / 2**20,
                "flush_denormals": self.flush_denormals, "spin": self.spin, "fold_dq": list(self.fold_dq),
                "folded_dq_nodes": dict(getattr(self, "_folded", {})), "folded_fp32_bytes": self._shared.derived_bytes,
                "lowered_custom_ops": list(getattr(self, "_lowered", [])), "rewritten": dict(getattr(self, "_rewritten", {})),
                "fold_lora": self.fold_lora, "attention": self.attention}

    # ------------------------------------------------------------------ inference
    def place(self, feeds: dict) -> dict:
        """``OrtValue``s on the session device (CPU: over the tensors' own memory, which they keep alive)."""
        out = {}
        for name, v in feeds.items():
            if isinstance(v, self.ort.OrtValue):
                out[name] = v
            else:
                out[name] = self.ort.OrtValue.ortvalue_from_numpy(_to_numpy(v, None), self.device, 0)
        return out

    def _shrink_options(self, graph: str):
        """The shrinking run options for this run of ``graph``, or None: a graph in SHRINK_GRAPHS shrinks the
        shared arena when the process grew by more than ``arena_keep`` bytes since the last shrink (or RSS is
        unknown); otherwise its free chunks stay for the next run."""
        ro = self._run_options.get(graph)
        if ro is None:
            return None
        now, base = rss_bytes(), self._arena_base
        if now is None or base is None or now - base > self.arena_keep:
            return ro
        self._arena_base = min(base, now)
        return None

    def infer_impl(self, graph: str, feeds: dict, keep: tuple) -> dict:
        alias = self._aliases.get(graph, {})
        if alias and "kv_len" not in feeds:  # the artifact's decode contract on the fused graph (ort_gqa)
            from .ort_gqa import standard_call

            return standard_call(lambda f: self._run(graph, f, (), alias), feeds, keep, len(alias) // 2, self.place)
        return self._run(graph, feeds, keep, alias)

    def _run(self, graph: str, feeds: dict, keep: tuple, alias: dict) -> dict:
        sess = self._sessions[graph]
        if alias:  # in-place buffers must be OrtValues; a caller's plain tensor is copied first, never written to
            own = {n: torch.as_tensor(feeds[n]).clone() for n in alias.values()
                   if not isinstance(feeds[n], self.ort.OrtValue)}
            feeds = {**feeds, **self.place(own)} if own else feeds
            if not keep:  # one binding per generation's buffers, reused by its steps (ort_binding)
                entry = self._bindings.get(graph, sess, feeds, alias)
                return self._bindings.run(entry, sess, feeds, alias, lambda v, t: _to_numpy(v, _ORT_TO_NP.get(t)),
                                          lambda io: self._run_bound(graph, sess, io))
        io = sess.io_binding()
        held = []
        for inp in sess.get_inputs():
            try:
                v = resolve(feeds, inp.name)
            except KeyError:
                raise KeyError(f"graph {graph!r} needs input {inp.name!r}; got {sorted(feeds)}") from None
            if isinstance(v, self.ort.OrtValue):
                io.bind_ortvalue_input(inp.name, v)
            else:
                arr = _to_numpy(v, _ORT_TO_NP.get(inp.type))
                held.append(arr)
                io.bind_cpu_input(inp.name, arr)
        outs = sess.get_outputs()
        for o in outs:
            if o.name in alias:  # written in place into the input's buffer (ort_gqa's KV append)
                io.bind_ortvalue_output(o.name, resolve(feeds, alias[o.name]))
            else:
                io.bind_output(o.name, self.device if o.name in keep else "cpu")
        self._run_bound(graph, sess, io)
        vals = io.get_outputs()
        return {o.name: (v if o.name in keep or o.name in alias else torch.from_numpy(v.numpy()))
                for o, v in zip(outs, vals)}

    def _run_bound(self, graph: str, sess, io) -> None:
        ro = self._shrink_options(graph)
        if self.flush_denormals:  # the calling thread runs part of the work too (MXCSR is per thread)
            torch.set_flush_denormal(True)
            try:
                sess.run_with_iobinding(io, ro)
            finally:
                torch.set_flush_denormal(False)
        else:
            sess.run_with_iobinding(io, ro)
        if ro is not None:
            self._arena_base = rss_bytes()

    def start_decode(self, out: dict, prefix_len: int):
        if "decode" not in self._aliases:
            return super().start_decode(out, prefix_len)
        from mplus_deploy.runtime.kvcache import BufferCache

        return BufferCache(out["present_k"], out["present_v"], prefix_len, place=self.place)
