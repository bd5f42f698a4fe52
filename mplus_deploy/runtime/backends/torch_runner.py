"""Torch runner: the reference modules (``mplus_deploy.model``) on the K/V fast path (spec R1/R2),
one method per graph of docs/graphs.md, same inputs and outputs as the exported graphs.

Every graph is a call of the reference's own functions (no math restated here):

- ``memory_update`` / ``memory_update_short``: ``forward.update_forward`` over the given ``mem_tail``;
- ``memory_project``: ``memory_kv.project_rows``;
- ``retriever``: ``forward.select_rows`` over the packed LTM inputs (on the host);
- ``prefill``: ``forward.prefill_with_prefix_kv``, the prefix of each layer ``memory_kv.prefix_kv`` of
  [bos, retrieved LTM rows, STM] gathered from the packed inputs;
- ``decode``: ``forward.decode_step`` over the cache [prefix, tail];
- ``decode_batch``: ``forward.decode_step`` once per sequence.

Options: ``fast`` (default: on for CUDA) runs decode on the static cache of ``torch_static`` (CUDA graphs) and
prefill over the memory kept on the device per version (``torch_memory``), with SDPA attention; ``quant`` (from
``Engine(..., quantized=mode)``) swaps the linears for the artifact's quantized weights (``torch_quant``);
``dtype="bfloat16"`` casts the model.

Decode outputs kept between steps (``keep``) are one ``TorchKV`` (per layer the whole post-RoPE cache,
prefix included, on the device) returned under every ``present_*.{l}`` name; fed back as the tail it is
used as is (no per-step concatenation of the prefix). Plain tensors follow the graph contract: per-layer
prefix and tail in, the grown tail out.
"""
from __future__ import annotations

import torch

from mplus_deploy.model import MPlus, forward as F_
from mplus_deploy.model.memory_kv import bos_kv, prefix_kv, project_rows

from .base import BackendUnavailable, Runner
from .torch_memory import DeviceMemories
from .torch_quant import GRAPH_OF, GraphScope, install, read_artifact
from .torch_static import StaticCache, StaticDecoder, StaticKV


