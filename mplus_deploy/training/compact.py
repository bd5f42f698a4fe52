"""Compact trained-parts files: what ``mplus-train`` ships (the demo's trained memory, a few MB instead of 54).

A full parts file (``loop.save``) holds every trained tensor in fp32. The compact form stores each tensor as a
**delta against the model it is loaded into** (for the demo: the untrained ``demo-untrained`` construction, which is
seeded and versioned), in ``dtype`` (bf16 by default), and factorizes the large deltas by truncated SVD:

- a LoRA pair (``...lora_A.<adapter>.weight`` [r, in], ``...lora_B.<adapter>.weight`` [out, r]) acts only through
  the product ``B @ A``; it is stored as the rank-``lora_rank`` factors of that product (``U_r sqrt(S_r)`` and
  ``sqrt(S_r) V_r^T``) under the same names, and expanded by zero-padding back to the config's rank r, so the
  expanded adapters compute exactly the truncated product;
- any other 2-D tensor with both sides > ``delta_rank`` (the retriever projectors) is stored as
  ``<name>.delta_u`` [out, k] and ``<name>.delta_v`` [k, in] with ``W = W_base + u @ v``;
- the rest (bos embeddings, the memory positional embedding, small matrices) as ``<name>.delta``.

Truncation changes the function; the retention of a compact file is measured, not assumed (bench/RESULTS.md).
"""
from __future__ import annotations

import json

import torch

FULL_FORMAT = "mplus-trained-parts-1"
COMPACT_FORMAT = "mplus-trained-parts-compact-1"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _factors(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = s[:k].sqrt()
    return (u[:, :k] * r).float(), (r[:, None] * vh[:k]).float()


def _partner(name: str) -> str:
    return name.replace(".lora_A.", ".lora_B.")


def compact(tensors: dict, base: dict, lora_rank: int = 8, delta_rank: int = 16,
            dtype: str = "bfloat16") -> tuple[dict, dict]:
    """Full trained tensors + the base model's parameters → (compact tensors, metadata fields)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {sorted(DTYPES)}")
    if lora_rank <= 0 or delta_rank <= 0:
        raise ValueError("lora_rank and delta_rank must be > 0")
    missing = [k for k in tensors if k not in base]
    if missing:
        raise ValueError(f"tensors the base model lacks: {missing[:5]}")
    dt, out = DTYPES[dtype], {}
    for name, t in tensors.items():
        if ".lora_B." in name:
            continue
        if ".lora_A." in name:
            b = tensors.get(_partner(name))
            if b is None:
                raise ValueError(f"{name} without its {_partner(name)}")
            k = min(lora_rank, t.shape[0])
            u, v = _factors(b.float() @ t.float(), k)
            out[_partner(name)], out[name] = u.to(dt), v.to(dt)
            continue
        d = t.float() - base[name].float()
        if d.dim() == 2 and min(d.shape) > delta_rank:
            u, v = _factors(d, delta_rank)
            out[f"{name}.delta_u"], out[f"{name}.delta_v"] = u.to(dt), v.to(dt)
        else:
            out[f"{name}.delta"] = d.to(dt)
    meta = {"format": COMPACT_FORMAT,
            "compact": json.dumps({"lora_rank": lora_rank, "delta_rank": delta_rank, "dtype": dtype})}
    return {k: v.contiguous() for k, v in out.items()}, meta


def expand(stored: dict, base: dict) -> dict:
    """Compact tensors + the base model's parameters → full fp32 tensors (the names and shapes of ``base``)."""
    out = {}
    for name, t in stored.items():
        if name.endswith(".delta_v"):
            continue
        if name.endswith(".delta_u"):
            p = name[: -len(".delta_u")]
            v = stored.get(p + ".delta_v")
            if v is None or p not in base:
                raise ValueError(f"compact parts: {name} has no {p}.delta_v or no base tensor {p}")
            out[p] = base[p].float() + t.float() @ v.float()
        elif name.endswith(".delta"):
            p = name[: -len(".delta")]
            if p not in base:
                raise ValueError(f"compact parts: no base tensor {p}")
            out[p] = base[p].float() + t.float()
        elif ".lora_A." in name or ".lora_B." in name:
            if name not in base:
                raise ValueError(f"compact parts: no base tensor {name}")
            full = torch.zeros(base[name].shape)
            k = t.shape[0] if ".lora_A." in name else t.shape[1]
            if k > full.shape[0 if ".lora_A." in name else 1]:
                raise ValueError(f"compact parts: {name} has rank {k}, above the model's LoRA rank")
            if ".lora_A." in name:
                full[:k] = t.float()
            else:
                full[:, :k] = t.float()
            out[name] = full
        else:
            raise ValueError(f"compact parts: unexpected tensor {name}")
    return out
