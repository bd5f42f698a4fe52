"""The generation loop over a runner (spec §7): one ``prefill`` (retrieval inside, memory as K/V
inputs), then ``decode`` steps over the KV cache. Memory is never written here.

Prefill's stacked cache is split once (``kvcache.DecodeCache``) into per-layer prefix and tail tensors
and placed on the backend (``Runner.place``) at the first decode step: the first token (from prefill's
logits) is yielded before that copy, and a one-token generation never makes it. Every step reads the
prefix in place and returns the tail grown by one row, kept backend-native (``keep``) and bound straight
back as the next step's tail."""
from __future__ import annotations

from typing import Iterator

import torch

from mplus_deploy.artifact.graph_io import last_row
from mplus_deploy.model.sampling import SamplingParams, decode_loop



def token_stream(runner, prefix_len: int, feeds: dict, ids: torch.Tensor, params: SamplingParams, eos=(), *,
                 prefilled: dict | None = None) -> Iterator[int]:
    """Yields new token ids (eos included if hit), like ``MPlus.generate`` (the same ``decode_loop``).
    ``prefilled``: the outputs of a ``prefill`` call the caller already made on ``ids`` with these ``feeds``
    (any ``logit_rows`` that include the last row); the loop then starts from it instead of running prefill."""
    state = {}

    def first() -> torch.Tensor:
        out = prefilled if prefilled is not None else runner.infer(
            "prefill", {"ids": ids, "logit_rows": last_row(ids), **feeds}, keep=runner.prefill_keep)
        state["prefill"] = out  # the decode cache is built at the first step: after the first token is out
        state["pos"] = prefix_len + ids.numel()
        return out["logits"][-1]

    def step(tok: int) -> torch.Tensor:
        if "cache" not in state:  # a ``DecodeCache`` unless the backend has its own
            state["cache"] = runner.start_decode(state.pop("prefill"), prefix_len)
        cache = state["cache"]
        out = runner.infer("decode", {"ids": torch.tensor([tok], dtype=torch.int64),
                                      "pos": torch.tensor(state["pos"], dtype=torch.int64), **cache.feeds()},
                           keep=cache.keep)
        cache.advance(out)
        state["pos"] += 1
        return out["logits"][-1]

    return decode_loop(first, step, params, eos)
