"""The generation loop over a runner (spec §7): one ``prefill`` (retrieval inside, memory as K/V
inputs), then ``decode`` steps over the KV cache. Memory is never written here.

Prefill's stacked cache is split once (``kvcache.DecodeCache``) into per-layer prefix and tail tensors
and placed on the backend (``Runner.place``); every step reads the prefix in place and returns the tail
grown by one row, kept backend-native (``keep``) and bound straight back as the next step's tail."""
from __future__ import annotations

from typing import Iterator

import torch

from mplus_deploy.model.sampling import next_token

from mplus_deploy.artifact.graph_io import last_row
from .kvcache import DecodeCache


def token_stream(runner, prefix_len: int, feeds: dict, ids: torch.Tensor, max_new_tokens: int, *,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, eos: set | None = None, prefilled: dict | None = None) -> Iterator[int]:
    """Yields new token ids (eos included if hit), like ``MPlus.generate``. ``prefilled``: the outputs of a
    ``prefill`` call the caller already made on ``ids`` with these ``feeds`` (any ``logit_rows`` that include
    the last row); the loop then starts from it instead of running prefill again."""
    if max_new_tokens == 0:
        return
    g = torch.Generator(device="cpu")  # sampling never uses the drop generator (spec §9)
    if seed is not None:
        g.manual_seed(int(seed))
    else:
        g.seed()
    eos = eos or set()
    out = prefilled if prefilled is not None else runner.infer("prefill", {"ids": ids, "logit_rows": last_row(ids), **feeds})
    cache = DecodeCache(out["present_k"], out["present_v"], prefix_len, place=runner.place)
    pos = prefix_len + ids.numel()
    tok = next_token(out["logits"][-1], do_sample, temperature, top_p, top_k, g)
    n = 0
    while True:
        yield tok
        n += 1
        if n >= max_new_tokens or tok in eos:
            return
        out = runner.infer("decode", {"ids": torch.tensor([tok], dtype=torch.int64),
                                      "pos": torch.tensor(pos, dtype=torch.int64), **cache.feeds()}, keep=cache.keep)
        cache.advance(out)
        pos += 1
        tok = next_token(out["logits"][-1], do_sample, temperature, top_p, top_k, g)
