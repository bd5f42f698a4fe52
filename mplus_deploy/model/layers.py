"""Building blocks of the Llama backbone as M+ uses it (spec §3.3), written gpt-fast style:
small modules, explicit tensors, no hidden adapter state.

Module and parameter names equal the official checkpoint keys (spec §10.3), so a state dict maps
1:1 (``model.layers.3.self_attn.q_proj.lora_A.default.weight`` ...).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MPlusConfig

ADAPTER_UPDATE = "default"  # active during memory update / injection (W_enc)
ADAPTER_GENERATE = "decoder_adapter"  # active during prefill and decode (W_dec)
ADAPTERS = (ADAPTER_UPDATE, ADAPTER_GENERATE)


class RMSNorm(nn.Module):
    """HF Llama RMSNorm: normalise in fp32, cast back, then multiply by the weight (spec §11.4)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


class LoRALinear(nn.Module):
    """PEFT-layout LoRA linear: ``base_layer`` + per-adapter ``lora_A``/``lora_B``.

    ``forward(x, adapter)`` picks the adapter explicitly (the official code flips a mutable
    ``_active_adapter`` on every module instead, spec §13.1 hazard 2).
    """

    def __init__(self, in_f: int, out_f: int, r: int, scale: float, adapters=ADAPTERS):
        super().__init__()
        self.base_layer = nn.Linear(in_f, out_f, bias=False)
        self.r, self.scale = r, scale
        self.lora_A = nn.ModuleDict({a: nn.Linear(in_f, r, bias=False) for a in adapters}) if r else nn.ModuleDict()
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, out_f, bias=False) for a in adapters}) if r else nn.ModuleDict()

    def forward(self, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
        y = self.base_layer(x)
        if adapter is not None and adapter in self.lora_A:
            y = y + self.lora_B[adapter](self.lora_A[adapter](x)) * self.scale
        return y

    def merged_weight(self, adapter: str | None) -> torch.Tensor:
        """W + scale * B @ A (spec §10.4): exact in real arithmetic."""
        w = self.base_layer.weight
        if adapter is not None and adapter in self.lora_A:
            w = w + self.scale * (self.lora_B[adapter].weight @ self.lora_A[adapter].weight)
        return w


def _linear(in_f: int, out_f: int, cfg: MPlusConfig, name: str) -> nn.Module:
    if cfg.lora_config and name in cfg.lora_targets:
        return LoRALinear(in_f, out_f, cfg.lora_r, cfg.lora_scale)
    return _PlainLinear(in_f, out_f)


class _PlainLinear(nn.Linear):
    """nn.Linear that accepts (and ignores) the adapter argument, for non-LoRA targets."""

    def __init__(self, in_f: int, out_f: int):
        super().__init__(in_f, out_f, bias=False)

    def forward(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:  # noqa: ARG002
        return super().forward(x)

    def merged_weight(self, adapter: str | None = None) -> torch.Tensor:  # noqa: ARG002
        return self.weight


def projector(d_in: int, d_r: int, n_layers: int = 2) -> nn.Sequential:
    """Retriever projector (official ``get_projector``): Linear(d→2d_r) → SiLU → Linear(2d_r→d_r), no bias."""
    if n_layers != 2:
        raise ValueError(f"num_selector_layers={n_layers} is not supported (the released M+ uses 2)")
    return nn.Sequential(nn.Linear(d_in, 2 * d_r, bias=False), nn.SiLU(), nn.Linear(2 * d_r, d_r, bias=False))


class Attention(nn.Module):
    def __init__(self, cfg: MPlusConfig, layer_idx: int):
        super().__init__()
        d, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dh
        self.H, self.Hkv, self.Dh = H, Hkv, Dh
        self.q_proj = _linear(d, H * Dh, cfg, "q_proj")
        self.k_proj = _linear(d, Hkv * Dh, cfg, "k_proj")
        self.v_proj = _linear(d, Hkv * Dh, cfg, "v_proj")
        self.o_proj = nn.Linear(H * Dh, d, bias=False)
        if cfg.is_mplus and layer_idx in cfg.retriever_layers():
            self.query_proj = projector(d, cfg.selector_hidden_dim, cfg.num_selector_layers)
            self.key_proj = projector(d, cfg.selector_hidden_dim, cfg.num_selector_layers)
            if cfg.add_encoder_retriever:
                # Loaded for checkpoint fidelity; only the broken use_retriever=True path reads it (spec §1.3).
                self.encoder_query_proj = projector(d, cfg.selector_hidden_dim, cfg.num_selector_layers)

    def kv(self, xn: torch.Tensor, adapter: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE K and V of normed rows ``xn`` [R, d] → [Hkv, R, Dh] each."""
        R = xn.shape[0]
        k = self.k_proj(xn, adapter).view(R, self.Hkv, self.Dh).transpose(0, 1)
        v = self.v_proj(xn, adapter).view(R, self.Hkv, self.Dh).transpose(0, 1)
        return k, v

    def q(self, xn: torch.Tensor, adapter: str | None) -> torch.Tensor:
        Q = xn.shape[0]
        return self.q_proj(xn, adapter).view(Q, self.H, self.Dh).transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, cfg: MPlusConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, cfg, "gate_proj")
        self.up_proj = _linear(d, f, cfg, "up_proj")
        self.down_proj = _linear(f, d, cfg, "down_proj")

    def forward(self, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, adapter)) * self.up_proj(x, adapter), adapter)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MPlusConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Backbone(nn.Module):
    """Holds ``embed_tokens``, ``layers``, ``norm`` under the official ``model.`` prefix."""

    def __init__(self, cfg: MPlusConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ---------------------------------------------------------------------------- attention math
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "eager") -> torch.Tensor:
    """Softmax attention with a bottom-right-aligned causal mask (spec §3.3, R4).

    q [H, Q, Dh]; k, v [Hkv, R, Dh] with R >= Q. Query i sits at key row R-Q+i and sees keys
    0..R-Q+i: the whole prefix plus causal history. GQA: query head h reads KV head h // (H/Hkv).
    Returns [Q, H*Dh]. ``impl="sdpa"`` uses ``F.scaled_dot_product_attention`` with the same
    explicit mask (fused kernels on GPU; equal to eager at rounding level, tested).
    """
    H, Q, Dh = q.shape
    Hkv, R, _ = k.shape
    g = H // Hkv
    if impl == "sdpa":
        i = torch.arange(Q, device=q.device)[:, None]
        j = torch.arange(R, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=(j <= (R - Q) + i),
                                           enable_gqa=g > 1)[0]
        return o.transpose(0, 1).reshape(Q, H * Dh)
    if impl != "eager":
        raise ValueError(f"attention impl must be 'eager' or 'sdpa', got {impl!r}")
    if g > 1:
        k = k.repeat_interleave(g, dim=0)
        v = v.repeat_interleave(g, dim=0)
    scores = torch.matmul(q, k.transpose(1, 2)) * (1.0 / math.sqrt(Dh))
    i = torch.arange(Q, device=q.device)[:, None]
    j = torch.arange(R, device=q.device)[None, :]
    scores = scores.masked_fill(j > (R - Q) + i, float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    o = torch.matmul(p, v)  # [H, Q, Dh]
    return o.transpose(0, 1).reshape(Q, H * Dh)


def layer_tail(layer: DecoderLayer, x_q: torch.Tensor, attn_out: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """Residual + o_proj (no LoRA) + post-norm SwiGLU MLP on the query rows only."""
    r = x_q + layer.self_attn.o_proj(attn_out)
    return r + layer.mlp(layer.post_attention_layernorm(r), adapter)
