"""``profile(path, ...)``: per-stage latency of an exported artifact (or a torch source) through ``Engine``.

Stages (each timed separately, p50 / p90 / p99 over all repeats):

- memorize, per chunk of ``max_chunk`` tokens: wall time, of which the ``memory_update`` graph, the
  ``memory_project`` graph (the K new STM rows), and the host memory manager (drops, pending, merges);
- retrieval, per layer and summed over the layers: the standalone ``retriever`` graph on the prompt's
  shape and the live LTM (the prefill graph runs the same retrieval in-graph, so prefill includes it);
- prefill (one graph call), time to first token (TTFT, wall), decode per token (graph call and wall),
  host overhead per token (wall − graph: sampling, feed building, Python), sampling alone, tokenization;
- query latency (prefill + first token) as a function of LTM size; the LTM is filled synthetically:
  random K/V rows, retriever keys (scaled like the STM's), distinct ages and rf = RF0 are written
  straight into the host memory manager, no text is pushed through the model.

Timing hooks: the engine's runner is wrapped in a ``TimedRunner``; nothing in the engine is patched.
"""
from __future__ import annotations

import gc
import os
import platform
import time
import warnings

import torch

from mplus_deploy.util.machine import cpu_name
from . import bandwidth as bw
from .plan import DEFAULT_LTM_SIZES, DEFAULT_PROMPT_LENS, Settings, ltm_row_bytes, plan  # noqa: F401 (re-exported)
from .report import stage_rows
from .timing import (TimedRunner, available_ram_bytes, cuda_memory, measure_bandwidth, peak_rss_mb, rss_mb,
                     stats_ms)

SCHEMA = "mplus-profile/1"


def fill_ltm(hm, rows: int, seed: int = 0) -> None:
    """Replace every layer's merged LTM by ``rows`` synthetic rows (K/V form), pending emptied.

    K/V and keys are Gaussian with the STM's own scale, ages distinct and older than any STM row,
    rf = RF0. Retrieval cost depends on shapes, not values, so this times what a real LTM of that size
    costs without pushing the tokens through the model."""
    cfg = hm.cfg
    g = torch.Generator().manual_seed(seed)
    kv_std = float(torch.cat([hm.stm_k.flatten(), hm.stm_v.flatten()]).float().std())
    key_std = float(hm.stm_keys.float().std()) if hm.stm_keys is not None and hm.stm_keys.numel() else 1.0
    rf0 = float(cfg.initial_rf_when_moving_stm_to_ltm)
    store = hm.reset_ltm(rows)  # frees the old buffers first
    for l in range(hm.L):
        store.k[l, :, :rows].normal_(0.0, kv_std, generator=g)
        store.v[l, :, :rows].normal_(0.0, kv_std, generator=g)
        store.keys[l, :rows].normal_(0.0, key_std, generator=g)
        store.ages[l, :rows] = torch.arange(cfg.N + rows - 1, cfg.N - 1, -1, dtype=torch.float64)
        store.rf[l, :rows] = rf0
    hm.state.touch()


# ---------------------------------------------------------------------------------- helpers
def machine_info(device: str = "cpu") -> dict:
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # a torch-only machine
        ort_version = None
    cpu = cpu_name()
    ram = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 2**20
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort_version, "torch_threads": torch.get_num_threads()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g, dtype=torch.int64)


def _limits(source) -> dict:
    m = source.manifest or {}
    return dict(m.get("limits") or {})


def _itemsize(source, cfg) -> int:
    prec = ((source.manifest or {}).get("precision") or "fp32")
    return {"fp16": 2, "bf16": 2}.get(str(prec), 4)


def _weight_bytes(eng, source) -> tuple[int, str]:
    from mplus_deploy.artifact import graph_path

    runner = eng.runner.inner if isinstance(eng.runner, TimedRunner) else eng.runner
    if getattr(runner, "name", "") == "torch":
        return bw.torch_decode_weight_bytes(runner.model), "torch parameters used by decode"
    f = graph_path(source.root, source.manifest, "decode")
    return bw.onnx_decode_weight_bytes(f), "initializers of graphs/decode.onnx"


