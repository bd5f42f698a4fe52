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


class BufferCache:
    """Decode feeds of one generation for ``decode`` rewritten to ORT's GroupQueryAttention (``backends.ort_gqa``):
    per layer one buffer ``kv_k.{l}``/``kv_v.{l}`` [1, Hkv, S, Dh] holding the prefix and the tail in its first
    ``n`` rows, fed with ``kv_len = n``; the graph writes the step's row at ``n`` in place (its ``present_*``
    outputs are bound to the same memory by the runner), so a step copies nothing.

    Built from prefill's stacked caches [L, Hkv, P+T, Dh] with ``reserve`` free rows; when they run out the
    buffers are reallocated with twice the free rows (one copy of the rows so far, amortized)."""

    keep = ()  # nothing to carry from a step's outputs: the buffers are the cache

    def __init__(self, present_k: torch.Tensor, present_v: torch.Tensor, prefix_len: int,
                 place: Callable[[dict], dict] | None = None, reserve: int = 256):
        if present_k.dim() != 4 or present_k.shape != present_v.shape:
            raise ValueError(f"expected stacked prefill caches [L, Hkv, P+T, Dh], got {tuple(present_k.shape)} and "
                             f"{tuple(present_v.shape)}")
        if not 0 <= int(prefix_len) < present_k.shape[2]:
            raise ValueError(f"prefix_len {prefix_len} must be smaller than the prefill cache length {present_k.shape[2]}")
        if reserve < 1:
            raise ValueError(f"reserve must be >= 1 free row, got {reserve}")
        self.L, self.prefix_len, self.n = int(present_k.shape[0]), int(prefix_len), int(present_k.shape[2])
        self._place, self.reserve = place or (lambda d: d), int(reserve)
        self._fill([present_k[l] for l in range(self.L)], [present_v[l] for l in range(self.L)], self.n + self.reserve)

    def _fill(self, ks: list, vs: list, rows: int) -> None:
        """New buffers of ``rows`` rows holding the first ``n`` rows of ``ks``/``vs`` (per layer [Hkv, >=n, Dh])."""
        Hkv, _, Dh = ks[0].shape
        bufs = {}
        for l in range(self.L):
            for name, src in (("kv_k", ks[l]), ("kv_v", vs[l])):
                b = torch.empty(1, Hkv, rows, Dh, dtype=src.dtype, device=src.device)
                b[0, :, : self.n].copy_(src[:, : self.n])
                bufs[f"{name}.{l}"] = b
        self.buffers, self.rows = bufs, rows  # the tensors own the memory the placed values wrap
        self.values = self._place(dict(bufs))

    def feeds(self) -> dict:
        """The cache inputs of the next ``decode`` call."""
        return {**self.values, "kv_len": torch.tensor(self.n, dtype=torch.int64)}

    def advance(self, out: dict) -> None:
        """The step wrote row ``n`` in place; grow the buffers when the next step would have no free row."""
        self.n += 1
        if self.n >= self.rows:
            b = self.buffers
            self._fill([b[f"kv_k.{l}"][0] for l in range(self.L)], [b[f"kv_v.{l}"][0] for l in range(self.L)],
                       self.n + 2 * self.reserve)
            self.reserve *= 2

    def tail(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``l``'s tail rows (after the prefix) so far, [Hkv, C, Dh] each (views; for tests)."""
        k, v = self.buffers[f"kv_k.{l}"][0], self.buffers[f"kv_v.{l}"][0]
        return k[:, self.prefix_len : self.n], v[:, self.prefix_len : self.n]
