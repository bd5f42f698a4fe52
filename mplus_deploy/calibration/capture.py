"""Capture the inputs of every exported graph while texts run through the runtime (``runtime.Engine`` over
the artifact's fp32 graphs, its runner wrapped by :class:`CaptureRunner`: the calls users' engines make).

Per calibration text ``i`` (ids capped at ``max_tokens``):

1. memorize: ``text_i + text_{i+1}`` (>= K tokens for real texts → ``memory_update``) on even ``i``; on
   ``i = 1 mod 4`` one short chunk of K/2..K-1 tokens (→ ``memory_update_short``), on ``i = 3 mod 4`` the
   first two thirds of ``text_i``; every update also runs ``memory_project`` on the dropped rows;
2. query: ``text_i`` as the prompt (``prefill`` with real T > 1 rows, so the MatMuls see M = T, never the
   M = 1 GEMV case that ModelOpt skips), memory K/V through ``memory_project`` (M = N + S rows);
3. ``n_decode`` greedy ``decode`` steps after the prompt. Decode is M = 1 by construction; its samples are
   real decode steps (KV cache of real prompts) and ModelOpt's GEMV exclusion is switched off for it
   (docs/quantization.md).

The memory state starts from the artifact's ``memory/initial.safetensors`` and is reset every
``reset_every`` texts (2): the untrained demo M+ drifts into garbage after a few dozen accumulated
updates, and calibration should see the activations of the regime the model is used in. Feeds are kept per graph with reservoir sampling
(``max_per_graph``, seeded), so memory stays bounded whatever the corpus size. At paper scale one sample
carries the memory (a prefill sample at mplus-8b width: 234 MB per layer of STM/LTM K/V; a decode sample its
105 MB prefix), so two more bounds apply: equal arrays of >= 1 MiB are stored once (the decode steps of
one generation share their prefix), and a graph keeps at most ``max_bytes_per_graph`` of samples (the
reservoir shrinks to fit, never below ``MIN_SAMPLES``; the count kept is in the report's calibration section).
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from mplus_deploy.artifact import graph_info
from mplus_deploy.artifact.graph_io import all_rows, resolve
from mplus_deploy.runtime.backends.recording import RecordingRunner


MAX_BYTES_PER_GRAPH = 1 << 30
MIN_SAMPLES = 4
DEDUPE_BYTES = 1 << 20


class _Pool:
    """Arrays of >= ``DEDUPE_BYTES`` by content (blake2b of the bytes): equal feeds share one copy."""

    def __init__(self):
        self.arrays: dict = {}

    def put(self, a: np.ndarray) -> np.ndarray:
        if a.nbytes < DEDUPE_BYTES:
            return np.array(a, copy=True)
        a = np.ascontiguousarray(a)
        key = (a.dtype.str, a.shape, hashlib.blake2b(memoryview(a).cast("B"), digest_size=16).digest())
        if key not in self.arrays:
            self.arrays[key] = np.array(a, copy=True)
        return self.arrays[key]

    def prune(self, stores) -> None:
        live = {id(v) for s in stores for f in s for v in f.values()}
        self.arrays = {k: v for k, v in self.arrays.items() if id(v) in live}


def _numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v.numpy() if hasattr(v, "numpy") else v)  # an OrtValue decode tail


class CaptureRunner(RecordingRunner):
    """The runtime's ``RecordingRunner`` (the same reservoir over every graph call) keeping feeds by graph input
    name, as the numpy arrays ModelOpt's calibration reader hands to onnxruntime. ``prefill`` samples ask logits
    for every prompt row (the engine asks for the last one), so its lm_head sees M = T rows, not ModelOpt's
    skipped GEMV; ``memory_project`` samples keep ``max_rows`` random rows; each graph's reservoir shrinks to
    ``max_bytes`` (never below ``MIN_SAMPLES``) and equal large arrays are stored once (``_Pool``)."""

    def __init__(self, inner, manifest: dict, cap: int, rng: random.Random, max_rows: int | None,
                 max_bytes: int = MAX_BYTES_PER_GRAPH):
        super().__init__(inner, per_graph=cap)
        self.rng, self.manifest, self.max_rows, self.max_bytes = rng, manifest, max_rows, max_bytes
        self.pool = _Pool()
        self.caps: dict[str, int] = {}

    def prepare(self, graph: str, feeds: dict) -> dict:
        names = [i["name"] for i in graph_info(self.manifest, graph)["inputs"]]
        src = {**feeds, "logit_rows": all_rows(feeds["ids"])} if graph == "prefill" else feeds
        f = {n: _numpy(resolve(src, n)) for n in names}
        if graph == "memory_project" and self.max_rows and f["rows"].shape[1] > self.max_rows:  # subsample rows
            idx = np.sort(np.asarray(self.rng.sample(range(f["rows"].shape[1]), self.max_rows)))
            f["rows"] = np.ascontiguousarray(f["rows"][:, idx])
        return f

    def capacity(self, graph: str, item: dict, n: int) -> int:
        if n == 1:  # the byte budget fixes the reservoir size from the first sample
            per = sum(v.nbytes for v in item.values())
            self.caps[graph] = max(min(self.per_graph, MIN_SAMPLES), min(self.per_graph, self.max_bytes // max(1, per)))
        return self.caps[graph]

    def stored(self, graph: str, item: dict) -> dict:
        return {n: self.pool.put(v) for n, v in item.items()}

    def replaced(self, graph: str) -> None:
        self.pool.prune(self.samples.values())


def _plan(ids_list: list[torch.Tensor], i: int, K: int) -> torch.Tensor:
    ids = ids_list[i]
    if i % 2 == 0:
        nxt = ids_list[(i + 1) % len(ids_list)] if len(ids_list) > 1 else ids
        return torch.cat([ids, nxt])
    if i % 4 == 1:  # one short chunk (K/2 <= T < K) → memory_update_short
        return ids[: max(1, min(ids.numel(), K - 1 - (i // 4) % max(1, K // 2)))]
    return ids[: max(1, (2 * ids.numel()) // 3)]


@torch.no_grad()
def capture(out: Path, texts: list[str], encode, max_tokens: int = 256, n_decode: int = 8, max_per_graph: int = 32,
            max_rows: int | None = 256, seed: int = 0, progress: bool = False, desc: str = "calibration",
            reset_every: int = 2) -> dict:
    """Run ``texts`` through the fp32 graphs of ``out`` on ``runtime.Engine``; returns ``{"feeds": {graph: [feed
    dicts]}, "calls": {graph: n}, "tokens": {...}}``."""
    import warnings

    from mplus_deploy.runtime import Engine

    rng = random.Random(seed)
    box = {}

    def wrap(r):
        box["cap"] = CaptureRunner(r, r.manifest, max_per_graph, rng, max_rows)
        return box["cap"]

    ids_list = [encode(t)[:max_tokens] for t in texts]
    ids_list = [x for x in ids_list if x.numel() >= 2]
    if not ids_list:
        from .data import CalibrationError

        raise CalibrationError("no calibration text is at least 2 tokens long")
    # attention="graph": the decode feeds captured are the artifact's decode contract (not the runtime's fused form)
    eng = Engine(Path(out), backend="onnxruntime", wrap=wrap, attention="graph")  # the artifact's own drop-RNG state
    try:
        cfg, cap = eng.config, box["cap"]
        # the engine's window rule: prompt + new tokens <= max_window (spec §8)
        max_prompt = min(int(cap.manifest["limits"]["max_prompt"]), int(cfg.max_window) - 1)
        tok = {"memorized": 0, "prompt": 0, "decoded": 0}
        it = range(len(ids_list))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=desc, unit="text")
        for i in it:
            if reset_every and i % reset_every == 0:
                eng.reset_memory()
            mem_ids = _plan(ids_list, i, cfg.K)
            with warnings.catch_warnings():  # the short chunks are deliberate (they exercise memory_update_short)
                warnings.filterwarnings("ignore", message="memorizing a chunk of", category=UserWarning)
                eng.memorize(mem_ids, chunk_size=None, progress=False)
            tok["memorized"] += int(mem_ids.numel())
            prompt = ids_list[i][: max(1, max_prompt - n_decode)]  # + n_decode + 1 new tokens
            eng.generate_ids(prompt, max_new_tokens=n_decode + 1, stop_at_eos=False)
            tok["prompt"] += int(prompt.numel())
            tok["decoded"] += n_decode
    finally:
        eng.close()
    return {"feeds": cap.samples, "calls": dict(cap.calls), "tokens": tok, "texts": len(ids_list)}


class FeedReader:
    """onnxruntime ``CalibrationDataReader`` over captured feeds; rewinds after reporting the end, so the
    several calibration passes ModelOpt makes (GEMV/MHA analysis, then ranges) all see every sample."""

    def __init__(self, feeds: list[dict], input_names: list[str] | None = None):
        self.feeds = feeds
        self.names = input_names
        self.i = 0

    def get_next(self):
        if self.i >= len(self.feeds):
            self.i = 0
            return None
        f = self.feeds[self.i]
        self.i += 1
        return {k: v for k, v in f.items() if self.names is None or k in self.names}

    def __iter__(self):  # ModelOpt's AWQ iterates the reader
        for f in self.feeds:
            yield {k: v for k, v in f.items() if self.names is None or k in self.names}

    def rewind(self):
        self.i = 0

    def set_range(self, start_index: int, end_index: int):  # ORT API (batched calibration)
        self.i = start_index

    def __len__(self):
        return len(self.feeds)
