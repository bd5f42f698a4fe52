"""One ``IOBinding`` per decode generation, reused across its steps (the fused decode of :mod:`.ort_gqa`).

Why: a fused decode step binds its 2 L in-place KV buffers as inputs and as outputs and then wraps every output
in a Python ``OrtValue`` (``get_outputs``): on the demo (L = 30) ~120 bind calls and 61 wrappers, 1.5-1.75 ms of
host time around an 18 ms int4 session run (cProfile, bench/RESULTS.md). The buffers of one generation are the
same ``OrtValue`` objects at every step (``kvcache.BufferCache`` places them once, and again only when it
grows), so they are bound once; a step rebinds only its small inputs (``ids``, ``pos``, ``kv_len``) and its
non-aliased outputs (``logits``) to fresh tensors of the shape the first step returned, and reads nothing back
through ``get_outputs``.

Lifetime: an entry is keyed by the identity of its buffers and holds the binding only (ORT's C reference to the
buffers' memory, not the Python objects), and ``weakref.finalize`` on each buffer drops it when that buffer goes
(a weakref callback runs before the dying ``OrtValue`` releases the array that owns the memory),
so a finished generation's cache is freed with its ``BufferCache`` and an id is never reused while its entry
lives. Entries are per buffer set, so concurrent generations on one runner never share a binding; one
generation's steps are sequential. Rebinding ``logits`` before every run replaces ORT's view of the previous
step's tensor before anything could read it; the caller owns that tensor."""
from __future__ import annotations

import weakref

import numpy as np
import onnxruntime as ort
import torch

from mplus_deploy.artifact.graph_io import resolve


class BufferBindings:
    def __init__(self):
        # plain dict operations, atomic under the GIL, and no lock: a finalizer (``_drop``) can run inside any
        # allocation of this thread, e.g. while ``get`` inserts, and must not wait on a lock that thread holds
        self._entries: dict[tuple, list] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def _drop(self, key: tuple) -> None:
        self._entries.pop(key, None)

    def get(self, graph: str, sess, feeds: dict, alias: dict) -> list:
        """[binding, output shapes or None (first step)] of ``graph`` with the buffers ``feeds`` holds for
        ``alias`` (output → input) bound both ways."""
        bufs = [resolve(feeds, n) for n in alias.values()]
        key = (graph,) + tuple(id(b) for b in bufs)
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        io = sess.io_binding()
        for (out, inp), b in zip(alias.items(), bufs):
            # the C binding directly: the Python IOBinding would keep the Python OrtValues (for WebGPU capture),
            # and they must be free to go for the finalizer below to fire (ORT 1.32's own attribute names)
            io._iobinding.bind_ortvalue_input(inp, b._ortvalue)
            io._iobinding.bind_ortvalue_output(out, b._ortvalue)
        entry = [io, None]
        self._entries[key] = entry
        for b in bufs:
            weakref.finalize(b, self._drop, key)
        return entry

    @staticmethod
    def run(entry: list, sess, feeds: dict, alias: dict, to_numpy, run) -> dict:
        """One step on a cached binding: small inputs and the non-aliased outputs bound, ``run(io)``, the outputs
        as tensors (aliased ones: the buffers themselves). ``to_numpy(value, dtype)``: the runner's feed conversion."""
        io, shapes = entry
        held = []
        for inp in sess.get_inputs():
            if inp.name in alias.values():
                continue
            v = resolve(feeds, inp.name)
            if isinstance(v, ort.OrtValue):
                io.bind_ortvalue_input(inp.name, v)
            else:
                arr = to_numpy(v, inp.type)
                held.append(arr)
                io.bind_cpu_input(inp.name, arr)
        outs = [o.name for o in sess.get_outputs() if o.name not in alias]
        fresh = {}
        if shapes is not None:
            for name in outs:
                shape, dtype = shapes[name]
                t = torch.empty(shape, dtype=dtype)
                fresh[name] = t
                io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(t.numpy()))
        else:
            for name in outs:
                io.bind_output(name, "cpu")
        run(io)
        if shapes is None:  # first step: read what ORT allocated, remember the shapes
            vals = dict(zip(list(alias) + outs, io.get_outputs()))  # binding order: the buffers first (get)
            fresh = {name: torch.from_numpy(np.array(vals[name].numpy())) for name in outs}
            entry[1] = {name: (tuple(t.shape), t.dtype) for name, t in fresh.items()}
        res = dict(fresh)
        for out, inp in alias.items():
            res[out] = resolve(feeds, inp)
        return res
