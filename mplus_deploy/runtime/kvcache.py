"""The KV-cache of the ``decode`` graph on the host (docs/graphs.md, artifact format v2; its I/O names are
``artifact.graph_io``'s), used by the runtime's decode loop (``generate.token_stream``).

``prefill`` returns the whole post-RoPE cache stacked, ``present_k``/``present_v`` [L, Hkv, P+T, Dh]; its
first P rows per layer are the memory prefix (bos, retrieved LTM, STM), fixed for the whole generation.
``decode`` takes it per layer and in two parts so that a step never copies the prefix:

- ``prefix_k.{l}``, ``prefix_v.{l}`` [Hkv, P, Dh]: read-only, fed unchanged to every step;
- ``past_k.{l}``, ``past_v.{l}`` [Hkv, C, Dh]: the tail (prompt + tokens so far), returned grown by the
  new row as ``present_k.{l}``/``present_v.{l}`` [Hkv, C+1, Dh] and fed back as the next step's tail.

:class:`DecodeCache` splits the stacked prefill cache once (contiguous per-layer copies) and carries
the tail from step to step.
"""
from __future__ import annotations

from typing import Callable

import torch

from mplus_deploy.artifact.graph_io import PAST, PREFIX, PRESENT, decode_output_names  # noqa: F401 (re-exported)


class DecodeCache:
    """Decode feeds of one generation: the fixed prefix and the current tail.

    ``present_k``/``present_v``: prefill's stacked outputs [L, Hkv, P+T, Dh] (CPU or device torch tensors),
    split once at ``prefix_len`` into contiguous per-layer tensors. ``place`` (e.g. ``Runner.place``) may
    turn them into backend-native values once, so that later steps bind them without copying them again.
    After each step, :meth:`advance` takes the step's ``present_*.{l}`` outputs (kept backend-native with
    ``keep=cache.keep``) as the next tail.
    """

    def __init__(self, present_k: torch.Tensor, present_v: torch.Tensor, prefix_len: int,
                 place: Callable[[dict], dict] | None = None):
        if present_k.dim() != 4 or present_k.shape != present_v.shape:
            raise ValueError(f"expected stacked prefill caches [L, Hkv, P+T, Dh], got {tuple(present_k.shape)} and "
                             f"{tuple(present_v.shape)}")
        P = int(prefix_len)
        if not 0 <= P < present_k.shape[2]:
            raise ValueError(f"prefix_len {P} must be smaller than the prefill cache length {present_k.shape[2]}")
        self.L, self.prefix_len = int(present_k.shape[0]), P
        place = place or (lambda d: d)
        kv = {"k": present_k, "v": present_v}
        self.prefix = place({f"prefix_{c}.{l}": kv[c][l, :, :P].contiguous() for l in range(self.L) for c in "kv"})
        self.tail = place({f"past_{c}.{l}": kv[c][l, :, P:].contiguous() for l in range(self.L) for c in "kv"})
        self.keep = tuple(decode_output_names(self.L))

    def feeds(self) -> dict:
        """The cache inputs of the next ``decode`` call."""
        return {**self.prefix, **self.tail}

    def advance(self, out: dict) -> None:
        """Take a step's ``present_k.{l}``/``present_v.{l}`` outputs as the tail of the next step."""
        self.tail = {f"past_{c}.{l}": out[f"present_{c}.{l}"] for l in range(self.L) for c in "kv"}