# ---------------------------------------------------------------------------------- stages
def _memorize(eng, timed: TimedRunner, s: Settings, log) -> dict:
    cfg = eng.config
    C = int(cfg.max_chunk)
    n = s.memorize_chunks or (cfg.update_ltm_frequency + 1 if cfg.is_mplus else 4)
    sess = eng.session(seed=s.seed)
    for w in range(s.warmup):
        eng.session(seed=s.seed).memorize(_ids(C, cfg.vocab_size, 1000 + w), chunk_size=C, progress=False)
    wall, upd, proj, host = [], [], [], []
    for i in range(n):
        ids = _ids(C, cfg.vocab_size, 2000 + i)
        m = timed.mark()
        t0 = time.perf_counter()
        sess.memorize(ids, chunk_size=C, progress=False)
        dt = time.perf_counter() - t0
        g_u = timed.total(m, "memory_update") + timed.total(m, "memory_update_short")
        g_p = timed.total(m, "memory_project")
        wall.append(dt), upd.append(g_u), proj.append(g_p), host.append(max(dt - g_u - g_p, 0.0))
    log(f"memorize: {n} chunks of {C} tokens, p50 {stats_ms(wall)['p50']:.1f} ms/chunk")
    del sess
    return {"chunk_tokens": C, "chunks": n, "per_chunk_ms": stats_ms(wall), "memory_update_ms": stats_ms(upd),
            "memory_project_ms": stats_ms(proj), "host_ms": stats_ms(host),
            "tokens_per_s": C * n / sum(wall), "merges": n // cfg.update_ltm_frequency if cfg.is_mplus else 0}


def _scalar_feed(timed: TimedRunner):
    """0-d int64 feeds. The ORT runner turns 0-d tensors into shape [1] (``np.ascontiguousarray`` returns
    ndim >= 1), which the retriever graph rejects; an ``OrtValue`` is bound as is."""
    if timed.name == "onnxruntime":
        import numpy as np
        import onnxruntime as ort

        return lambda x: ort.OrtValue.ortvalue_from_numpy(np.array(int(x), dtype=np.int64))
    return lambda x: torch.tensor(int(x), dtype=torch.int64)


def _retrieval(eng, timed: TimedRunner, sess, T: int, repeat: int, seed: int) -> dict | None:
    """The standalone retriever graph, every layer, on the live LTM and a [T, d] layer input."""
    cfg = eng.config
    if not cfg.is_mplus or "retriever" not in timed.graphs():
        return None
    f = sess.host_memory.prefill_feeds()
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, cfg.hidden_size, generator=g).to(f["stm_k"].dtype)
    scalar = _scalar_feed(timed)
    feeds = [{"layer": scalar(l), "h": h, "ltm_keys": f["ltm_keys"][l], "ltm_ages": f["ltm_ages"][l],
              "valid_len": scalar(f["valid_len"][l]), "merged_len": scalar(f["merged_len"][l])}
             for l in range(cfg.num_hidden_layers)]
    per_layer = [[] for _ in range(cfg.num_hidden_layers)]
    total = []
    for r in range(repeat + 1):
        m = timed.mark()
        for l in range(cfg.num_hidden_layers):
            timed.infer("retriever", feeds[l])
        calls = timed.since(m, "retriever")
        if r == 0:
            continue  # warm-up
        for l, c in enumerate(calls):
            per_layer[l].append(c.seconds)
        total.append(sum(c.seconds for c in calls))
    return {"total_ms": stats_ms(total), "per_layer_ms": [stats_ms(x) for x in per_layer],
            "rows_scored": int(f["valid_len"].max()), "padded_rows": int(f["ltm_keys"].shape[1])}


def _query(eng, timed: TimedRunner, T: int, s: Settings) -> dict:
    cfg = eng.config
    ids = _ids(T, cfg.vocab_size, 3000 + T)
    sess = eng.session(seed=s.seed)
    sess.host_memory.prefill_feeds()  # pack once; feed packing is timed in the LTM sweep
    for _ in range(s.warmup):
        sess.generate_ids(ids, max_new_tokens=min(s.new_tokens, 4), stop_at_eos=False)
    prefill, ttft, orchestr, dec, dec_wall, host_tok, total, ntok = [], [], [], [], [], [], [], 0
    for _ in range(s.repeat):
        m = timed.mark()
        t0 = time.perf_counter()
        out = sess.generate_ids(ids, max_new_tokens=s.new_tokens, stop_at_eos=False)
        t_end = time.perf_counter()
        ntok += int(out.numel())
        total.append(t_end - t0)
        calls = timed.since(m)
        pf = [c for c in calls if c.graph == "prefill"][0]
        ds = [c for c in calls if c.graph == "decode"]
        prefill.append(pf.seconds)
        orchestr.append(pf.start - t0)
        ttft.append((ds[0].start if ds else t_end) - t0)
        for i, c in enumerate(ds):
            nxt = ds[i + 1].start if i + 1 < len(ds) else t_end
            dec.append(c.seconds)
            dec_wall.append(nxt - c.start)
            host_tok.append(nxt - c.start - c.seconds)
    ret = _retrieval(eng, timed, sess, T, s.repeat, seed=T)
    res = {"prompt_len": T, "new_tokens": s.new_tokens, "tokens_generated": ntok, "runs": s.repeat,
           "prefill_ms": stats_ms(prefill), "ttft_ms": stats_ms(ttft), "pre_prefill_host_ms": stats_ms(orchestr),
           "decode_ms": stats_ms(dec), "decode_wall_ms": stats_ms(dec_wall), "host_per_token_ms": stats_ms(host_tok),
           "total_ms": stats_ms(total), "retrieval": ret}
    p50 = res["decode_wall_ms"]["p50"]
    res["decode_tokens_per_s"] = 1e3 / p50 if p50 else None
    res["e2e_tokens_per_s"] = ntok / sum(total)
    res["prefill_tokens_per_s"] = T / (res["prefill_ms"]["p50"] / 1e3)
    if ret is not None:
        res["prefill_excl_retrieval_ms_p50"] = max(res["prefill_ms"]["p50"] - ret["total_ms"]["p50"], 0.0)
    del sess
    return res