class TorchKV:
    """Backend-native KV cache: per layer post-RoPE (k, v) [Hkv, P+C, Dh] on the runner's device, the
    first ``prefix_len`` rows being the memory prefix."""

    def __init__(self, layers: list, prefix_len: int = 0):
        self.layers = layers
        self.prefix_len = int(prefix_len)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([k for k, _ in self.layers]).cpu(), torch.stack([v for _, v in self.layers]).cpu())


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, model: MPlus, device: str = "cpu", threads: int | None = None, quant: tuple | None = None,
                 fast: bool | None = None, dtype: str | None = None):
        super().__init__()
        if dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.dtype = dtype
        self.model, self.cfg = model, model.config
        self.device = torch.device(device)
        self.fast = (self.device.type == "cuda") if fast is None else bool(fast)
        self._static = self._memories = None
        self.threads = threads
        self.quant = quant  # (artifact root, manifest, "fp8" | "int4"): ``torch_quant`` weights, read at activate
        self._scope, self.quantized_weights = GraphScope(), 0
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(
                "backend='torch' with device='cuda' needs a CUDA build of torch and a visible GPU "
                f"(torch {torch.__version__}: torch.cuda.is_available() is False); use device='cpu'")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")

    # ------------------------------------------------------------------ life cycle
    def activate_impl(self) -> None:
        if self.threads:
            torch.set_num_threads(int(self.threads))
        m = self.model
        if self.dtype is not None:
            m.to(getattr(torch, self.dtype))
        if self.device.type != "cpu":
            # Weights only: the runtime's memory lives in the host memory manager, not in model.memory.
            torch.nn.Module.to(m, self.device)
            m._rope = None
        if self.fast:  # fused attention, static decode cache + CUDA graphs, memory resident per version
            m.attention_impl = "sdpa"
            self._static = StaticDecoder(m, self.device)
            self._memories = DeviceMemories(self.device, m.dtype)
        if self.quant is not None and not self.quantized_weights:
            root, manifest, mode = self.quant
            self.quantized_weights = install(m, read_artifact(root, manifest, mode), self._scope, self.device)
        self._scope.graph = "prefill/bos"  # the prefill graph computes the bos row with its own nodes (and scales)
        try:
            with torch.no_grad():
                self._bos = [bos_kv(m, l) for l in range(self.cfg.num_hidden_layers)]
        finally:
            self._scope.graph = None

    def deactivate_impl(self) -> None:
        self._bos = []
        if self._memories is not None:
            self._memories.clear()

    # ------------------------------------------------------------------ decode loop (fast: the static cache)
    @property
    def prefill_keep(self) -> tuple:
        return ("present_k", "present_v") if self.fast else ()

    def start_decode(self, out: dict, prefix_len: int):
        if not self.fast:
            return super().start_decode(out, prefix_len)
        pk, pv = out["present_k"], out["present_v"]
        if isinstance(pk, TorchKV):
            layers = pk.layers
        else:  # a caller's own prefill (stacked CPU tensors)
            layers = [(self._dev(pk[l]), self._dev(pv[l])) for l in range(pk.shape[0])]
        kv = self._static.start(layers, prefix_len, layers[0][0].shape[1])
        return StaticCache(kv, self.cfg.num_hidden_layers)

    def graphs(self) -> set:
        g = {"memory_update", "memory_update_short", "memory_project", "prefill", "decode", "decode_batch"}
        return g | {"retriever"} if self.cfg.is_mplus else g

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "dtype": str(self.model.dtype), "fast": self.fast,
                "quantized": self.quant[2] if self.quant else None, "quantized_weights": self.quantized_weights}

    # ------------------------------------------------------------------ dispatch
    def _dev(self, t):
        return t.to(self.device) if isinstance(t, torch.Tensor) else t

    def place(self, feeds: dict) -> dict:
        return {k: self._dev(v) for k, v in feeds.items()}

    @torch.no_grad()
    def infer_impl(self, graph: str, feeds: dict, keep: tuple) -> dict:
        self._scope.graph = GRAPH_OF.get(graph)  # the quantized weights of that graph (if any)
        try:
            return self._run(graph, feeds, keep)
        finally:
            self._scope.graph = None

    def _run(self, graph: str, feeds: dict, keep: tuple) -> dict:
        m = self.model
        if graph in ("memory_update", "memory_update_short"):
            return {"delta": F_.update_forward(m, self._dev(feeds["ids"]), self._dev(feeds["mem_tail"])).cpu()}
        if graph == "memory_project":
            return {k: t.cpu() for k, t in project_rows(m, self._dev(feeds["rows"])).items()}
        if graph == "retriever":
            l = int(feeds["layer"])
            return {"indices": self._select(l, self._dev(feeds["h"]), feeds["ltm_keys"], feeds["ltm_ages"],
                                            int(feeds["merged_len"]), int(feeds["valid_len"]))}
        if graph == "prefill":
            return self._prefill(feeds, keep)
        if graph == "decode":
            return self._decode(feeds, keep)
        if graph == "decode_batch":
            return self._decode_batch(feeds)
        raise KeyError(graph)

    # ------------------------------------------------------------------ graphs
    def _select(self, l: int, h: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor, ml: int, vl: int) -> torch.Tensor:
        """``forward.select_rows`` over one layer's packed (padded) LTM inputs; runs on the host."""
        ages = ages.to(torch.float64)
        pend = vl > ml
        return F_.select_rows(self.model, l, h, keys[:ml], keys[ml:vl] if pend else None, ages[:ml],
                              ages[ml:vl] if pend else None)

    def _prefill(self, feeds: dict, keep: tuple) -> dict:
        m, cfg = self.model, self.cfg
        dm = self._memories.get(feeds) if self.fast else None  # the memory on the device, once per version
        stm_k, stm_v = (dm.stm_k, dm.stm_v) if dm else (self._dev(feeds["stm_k"]), self._dev(feeds["stm_v"]))
        P, retrieved = cfg.prefix_len, []

        def prefix_of(l: int, h: torch.Tensor):
            ltm = None
            if cfg.is_mplus:
                layer = m.model.layers[l]
                idx = dm.retrieve(l, layer.self_attn.query_proj(layer.input_layernorm(h)), cfg.K0) if dm else None
                if idx is None:
                    idx = self._select(l, h, feeds["ltm_keys"][l], feeds["ltm_ages"][l], int(feeds["merged_len"][l]),
                                       int(feeds["valid_len"][l]))
                    ltm = (self._dev(feeds["ltm_k"][l][:, idx]), self._dev(feeds["ltm_v"][l][:, idx]))
                else:
                    ltm = dm.gather(l, idx, self.device, m.dtype)
                retrieved.append(idx.cpu())
            return prefix_kv([self._bos[l], ltm, (stm_k[l], stm_v[l])])

        h, layers = F_.prefill_with_prefix_kv(m, self._dev(feeds["ids"]), P, prefix_of)
        rows = feeds.get("logit_rows")
        out = {"logits": m.logits(h if rows is None else h[self._dev(rows)]).cpu()}
        out.update(self._cache_out(TorchKV(layers, P), keep))
        if cfg.is_mplus:
            out["retrieved"] = torch.stack(retrieved)
        return out

    def _decode_batch(self, feeds: dict) -> dict:
        """The ``decode_batch`` contract, one ``forward.decode_step`` per sequence (correct, not faster: the torch
        backend has no batched kernel; the exported graph is the batched one)."""
        m, L, P = self.model, self.cfg.num_hidden_layers, self.cfg.prefix_len
        logits, new = [], {f"new_{c}.{l}": [] for l in range(L) for c in "kv"}
        for b in range(feeds["ids"].shape[0]):
            n = int(feeds["tail_len"][b])
            cache = [tuple(torch.cat([self._dev(feeds[f"prefix_{c}.{l}"][b]), self._dev(feeds[f"past_{c}.{l}"][b, :, :n])],
                                     dim=1) for c in "kv") for l in range(L)]
            logits.append(F_.decode_step(m, int(feeds["ids"][b]), P + n, cache).cpu())
            for l, (k, v) in enumerate(cache):
                new[f"new_k.{l}"].append(k[:, -1:].cpu())
                new[f"new_v.{l}"].append(v[:, -1:].cpu())
        return {"logits": torch.stack(logits), **{k: torch.stack(v) for k, v in new.items()}}

    def _decode(self, feeds: dict, keep: tuple) -> dict:
        m, L = self.model, self.cfg.num_hidden_layers
        past = feeds["past_k.0"]
        if isinstance(past, StaticKV):  # fast path: one (captured) step over the static cache
            logits, kv = self._static.step(past, int(feeds["ids"].reshape(-1)[0]), int(feeds["pos"]))
            out = {"logits": logits[None].cpu()}
            if any(n.startswith("present_") for n in keep):
                out.update({f"present_{c}.{l}": kv for l in range(L) for c in "kv"})
            else:
                k, v = kv.tail()
                out.update({f"present_{c}.{l}": t[l] for l in range(L) for c, t in zip("kv", (k, v))})
            return out
        if not isinstance(past, TorchKV):  # contract form: per-layer prefix + tail [Hkv, P|C, Dh] tensors
            past = TorchKV([tuple(torch.cat([self._dev(feeds[f"prefix_{c}.{l}"]), self._dev(feeds[f"past_{c}.{l}"])], dim=1)
                                  for c in "kv") for l in range(L)], prefix_len=feeds["prefix_k.0"].shape[1])
        layers = list(past.layers)
        logits = F_.decode_step(m, self._dev(feeds["ids"]), torch.as_tensor(feeds["pos"]), layers)
        out = {"logits": logits[None].cpu()}
        kv, P = TorchKV(layers, past.prefix_len), past.prefix_len
        if any(n.startswith("present_") for n in keep):
            out.update({f"present_{c}.{l}": kv for l in range(L) for c in "kv"})
        else:
            out.update({f"present_{c}.{l}": t[:, P:].cpu() for l, (k, v) in enumerate(layers) for c, t in zip("kv", (k, v))})
        return out

    @staticmethod
    def _cache_out(kv: TorchKV, keep: tuple) -> dict:
        """Prefill's stacked ``present_k``/``present_v`` (or, kept, the ``TorchKV`` itself)."""
        if "present_k" in keep or "present_v" in keep:
            return {"present_k": kv, "present_v": kv}
        k, v = kv.stacked()
        return {"present_k": k, "present_v": v}
