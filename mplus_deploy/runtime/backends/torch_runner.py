"""Torch runner: the reference modules (``mplus_deploy.model``) on the K/V fast path (spec R1/R2),
one method per graph of docs/graphs.md, same inputs and outputs as the exported graphs.

- ``memory_update`` / ``memory_update_short``: ``forward.inject_forward`` with the STM tail given as
  ``mem_tail`` instead of read from ``model.memory`` (same ops in the same order: bit-identical).
- ``memory_project``: ``key_proj(input_layernorm(rows))`` and W_dec pre-RoPE K/V (``MPlus.retriever_keys``,
  ``MemoryKV``).
- ``prefill``: retrieval (``retrieval.select``, on the host) + ``block_with_prefix_kv`` per layer.
- ``decode``: one ``block_with_prefix_kv`` step per layer over the cache [prefix, tail].

Decode outputs kept between steps (``keep``) are one ``TorchKV`` (per layer the whole post-RoPE cache,
prefix included, on the device) returned under every ``present_*.{l}`` name; fed back as the tail it is
used as is (no per-step concatenation of the prefix). Plain tensors follow the graph contract: per-layer
prefix and tail in, the grown tail out.
"""
from __future__ import annotations

import torch

from mplus_deploy.model import MPlus, forward as F_, retrieval
from mplus_deploy.model.layers import ADAPTER_GENERATE, ADAPTER_UPDATE
from mplus_deploy.model.rope import apply_rope

