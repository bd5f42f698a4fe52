"""Rotary position embeddings with the scalings and the bf16 ``inv_freq`` switch of spec §11.1.

- ``linear`` (transformers style, used by M+): ``inv_freq / factor``.
- ``linear`` in MemoryLLM's own rotary class divides the *positions* by the factor instead
  (spec §11.3b): mathematically equal, not bit-equal; ``positions_scaled=True`` replicates it.
- ``llama3``: Llama-3.1 frequency-dependent scaling (transformers ``_compute_llama3_parameters``).
- ``inv_freq_dtype``: "fp32" or "bf16" (round the scaled ``inv_freq`` to bf16, as the M+ README's
  second ``.to(bfloat16)`` does). Angles and cos/sin are always computed in fp32 afterwards.
"""
from __future__ import annotations

import math

import torch

from .config import MPlusConfig


def inv_freq(cfg: MPlusConfig, inv_freq_dtype: str = "fp32") -> tuple[torch.Tensor, float]:
    """Returns (inv_freq fp32 [Dh/2], position divisor)."""
    Dh = cfg.dh
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.int64).float() / Dh))
    pos_div = 1.0
    rs = cfg.rope_scaling or {}
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype == "linear":
        if cfg.kind == "memoryllm":
            pos_div = float(rs["factor"])
        else:
            inv = inv / float(rs["factor"])
    elif rtype == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = torch.where(is_medium, smoothed, inv_l)
    if inv_freq_dtype == "bf16":
        inv = inv.to(torch.bfloat16).float()
    elif inv_freq_dtype != "fp32":
        raise ValueError(f"inv_freq_dtype must be 'fp32' or 'bf16', got {inv_freq_dtype!r}")
    return inv, pos_div


def cos_sin(pos: torch.Tensor, inv: torch.Tensor, pos_div: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [R, Dh] for integer positions ``pos`` [R]; fp32 math, cast to ``dtype``."""
    p = pos.float()
    if pos_div != 1.0:
        p = p / pos_div
    ang = p[:, None] * inv[None, :].to(p.device)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, R, Dh]; cos/sin [R, Dh]."""
    return x * cos + rotate_half(x) * sin
