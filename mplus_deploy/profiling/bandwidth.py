"""Bytes one decode step must read (gpt-fast's "achieved bandwidth" numerator).

Decode at batch 1 is bandwidth-bound: every step reads every weight it uses once, plus the whole KV
cache, which in M+ starts with the P = 1 + K0 + N memory prefix rows of every layer (platform-notes
§6.2: "Memory K/V adds to every decode step"). So

    bytes/step = decode weights + L · 2 · Hkv · Dh · C · itemsize,   C = P + prompt + tokens so far

- ONNX artifacts: the decode graph's own initializers (their real stored size, so int8 / int4 weights
  count as such). An initializer only read by ``Gather`` (an untied embedding table) counts one row.
- torch: the model's parameters minus what decode never touches (retriever projectors, bos embedding,
  the memory positional embedding, the memory-update LoRA adapter); an untied embedding counts one row.

Not counted: activations, and the cache copy the decode graph makes: it reads the memory prefix in place
and writes only the tail (prompt + tokens so far) grown by the new row (``Concat``: L · 2 · [Hkv, C-P+1, Dh]
per step, artifact format v2); that copy is reported separately as ``kv_copy_bytes``. (The torch backend's
reference step still concatenates the whole cache.)
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

DECODE_SKIP = ("query_proj", "key_proj", "encoder_query_proj", "bos_embedding", "new_memory_positional_emb",
               ".default.")  # ".default." = LoRA of the memory-update adapter (W_enc), unused at decode


def onnx_decode_weight_bytes(graph_file: Path) -> int:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(graph_file), load_external_data=False)
    consumers = defaultdict(set)
    for node in model.graph.node:
        for i in node.input:
            consumers[i].add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        count = int(np.prod(init.dims)) if init.dims else 1
        if "length" in ext:
            nbytes = int(ext["length"])
        elif init.raw_data:
            nbytes = len(init.raw_data)
        else:
            try:
                nbytes = count * np.dtype(tensor_dtype_to_np_dtype(init.data_type)).itemsize
            except Exception:  # noqa: BLE001 - exotic dtypes (int4, fp8): one byte per element is an upper bound
                nbytes = count
        if consumers.get(init.name) == {"Gather"} and init.dims:
            nbytes //= max(int(init.dims[0]), 1)  # an embedding lookup reads one row per token
        total += nbytes
    return int(total)


def torch_decode_weight_bytes(model) -> int:
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():  # tied lm_head / embedding appear once
        if any(s in name for s in DECODE_SKIP):
            continue
        nbytes = p.numel() * p.element_size()
        if name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            nbytes //= p.shape[0]
        total += nbytes
    return int(total)


def kv_bytes(cfg, cache_len: int, itemsize: int) -> int:
    return int(cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.dh * cache_len * itemsize)


def decode_traffic(cfg, weight_bytes: int, prompt_len: int, new_tokens: int, itemsize: int) -> dict:
    """Mean bytes per decode step over a generation (the cache grows by one row per step)."""
    P = cfg.prefix_len
    steps = max(new_tokens - 1, 1)  # the first token comes from prefill
    mean_c = P + prompt_len + (steps - 1) / 2  # cache length read by decode step g: P + T + g
    kv = kv_bytes(cfg, 1, itemsize) * mean_c
    return {"weight_bytes": int(weight_bytes), "kv_bytes": int(kv), "memory_prefix_kv_bytes": kv_bytes(cfg, P, itemsize),
            "bytes_per_step": int(weight_bytes + kv), "kv_copy_bytes": int(kv_bytes(cfg, 1, itemsize) * (mean_c - P + 1)),
            "mean_cache_len": float(mean_c)}
