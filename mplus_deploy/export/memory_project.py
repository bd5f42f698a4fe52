"""Graph family ``memory_project`` (spec §12 R1/R2, §13.2 G1b/G1c; W_dec = ``decoder_adapter``).

``rows [L, n, d]`` (STM, LTM, pending or dropped hidden rows) → pre-RoPE ``k``/``v`` [L, Hkv, n, Dh] of
``input_layernorm_l(rows_l)`` and, for M+, the retriever keys ``key_proj_l(input_layernorm_l(rows_l))``.
Memory rows reach generation only through these (R1), so they are computed once per row.
"""
from __future__ import annotations

import torch
from torch import nn

from mplus_deploy.model.layers import ADAPTER_GENERATE
from mplus_deploy.model.memory_kv import project_rows

from .common import GraphSpec, IOSpec, LayerView, Limits

NAME = "memory_project"


class MemoryProject(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.is_mplus = model.config.is_mplus
        self.layers = nn.ModuleList(LayerView(layer) for layer in model.model.layers)

    def forward(self, rows: torch.Tensor):
        keys, ks, vs = [], [], []
        for l, layer in enumerate(self.layers):
            o = layer("project", rows[l], ADAPTER_GENERATE, self.is_mplus)
            if self.is_mplus:
                keys.append(o[0])
            ks.append(o[-2])
            vs.append(o[-1])
        if self.is_mplus:
            return torch.stack(keys), torch.stack(ks), torch.stack(vs)
        return torch.stack(ks), torch.stack(vs)


def spec(cfg, limits: Limits) -> GraphSpec:
    L, d, Hkv, Dh = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.dh
    outs = [IOSpec("k", [L, Hkv, "n", Dh], "float"), IOSpec("v", [L, Hkv, "n", Dh], "float")]
    if cfg.is_mplus:
        outs.insert(0, IOSpec("keys", [L, "n", cfg.selector_hidden_dim], "float"))
    n_max = limits.max_rows
    return GraphSpec(
        name=NAME, inputs=[IOSpec("rows", [L, "n", d], "float")], outputs=outs,
        dims={"n": (1, min(cfg.K, n_max), n_max)}, adapter=ADAPTER_GENERATE,
        notes="pre-RoPE K/V (R1/R2) and retriever keys of memory rows",
    )


def sample(cfg, g: torch.Generator, n: int, dtype) -> dict:
    return {"rows": torch.randn(cfg.num_hidden_layers, n, cfg.hidden_size, generator=g).to(dtype)}


def validation_shapes(cfg, limits: Limits) -> list[int]:
    return sorted({1, cfg.K, cfg.N})


def reference(model, feeds: dict) -> dict:
    """``memory_kv.project_rows``: the one definition of a memory row's retriever key and pre-RoPE K/V."""
    return project_rows(model, feeds["rows"])
