"""Next-token selection: greedy, or temperature → top-k → top-p sampling on a dedicated generator
(never the drop generator, spec §9)."""
from __future__ import annotations

import torch


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None) -> int:
    """logits [vocab] fp32 → token id."""
    if not do_sample:
        return int(torch.argmax(logits))
    x = logits.float() / temperature
    if top_k and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sx, si = torch.sort(x, descending=True)
        cp = torch.softmax(sx, -1).cumsum(-1)
        remove = cp - torch.softmax(sx, -1) > top_p  # keep the smallest prefix with mass >= top_p
        sx = sx.masked_fill(remove, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, si, sx)
    p = torch.softmax(x, -1)
    return int(torch.multinomial(p, 1, generator=generator))
