"""The memorize loop: one memory update per chunk in document order (spec §3.1), with each update's host
bookkeeping overlapped with the next chunk's graphs.

An update is two graph calls (``memory_update`` on the chunk and the STM's last K rows, ``memory_project`` of its
K new rows) and then ``HostMemory.write``: the drop draw, the STM compaction, the LTM append and, every
``update_ltm_frequency`` updates, the LTM merge. Nothing in ``write`` feeds the next chunk's graphs except the
STM's last K rows, and when the update writes in place those are the new rows themselves
(``HostMemory.tail_after``). So with ``overlap=True`` (the default) write i runs on a bookkeeping thread while the
calling thread runs chunk i+1's graphs; writes still run one at a time and in order, so the memory, its RNG draws
and every output are the same as the sequential loop's (tests/runtime/test_memorize.py compares them bit for bit).

Failure: a graph error of chunk i+1 waits for write i first, so the memory holds exactly the chunks before the
failing one, as in the sequential loop; an error of write i is raised (it wins over a later one).
"""
from __future__ import annotations

import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from mplus_deploy.model.rules import short_chunk_warning

from .memory import HostMemory

_POOL: dict = {"pool": None}
_POOL_LOCK = threading.Lock()
# bookkeeping threads shared by all sessions; each session has at most one write in flight. Each thread that
# allocates gets its own glibc malloc arena, which keeps what is freed in it: 2 threads measured +40-50 MiB peak
# RSS on issue 16's bench against one (bench/RESULTS.md), so sessions memorizing at once share them
POOL_THREADS = 2


def _pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if _POOL["pool"] is None:
            _POOL["pool"] = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="mplus-bookkeeping")
        return _POOL["pool"]


def update_graph(cfg, T: int) -> str:
    """The graph of one update of a T-token chunk (docs/graphs.md)."""
    return "memory_update" if T >= cfg.K else "memory_update_short"


def run_updates(core, mem: HostMemory, chunks, overlap: bool = True) -> None:
    """Apply one update per chunk of ``chunks`` (an iterable of id tensors; a progress bar may wrap it) to
    ``mem`` through ``core``'s runner (``core.runner``, ``core.project``, ``core.cfg``)."""
    cfg = core.cfg
    pending: Future | None = None
    tail: torch.Tensor | None = None
    try:
        for chunk in chunks:
            T = chunk.numel()
            msg = short_chunk_warning(T, mem.state.short_chunk_warned)
            if msg:
                warnings.warn(msg, stacklevel=4)  # run_updates < memorize < its lock wrapper < caller
                mem.state.short_chunk_warned = True
            if tail is None:  # the last K rows are not known without the previous write: wait for it
                pending = _join(pending)
                tail = mem.mem_tail()
            delta = core.runner.infer(update_graph(cfg, T), {"ids": chunk, "mem_tail": tail})["delta"].contiguous()
            projected = core.project(delta)
            pending = _join(pending)
            tail = mem.tail_after(delta) if overlap else None
            if tail is None:
                mem.write(delta, projected)
            else:
                if cfg.is_mplus:
                    mem.reserve_update(cfg.K)
                pending = _pool().submit(mem.write, delta, projected)
    except BaseException:
        try:
            _join(pending)
        except Exception as e:  # the earlier update's error is the one to report; this one rode along
            raise e from None
        raise
    _join(pending)


def _join(f: Future | None) -> None:
    if f is not None:
        f.result()
    return None