def _ltm_point(eng, timed: TimedRunner, size: int, prompts, s: Settings, log) -> dict:
    cfg = eng.config
    sess = eng.session(seed=s.seed)
    hm = sess.host_memory
    synthetic = bool(size)
    t0 = time.perf_counter()
    if synthetic:
        fill_ltm(hm, size, seed=s.seed)
    fill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hm.prefill_feeds()
    pack_s = time.perf_counter() - t0
    rows = hm.stats()["ltm_rows"] if cfg.is_mplus else [0]
    by_prompt = []
    for T in prompts:
        ids = _ids(T, cfg.vocab_size, 4000 + T)
        for _ in range(s.warmup):
            sess.generate_ids(ids, max_new_tokens=1, stop_at_eos=False)
        q, pf = [], []
        for _ in range(s.repeat):
            m = timed.mark()
            t1 = time.perf_counter()
            sess.generate_ids(ids, max_new_tokens=1, stop_at_eos=False)
            q.append(time.perf_counter() - t1)
            pf.append(timed.total(m, "prefill"))
        ret = _retrieval(eng, timed, sess, T, s.repeat, seed=T)
        by_prompt.append({"prompt_len": T, "query_ms": stats_ms(q), "prefill_ms": stats_ms(pf),
                          "retrieval_total_ms": ret["total_ms"] if ret else None})
    point = {"requested": size, "synthetic": synthetic, "ltm_rows": min(rows), "ltm_rows_per_layer": rows,
             "fill_s": fill_s, "feed_pack_ms": pack_s * 1e3, "by_prompt": by_prompt, "peak_rss_mb": peak_rss_mb()}
    log(f"LTM {min(rows)} rows/layer: query p50 " + ", ".join(f"T={b['prompt_len']}: {b['query_ms']['p50']:.1f} ms"
                                                          for b in by_prompt))
    del sess, hm
    gc.collect()
    return point


def _host(eng, s: Settings) -> dict:
    from mplus_deploy.model.sampling import next_token

    cfg = eng.config
    logits = torch.randn(cfg.vocab_size)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, kw in (("sampling_greedy_ms", dict(do_sample=False)),
                     ("sampling_top_p_ms", dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=50))):
        ts = []
        for i in range(200 + 20):
            t0 = time.perf_counter()
            next_token(logits, generator=g, **kw)
            if i >= 20:
                ts.append(time.perf_counter() - t0)
        out[name] = stats_ms(ts)
    codec = eng.codec
    out["tokenize_ms"] = out["detokenize_per_token_ms"] = None
    if codec is not None and getattr(codec, "tok", None) is not None:
        T = max(s.prompt_lens)
        ids = _ids(T, cfg.vocab_size, 5)
        try:
            text = codec.decode(ids)
            enc, dec = [], []
            for _ in range(max(s.repeat, 5)):
                t0 = time.perf_counter()
                n_enc = codec.encode_prompt(text).numel()
                enc.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                codec.decode(ids[:32])
                dec.append((time.perf_counter() - t0) / min(32, T))
            out["tokenize_ms"] = stats_ms(enc)
            out["tokenize_tokens"] = int(n_enc)
            out["detokenize_per_token_ms"] = stats_ms(dec)
        except Exception as e:  # noqa: BLE001 - a tokenizer that cannot round-trip random ids
            out["tokenize_error"] = f"{type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------------------------------- entry point
