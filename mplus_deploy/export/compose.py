"""Host composition of the exported graphs in onnxruntime CPU, for validation and tests only (the real
runtime lives in ``mplus_deploy.runtime``): ids → memory_update(_short) → host drop/write
(``MemoryState.draw_drops``/``write_stm``, spec §4, §9) → memory_project (retriever keys of dropped rows,
K/V of the memory) → prefill → decode loop.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mplus_deploy.model.config import MPlusConfig
from mplus_deploy.model.memory import MemoryState
from mplus_deploy.runtime.graph_io import resolve
from mplus_deploy.runtime.backends.ort_weights import SharedInitializers
from mplus_deploy.runtime.kvcache import DecodeCache

from . import prefill as prefill_mod
from .manifest import load_manifest, load_memory_state
from .validate import np_dtype, ort_session


class GraphComposer:
    def __init__(self, out: Path, memory: MemoryState | None = None, verify: bool = True,
                 shared: SharedInitializers | None = None):
        self.out = Path(out)
        self.manifest = load_manifest(self.out, verify=verify)
        self.cfg = MPlusConfig.from_dict(self.manifest["config"])
        self.precision = self.manifest["precision"]
        self.dtype = np_dtype(self.precision)
        if self.dtype is None:
            raise ValueError(f"onnxruntime CPU cannot run {self.precision} graphs")
        self.shared = shared if shared is not None else SharedInitializers()  # one mapped copy for all graphs
        self.sessions = {n: ort_session(self.out / g["file"], shared=self.shared) for n, g in self.manifest["graphs"].items()}
        self.mem = memory if memory is not None else load_memory_state(self.out, self.cfg)
        self.max_chunk = int(self.manifest["limits"]["max_chunk"])

    def run(self, graph: str, **feeds) -> dict[str, torch.Tensor]:
        sess = self.sessions[graph]
        np_feeds = {}
        for i in sess.get_inputs():
            t = resolve(feeds, i.name)
            t = t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t)
            np_feeds[i.name] = t.float().numpy().astype(self.dtype) if t.dtype.is_floating_point else t.numpy().astype(np.int64)
        names = [o.name for o in sess.get_outputs()]
        return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(names, sess.run(names, np_feeds))}

    # ------------------------------------------------------------------ memory update
    def inject(self, ids) -> None:
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        for s in range(0, ids.numel(), self.max_chunk):
            self._inject_chunk(ids[s : s + self.max_chunk])

    def _inject_chunk(self, ids: torch.Tensor) -> None:
        cfg, mem = self.cfg, self.mem
        if not mem.initialized:
            raise NotImplementedError("uninitialized MemoryLLM memory (first update tiles the delta) is not exported")
        K, N = cfg.K, cfg.N
        graph = "memory_update" if ids.numel() >= K else "memory_update_short"
        delta = self.run(graph, ids=ids, mem_tail=mem.stm[:, N - K:])["delta"].to(mem.stm.dtype)
        keep, drop = mem.draw_drops()
        dropped, dropped_age = mem.write_stm(delta, keep, drop)
        if cfg.is_mplus:
            keys = self.run("memory_project", rows=dropped)["keys"].to(dropped.dtype)
            mem.append_pending(dropped, keys, dropped_age)
        mem.touch()

    # ------------------------------------------------------------------ generation
    def prefill_feeds(self, ids: torch.Tensor) -> dict:
        feeds = prefill_mod.memory_feeds(self.cfg, self.mem, lambda rows: self.run("memory_project", rows=rows))
        feeds["ids"] = ids
        return feeds

    def prefill(self, ids) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if self.cfg.is_mplus and any(t.shape[0] == 0 for t in self.mem.ltm):
            raise ValueError("the long-term memory is empty: retrieval is undefined (spec §8)")
        return self.run("prefill", **self.prefill_feeds(ids))

    def prefill_logits(self, ids) -> torch.Tensor:
        return self.prefill(ids)["logits"]

    def generate(self, ids, max_new_tokens: int = 8, stop_at_eos: bool = True) -> torch.Tensor:
        """Greedy continuation (the new tokens only), as ``MPlus.generate(do_sample=False)``."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if max_new_tokens <= 0:
            return torch.zeros(0, dtype=torch.int64)
        eos = self.cfg.eos_token_id
        eos = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        o = self.prefill(ids)
        cache = DecodeCache(o["present_k"], o["present_v"], self.cfg.prefix_len)
        pos = self.cfg.prefix_len + ids.numel()
        tok = int(torch.argmax(o["logits"][-1]))
        out = []
        while True:
            out.append(tok)
            if len(out) >= max_new_tokens or (stop_at_eos and tok in eos):
                break
            d = self.run("decode", ids=torch.tensor([tok]), pos=torch.tensor(pos), **cache.feeds())
            cache.advance(d)
            pos += 1
            tok = int(torch.argmax(d["logits"][0]))
        return torch.tensor(out, dtype=torch.int64)
