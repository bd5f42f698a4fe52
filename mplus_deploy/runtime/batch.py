"""Continuous batching of decode steps across sessions (issue 19): ``BatchDecoder`` runs one ``decode_batch`` call
(artifact format v4, docs/graphs.md) for every sequence that is waiting for its next token, each over its own
memory prefix and its own tail.

Buffers (host, the model's I/O dtype), slot-major so that the first B slots are one contiguous block per layer
and a step feeds views, never copies:

- ``prefix`` k/v [L, S, Hkv, P, Dh]: each sequence's memory prefix, written once when it joins;
- ``tail`` k/v [L, S, Hkv, C, Dh]: prompt rows, then one row per step at ``tail_len``.

S (slots) grows by doubling up to ``max_batch``. C (tail capacity) is the longest active tail rounded up to
``TAIL_BUCKET`` rows (at most max_window) and grows by buckets as tails grow: the graph's masked tail rows are
read and scored every step, so a buffer of max_window rows would cost each step a full window of K/V per
sequence (the demo at B=8: 189 MB of its ~1 GB per step) for rows that are all masked. Active sequences always occupy slots ``0 .. n-1``: a sequence that
leaves is replaced by the last one (one slot copy), so a step over ``n`` sequences feeds ``[:, :n]``.

Threads: each generation runs in its caller's thread (``decode_loop``, the one sampling rule) and blocks in
``step(tok)``; one worker thread collects the waiting steps and runs them as one call. It waits for every active
sequence to ask (or ``gather_s``) before a call, so sequences that are sampling their token are not left behind;
a sequence that did not ask is fed a dummy row whose result is discarded. Joins and leaves wait for the running
call to end (they move rows of the buffers it reads).
"""
from __future__ import annotations

import threading
from typing import Iterator

import torch

from mplus_deploy.model.sampling import SamplingParams, decode_loop
from mplus_deploy.artifact.graph_io import PAST, PREFIX, last_row

GRAPH = "decode_batch"
TAIL_BUCKET = 64  # rows; the tail capacity grows by this many


class _Seq:
    __slots__ = ("slot", "n", "token", "logits", "error", "done")

    def __init__(self, slot: int, n: int):
        self.slot, self.n, self.token, self.logits, self.error, self.done = slot, n, None, None, None, False


