"""Per-layer memory K/V in pre-RoPE form (spec §12 R1/R2), computed once per memory state.

Memory rows enter a layer only through ``k_proj``/``v_proj`` of their normed vectors, so their
pre-RoPE K and V (W_dec) can be cached and rotated by slot position at use. The cache is keyed by
``MemoryState.version``; any inject invalidates it (the runtime updates it incrementally instead).
"""
from __future__ import annotations

import torch

from .layers import ADAPTER_GENERATE


class MemoryKV:
    def __init__(self, model):
        cfg, mem = model.config, model.memory
        self.version = mem.version
        self.bos, self.stm, self.ltm = [], [], []
        from .forward import ltm_pool

        for l, layer in enumerate(model.model.layers):
            att, norm = layer.self_attn, layer.input_layernorm
            dt = model.dtype
            if cfg.add_bos_embedding:
                self.bos.append(att.kv(norm(model.bos_embedding[l].to(dt)), ADAPTER_GENERATE))
            self.stm.append(att.kv(norm(mem.stm[l].to(dt)), ADAPTER_GENERATE))
            if cfg.is_mplus:
                self.ltm.append(att.kv(norm(ltm_pool(mem, l).to(dt)), ADAPTER_GENERATE))

    def prefix(self, l: int, ltm_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE prefix K/V [Hkv, P, Dh] of layer l: [bos, LTM[ltm_idx], STM]."""
        ks, vs = [], []
        if self.bos:
            ks.append(self.bos[l][0]); vs.append(self.bos[l][1])
        if ltm_idx is not None:
            ks.append(self.ltm[l][0][:, ltm_idx]); vs.append(self.ltm[l][1][:, ltm_idx])
        ks.append(self.stm[l][0]); vs.append(self.stm[l][1])
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)