from .base import BackendUnavailable, Runner


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

    def __init__(self, model: MPlus, device: str = "cpu", threads: int | None = None):
        super().__init__()
        self.model, self.cfg = model, model.config
        self.device = torch.device(device)
        self.threads = threads
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
        if self.device.type != "cpu":
            # Weights only: the runtime's memory lives in the host memory manager, not in model.memory.
            torch.nn.Module.to(m, self.device)
            m._rope = None
        self._bos = []
        if self.cfg.add_bos_embedding:
            with torch.no_grad():
                for l, layer in enumerate(m.model.layers):
                    self._bos.append(layer.self_attn.kv(layer.input_layernorm(m.bos_embedding[l].to(m.dtype)), ADAPTER_GENERATE))

    def deactivate_impl(self) -> None:
        self._bos = []

    def graphs(self) -> set:
        g = {"memory_update", "memory_update_short", "memory_project", "prefill", "decode"}
        return g | {"retriever"} if self.cfg.is_mplus else g

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "dtype": str(self.model.dtype)}

    # ------------------------------------------------------------------ dispatch
    def _dev(self, t):
        return t.to(self.device) if isinstance(t, torch.Tensor) else t

    def place(self, feeds: dict) -> dict:
        return {k: self._dev(v) for k, v in feeds.items()}

    @torch.no_grad()
    def infer_impl(self, graph: str, feeds: dict, keep: tuple) -> dict:
        if graph in ("memory_update", "memory_update_short"):
            return {"delta": self._memory_update(self._dev(feeds["ids"]), self._dev(feeds["mem_tail"])).cpu()}
        if graph == "memory_project":
            keys, k, v = self._project(self._dev(feeds["rows"]))
            out = {"k": k.cpu(), "v": v.cpu()}
            if keys is not None:
                out["keys"] = keys.cpu()
            return out
        if graph == "retriever":
            return {"indices": self._retriever(feeds)}
        if graph == "prefill":
            return self._prefill(feeds, keep)
        if graph == "decode":
            return self._decode(feeds, keep)
        raise KeyError(graph)

    # ------------------------------------------------------------------ graphs
    def _memory_update(self, ids: torch.Tensor, mem_tail: torch.Tensor) -> torch.Tensor:
        """``forward.inject_forward`` for an initialized memory, tail given explicitly (spec §3.4, §8)."""
        m, cfg = self.model, self.cfg
        K, T = cfg.K, ids.shape[0]
        h = m.model.embed_tokens(ids)
        nb = int(cfg.add_bos_embedding)
        P = nb + min(T, K)
        R = nb + K + T
        cos, sin = m.rope_tables(torch.arange(R, device=self.device), h.dtype)
        nme = m.new_memory_positional_emb.reshape(1, -1).to(h.dtype)
        deltas = []
        for l in range(cfg.num_hidden_layers):
            parts = [m.bos_embedding[l].to(h.dtype)] if nb else []
            parts.append(mem_tail[l].to(h.dtype))
            X = torch.cat(parts + [h])
            X[-K:] = X[-K:] + nme
            y, _, _ = F_.block_direct(m, l, X, P, cos, sin, ADAPTER_UPDATE)
            deltas.append(y[-K:])
            h = y[-T:]
        return torch.stack(deltas)

    def _project(self, rows: torch.Tensor):
        m = self.model
        keys, ks, vs = [], [], []
        for l, layer in enumerate(m.model.layers):
            xn = layer.input_layernorm(rows[l].to(m.dtype))
            if self.cfg.is_mplus:
                keys.append(layer.self_attn.key_proj(xn))
            k, v = layer.self_attn.kv(xn, ADAPTER_GENERATE)
            ks.append(k), vs.append(v)
        return (torch.stack(keys) if keys else None), torch.stack(ks), torch.stack(vs)

    def _select(self, l: int, h: torch.Tensor, feeds: dict) -> torch.Tensor:
        """``forward.retrieve_indices`` over the packed (padded) LTM inputs; runs on the host."""
        m, K0 = self.model, self.cfg.K0
        ml, vl = int(feeds["merged_len"][l]), int(feeds["valid_len"][l])
        keys, ages = feeds["ltm_keys"][l], feeds["ltm_ages"][l].to(torch.float64)
        mode = m.score_mode()
        q = F_.retriever_query(m, l, h, mode).cpu() if ml >= K0 else None
        pend = vl > ml
        return retrieval.select(q, keys[:ml], keys[ml:vl] if pend else None, ages[:ml], ages[ml:vl] if pend else None,
                                K0, score_mode=mode, order_mode=m.ltm_age_order)

    def _retriever(self, feeds: dict) -> torch.Tensor:
        l = int(feeds["layer"])
        f = {"ltm_keys": {l: feeds["ltm_keys"]}, "ltm_ages": {l: feeds["ltm_ages"]},
             "valid_len": {l: feeds["valid_len"]}, "merged_len": {l: feeds["merged_len"]}}
        return self._select(l, self._dev(feeds["h"]), f)

    def _prefill(self, feeds: dict, keep: tuple) -> dict:
        m, cfg = self.model, self.cfg
        ids = self._dev(feeds["ids"])
        stm_k, stm_v = self._dev(feeds["stm_k"]), self._dev(feeds["stm_v"])
        T, P = ids.shape[0], cfg.prefix_len
        h = m.model.embed_tokens(ids)
        cos, sin = m.rope_tables(torch.arange(P + T, device=self.device), h.dtype)
        layers, retrieved = [], []
        for l in range(cfg.num_hidden_layers):
            ks, vs = ([self._bos[l][0]], [self._bos[l][1]]) if self._bos else ([], [])
            if cfg.is_mplus:
                idx = self._select(l, h, feeds)
                retrieved.append(idx)
                ks.append(self._dev(feeds["ltm_k"][l][:, idx])), vs.append(self._dev(feeds["ltm_v"][l][:, idx]))
            ks.append(stm_k[l]), vs.append(stm_v[l])
            pk = apply_rope(torch.cat(ks, 1).to(h.dtype), cos[:P], sin[:P])
            pv = torch.cat(vs, 1).to(h.dtype)
            h, k, v = F_.block_with_prefix_kv(m, l, h, pk, pv, cos[P:], sin[P:], ADAPTER_GENERATE)
            layers.append((k, v))
        rows = feeds.get("logit_rows")
        out = {"logits": m.logits(h if rows is None else h[self._dev(rows)]).cpu()}
        out.update(self._cache_out(TorchKV(layers, P), keep))
        if cfg.is_mplus:
            out["retrieved"] = torch.stack(retrieved)
        return out

    def _decode(self, feeds: dict, keep: tuple) -> dict:
        m, L = self.model, self.cfg.num_hidden_layers
        past = feeds["past_k.0"]
        if not isinstance(past, TorchKV):  # contract form: per-layer prefix + tail [Hkv, P|C, Dh] tensors
            past = TorchKV([tuple(torch.cat([self._dev(feeds[f"prefix_{c}.{l}"]), self._dev(feeds[f"past_{c}.{l}"])], dim=1)
                                  for c in "kv") for l in range(L)], prefix_len=feeds["prefix_k.0"].shape[1])
        x = m.model.embed_tokens(self._dev(feeds["ids"]).reshape(1))
        pos = torch.as_tensor(feeds["pos"]).reshape(1).to(self.device)
        cos, sin = m.rope_tables(pos, x.dtype)
        layers = []
        for l in range(L):
            pk, pv = past.layers[l]
            x, k, v = F_.block_with_prefix_kv(m, l, x, pk, pv, cos, sin, ADAPTER_GENERATE)
            layers.append((k, v))
        out = {"logits": m.logits(x).cpu()}
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