class BatchDecoder:
    def __init__(self, runner, cfg, max_batch: int, gather_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.runner, self.cfg, self.max_batch, self.gather_s = runner, cfg, int(max_batch), gather_s
        self.dtype = torch.float32  # set from the first sequence's prefill cache
        self.L, self.P, self.C = cfg.num_hidden_layers, cfg.prefix_len, cfg.max_window
        self._shape = (cfg.num_key_value_heads, cfg.dh)
        self._cv = threading.Condition()
        self._active: list[_Seq] = []
        self._running = False
        self._closed = False
        self._bufs: dict[str, torch.Tensor] = {}
        self.calls, self.rows = 0, 0  # statistics: graph calls, sequence-steps they advanced
        self._worker = threading.Thread(target=self._loop, name="mplus-batch-decode", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ buffers
    def _grow(self, slots: int, rows: int) -> None:
        """Buffers with at least ``slots`` slots and ``rows`` tail rows (existing rows kept)."""
        S0, C0 = (self._bufs["past_k"].shape[1], self._bufs["past_k"].shape[3]) if self._bufs else (0, 0)
        if slots <= S0 and rows <= C0:
            return
        S = S0 if slots <= S0 else min(self.max_batch, max(slots, 2 * S0, 2))
        C = C0 if rows <= C0 else min(self.C, -(-rows // TAIL_BUCKET) * TAIL_BUCKET)
        Hkv, Dh = self._shape
        new = {}
        for name, n in (("prefix_k", self.P), ("prefix_v", self.P), ("past_k", C), ("past_v", C)):
            t = torch.zeros(self.L, S, Hkv, n, Dh, dtype=self.dtype)
            if S0:
                old = self._bufs[name]
                t[:, :S0, :, :old.shape[3]] = old
            new[name] = t
        self._bufs = new

    def _wait_idle(self) -> None:
        while self._running:
            self._cv.wait()

    # ------------------------------------------------------------------ sequences
    def join(self, present_k: torch.Tensor, present_v: torch.Tensor) -> _Seq:
        """A sequence from prefill's stacked cache [L, Hkv, P+T, Dh]: its prefix and its T prompt rows."""
        T = present_k.shape[2] - self.P
        if T < 1 or T >= self.C:
            raise ValueError(f"a batched sequence needs 1 <= prompt rows < max_window={self.C}, got {T}")
        with self._cv:
            if self._closed:
                raise RuntimeError("the batch decoder is closed")
            while len(self._active) >= self.max_batch or self._running:  # a full batch: wait for a slot
                self._cv.wait()
            if not self._bufs:
                self.dtype = present_k.dtype
            elif present_k.dtype != self.dtype:
                raise ValueError(f"prefill cache dtype {present_k.dtype} differs from the batch's {self.dtype}")
            s = len(self._active)
            self._grow(s + 1, T + 1)
            b = self._bufs
            b["prefix_k"][:, s] = present_k[:, :, :self.P]
            b["prefix_v"][:, s] = present_v[:, :, :self.P]
            b["past_k"][:, s, :, :T] = present_k[:, :, self.P:]
            b["past_v"][:, s, :, :T] = present_v[:, :, self.P:]
            seq = _Seq(s, T)
            self._active.append(seq)
            return seq

    def leave(self, seq: _Seq) -> None:
        with self._cv:
            self._wait_idle()
            if seq.done:
                return
            seq.done = True
            last = self._active.pop()
            if last is not seq:  # move the last sequence into the freed slot
                s = seq.slot
                for t in self._bufs.values():
                    t[:, s] = t[:, last.slot]
                last.slot = s
                self._active[s] = last
            self._cv.notify_all()

    def step(self, seq: _Seq, tok: int) -> torch.Tensor:
        """The next position's logits [V] after ``tok`` (blocks until the batched call that includes it ran)."""
        with self._cv:
            if seq.n >= self.C:
                raise ValueError(f"the sequence is full ({self.C} rows of max_window)")
            seq.token, seq.logits, seq.error = int(tok), None, None
            self._cv.notify_all()
            while seq.logits is None and seq.error is None:
                self._cv.wait()
            if seq.error is not None:
                raise seq.error
            out, seq.logits = seq.logits, None
            return out

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not any(s.token is not None for s in self._active):
                    self._cv.wait()
                if self._closed:
                    return
                self._cv.wait_for(lambda: all(s.token is not None for s in self._active), timeout=self.gather_s)
                batch = list(self._active)
                asked = [s.token is not None for s in batch]
                self._running = True
            try:
                out, err = self._call(batch), None
            except BaseException as e:  # handed to the waiting sequences; the worker keeps serving
                out, err = None, e
            with self._cv:
                self._running = False
                if err is None:
                    self._append_rows(batch, asked, out)
                for i, (s, a) in enumerate(zip(batch, asked)):
                    if not a:
                        continue
                    s.token = None
                    if err is not None:
                        s.error = err
                        continue
                    s.logits = out["logits"][i]
                    s.n += 1
                if err is None:
                    self.calls += 1
                    self.rows += sum(asked)
                self._cv.notify_all()

    def _append_rows(self, batch: list[_Seq], asked: list[bool], out: dict) -> None:
        """Each asking sequence's new K/V row written at its ``tail_len``: one indexed copy per layer and name
        (a copy per sequence and layer was ~480 small torch ops per step at B=8, ~4 ms between calls)."""
        idx = [i for i, a in enumerate(asked) if a]
        slots, rows = torch.tensor(idx), torch.tensor([batch[i].n for i in idx])
        for l in range(self.L):
            for buf, new in (("past_k", "new_k"), ("past_v", "new_v")):
                self._bufs[buf][l, slots, :, rows] = out[f"{new}.{l}"][slots, :, 0]

    def _call(self, batch: list[_Seq]) -> dict:
        n = len(batch)
        self._grow(n, max(s.n for s in batch) + 1)  # room for this step's new rows (joins/leaves wait for the call)
        ids = torch.tensor([s.token if s.token is not None else 0 for s in batch], dtype=torch.int64)
        lens = torch.tensor([s.n for s in batch], dtype=torch.int64)
        feeds = {"ids": ids, "tail_len": lens}
        for l in range(self.L):
            for name in (*PREFIX, *PAST):
                feeds[f"{name}.{l}"] = self._bufs[name][l, :n]
        return self.runner.infer(GRAPH, feeds)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for s in self._active:
                if s.token is not None and s.logits is None:
                    s.error = RuntimeError("the batch decoder was closed")
            self._cv.notify_all()
        self._worker.join(timeout=10)

    def stats(self) -> dict:
        with self._cv:
            return {"max_batch": self.max_batch, "active": len(self._active), "calls": self.calls,
                    "mean_batch": round(self.rows / self.calls, 3) if self.calls else 0.0,
                    "slots": self._bufs["past_k"].shape[1] if self._bufs else 0,
                    "tail_rows": self._bufs["past_k"].shape[3] if self._bufs else 0}


def batched_token_stream(batcher: BatchDecoder, runner, feeds: dict, ids: torch.Tensor, params: SamplingParams,
                         eos=()) -> Iterator[int]:
    """``generate.token_stream`` with the decode steps batched across sessions: prefill alone (this sequence's
    retrieval and memory), then ``batcher`` steps. Same tokens (the same ``decode_loop``)."""
    state = {}

    def first() -> torch.Tensor:
        out = runner.infer("prefill", {"ids": ids, "logit_rows": last_row(ids), **feeds})
        state["prefill"] = out  # joins the batch at its first step, after the first token is out
        return out["logits"][-1]

    def step(tok: int) -> torch.Tensor:
        if "seq" not in state:
            out = state.pop("prefill")
            state["seq"] = batcher.join(out["present_k"], out["present_v"])
        return batcher.step(state["seq"], tok)

    try:
        yield from decode_loop(first, step, params, eos)
    finally:
        if "seq" in state:
            batcher.leave(state["seq"])


def for_engine(runner, source, backend: str, max_batch: int, quantized: str | None) -> BatchDecoder:
    """The ``BatchDecoder`` of ``Engine(max_batch=N > 1)``, after checking that the runner and the artifact can batch:
    a ``decode_batch`` graph (artifact format >= 4), a quantized one for a quantized graph set, N <= the artifact's
    ``limits.max_batch``. Raises ValueError naming the fix (the caller releases the runner)."""
    if GRAPH not in runner.graphs():
        raise ValueError(f"max_batch={max_batch}: this {backend} runner has no {GRAPH} graph (a quantized graph set "
                         "without one, or an artifact exported before format 4); re-export, or use max_batch=1")
    if quantized and GRAPH not in ((source.manifest.get("quantized") or {}).get(quantized, {}).get("graphs") or {}):
        raise ValueError(f"max_batch={max_batch} with quantized={quantized!r}: the {quantized} graph set has no quantized "
                         f"{GRAPH} (its decode steps would run in fp32 while single decode runs {quantized}); "
                         "use max_batch=1 with quantized graphs for now")
    limit = int(source.manifest.get("limits", {}).get("max_batch", max_batch)) if source.manifest else max_batch
    if max_batch > limit:
        raise ValueError(f"max_batch={max_batch} exceeds the artifact's decode_batch limit {limit} "
                         "(mplus-export --max-batch)")
    return BatchDecoder(runner, source.cfg, max_batch)