def profile(path, backend: str = "auto", device: str = "cpu", threads: int | None = None,
            settings: Settings | None = None, log=print) -> dict:
    from mplus_deploy.runtime import Engine

    s = settings or Settings()
    if threads:
        torch.set_num_threads(int(threads))
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the timing hook: the runner the engine (and every session) calls by graph name, wrapped
        eng = Engine(path, backend=backend, device=device, threads=threads, seed=s.seed,
                     wrap=lambda r: TimedRunner(r, device))
    load_s = time.perf_counter() - t0
    timed = eng.runner
    source, cfg = eng.source, eng.config
    limits = _limits(source)
    item = _itemsize(source, cfg)
    eng.host_memory.prefill_feeds() if cfg.is_mplus else None
    rss_load = rss_mb()
    s = plan(cfg, limits, s, eng.backend, ltm_row_bytes(cfg, item), available_ram_bytes())
    for n in s.notes:
        log(f"note: {n}")
    log(f"profiling {path} ({eng.backend}, {device}): prompts {list(s.prompt_lens)}, LTM sizes "
        f"{list(s.ltm_sizes)}, {s.new_tokens} new tokens, warmup {s.warmup}, repeat {s.repeat}")
    res = {"schema": SCHEMA, "artifact": str(path), "backend": eng.backend, "device": device,
           "runner": eng.describe(), "machine": machine_info(device),
           "config": {"kind": cfg.kind, "L": cfg.num_hidden_layers, "d": cfg.hidden_size, "Hkv": cfg.num_key_value_heads,
                      "Dh": cfg.dh, "vocab": cfg.vocab_size, "K": cfg.K, "N": cfg.N,
                      "K0": cfg.K0 if cfg.is_mplus else 0, "P": cfg.prefix_len, "max_window": cfg.max_window,
                      "max_chunk": cfg.max_chunk, "update_ltm_frequency": cfg.update_ltm_frequency,
                      "itemsize": item, "limits": limits},
           "settings": {"prompt_lens": list(s.prompt_lens), "ltm_sizes": list(s.ltm_sizes), "new_tokens": s.new_tokens,
                        "warmup": s.warmup, "repeat": s.repeat, "seed": s.seed, "notes": s.notes,
                        "synthetic_ltm": "LTM rows beyond the artifact's initial memory are synthetic: random K/V rows, "
                                         "keys and ages written straight into the host memory manager (no tokens "
                                         "pushed through the model); size 0 = the artifact's initial LTM"},
           "load_s": load_s}
    res["bandwidth"] = {"machine": measure_bandwidth(device=device)}
    res["host"] = _host(eng, s)
    res["memorize"] = _memorize(eng, timed, s, log)
    rss_mem = peak_rss_mb()
    res["queries"] = []
    for T in s.prompt_lens:
        q = _query(eng, timed, T, s)
        res["queries"].append(q)
        log(f"query T={T}: prefill p50 {q['prefill_ms']['p50']:.1f} ms, decode p50 {q['decode_wall_ms']['p50'] or 0:.2f} "
            f"ms/token ({q['decode_tokens_per_s'] or 0:.1f} tok/s)")
    rss_q = peak_rss_mb()
    wbytes, wsrc = _weight_bytes(eng, source)
    mach = res["bandwidth"]["machine"]
    dec_rows = []
    for q in res["queries"]:
        tr = bw.decode_traffic(cfg, wbytes, q["prompt_len"], s.new_tokens, item)
        for key, which in (("achieved_gbps", "decode_ms"), ("achieved_gbps_wall", "decode_wall_ms")):
            p50 = q[which]["p50"]
            tr[key] = tr["bytes_per_step"] / (p50 / 1e3) / 1e9 if p50 else None
        tr["pct_of_read_bw"] = 100 * tr["achieved_gbps"] / mach["read_gbps"] if tr["achieved_gbps"] else None
        tr["pct_of_copy_bw"] = 100 * tr["achieved_gbps"] / mach["copy_gbps"] if tr["achieved_gbps"] else None
        tr["prompt_len"], tr["decode_tokens_per_s"] = q["prompt_len"], q["decode_tokens_per_s"]
        dec_rows.append(tr)
    res["bandwidth"].update({"weight_bytes_source": wsrc, "decode": dec_rows})
    res["ltm_sweep"] = [_ltm_point(eng, timed, n, s.prompt_lens, s, log) for n in s.ltm_sizes]
    res["memory"] = {"rss_start_mb": rss0, "rss_after_load_mb": rss_load, "peak_rss_after_memorize_mb": rss_mem,
                     "peak_rss_after_queries_mb": rss_q, "peak_rss_mb": peak_rss_mb(),
                     "cuda": cuda_memory() if device == "cuda" else None}
    res["stages"] = stage_rows(res)
    eng.close()
    return res
