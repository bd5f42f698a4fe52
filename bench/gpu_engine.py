"""The GPU engine check (issue 17): one command on the lent CUDA machine, < 8 minutes.

    python bench/gpu_engine.py            # CUDA: the gpu tests, then the benchmark at mplus-8b shapes
    python bench/gpu_engine.py --smoke    # CPU: the same code paths at the `small` preset's shapes (CI runs this)

1. ``pytest -m gpu tests/runtime/test_gpu.py`` (the torch backend on CUDA, its fast path and its quantized weights).
2. At mplus-8b shapes (32 layers, d 4096, random bf16 weights built on the device, STM 10,240 rows, LTM 150k rows
   per layer, P = 12,801 prefix rows), in one process:
   - decode ms/token: the fast path (static cache + CUDA graph) in bf16 and fp8 (``torch._scaled_mm`` weights made
     from the bf16 ones, per-channel scales, static activation scales from one bf16 pass) and the eager path
     (``fast=False``), against the bandwidth floor (weights + the memory K/V read per token / the measured copy
     bandwidth);
   - TTFT (prefill: 32 retrievals over 150k rows + attention over the prefix) at T = 64 and 2048;
   - memorize tok/s (``memory_update`` of 512 tokens + ``memory_project`` of its K rows);
   - retrieval ms per layer (Triton scores + exact top-k, and the host-mapped gather of the K0 rows).
Prints a markdown table (device name first) and writes it to $OUT/gpu_engine.md when OUT is set.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ROWS: list[str] = []


def row(*cells):
    ROWS.append("| " + " | ".join(str(c) for c in cells) + " |")
    print(ROWS[-1], flush=True)


def timed(fn, n: int, dev) -> float:
    """Median ms of ``n`` calls (after one warm-up)."""
    fn()
    out = []
    for _ in range(n):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def build_model(name: str, dev):
    """Random weights in bf16 (fp32 on the CPU) made on the device directly (no host copy of 16 GB)."""
    from mplus_deploy.model import MPlus, preset

    cfg = preset(name)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(dev):
            m = MPlus(cfg)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "norm" in n:
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 1.0 if "embed" in n or n == "bos_embedding" else 0.5 / p.shape[-1] ** 0.5)
    finally:
        torch.set_default_dtype(old)
    return m


def fp8_specs(model, dev) -> dict:
    """``torch_quant`` specs for every linear of the decoder (not the retriever projectors, as ModelOpt's default):
    e4m3 weights with per-channel amax scales, static activation scales from a bf16 pass of random rows."""
    from mplus_deploy.runtime.backends.torch_quant import FP8_MAX, QSpec

    specs = {}
    for name, mod in model.named_modules():
        if name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"):
            w = (mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight).detach()

            def load(w=w):
                s = w.float().abs().amax(1).clamp_min(1e-12) / FP8_MAX
                return {"w": (w.float() / s[:, None]).to(torch.float8_e4m3fn), "s_w": s}

            specs[name] = QSpec("fp8", (name,), load, act_scale=0.05, lora=hasattr(mod, "lora_A"))
    return specs


def bench(dev) -> None:
    from mplus_deploy.runtime.backends.torch_quant import GraphScope, install
    from mplus_deploy.runtime.backends.torch_runner import TorchRunner

    name = "small" if SMOKE else "mplus-8b"
    n_ltm = 4096 if SMOKE else 150_000
    steps = 4 if SMOKE else 32
    model = build_model(name, dev)
    cfg = model.config
    L, Hkv, Dh, P, dt = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dh, cfg.prefix_len, model.dtype
    row("config", name, f"L={L} d={cfg.hidden_size} P={P} LTM={n_ltm}/layer", str(dt), "")
    g = torch.Generator(device=dev).manual_seed(0)
    # copy bandwidth: the floor's denominator
    buf = torch.empty(256 << 20 if not SMOKE else 8 << 20, dtype=torch.uint8, device=dev)
    ms = timed(lambda: buf.clone(), 5, dev)
    bw = 2 * buf.numel() / (ms / 1e3)
    row("copy bandwidth", f"{bw / 1e9:.0f} GB/s", "read+write of a device buffer", "", "")
    buf = None  # noqa: F841 (freed)
    wbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if "embed" not in n and "query_proj" not in n and "key_proj" not in n and "encoder" not in n)

    def memory_feeds():
        f = {"stm_k": torch.randn(L, Hkv, cfg.N, Dh, generator=g, device=dev, dtype=dt).cpu(),
             "stm_v": torch.randn(L, Hkv, cfg.N, Dh, generator=g, device=dev, dtype=dt).cpu(), "memory_id": -1}
        if cfg.is_mplus:
            f.update({"ltm_keys": torch.randn(L, n_ltm, cfg.selector_hidden_dim, generator=g, device=dev, dtype=dt).cpu(),
                      "ltm_k": torch.zeros(L, Hkv, n_ltm, Dh, dtype=dt), "ltm_v": torch.zeros(L, Hkv, n_ltm, Dh, dtype=dt),
                      "ltm_ages": torch.arange(n_ltm, dtype=torch.int64).repeat(L, 1),
                      "valid_len": torch.full((L,), n_ltm, dtype=torch.int64),
                      "merged_len": torch.full((L,), n_ltm, dtype=torch.int64)})
        return f

    feeds = memory_feeds()
    scope = GraphScope()
    for mode in ("fast", "fast+fp8", "eager"):
        r = TorchRunner(model, device=str(dev), fast=mode != "eager")
        if mode == "fast+fp8":
            specs = fp8_specs(model, dev)
            mods = dict(model.named_modules())
            q_params = [(mods[n].base_layer.weight if hasattr(mods[n], "base_layer") else mods[n].weight).numel()
                        for n in specs]
            install(model, {"decode": specs, "prefill": fp8_specs(model, dev)}, scope, dev)
            r._scope = scope
        r.activate()
        T = 64
        ids = torch.randint(0, cfg.vocab_size, (T,))
        pf = {"ids": ids, **feeds, "logit_rows": torch.tensor([T - 1])}
        out = r.infer("prefill", pf, keep=r.prefill_keep)
        cache = r.start_decode(out, P)
        pos = [P + T]

        def step():
            o = r.infer("decode", {"ids": torch.tensor([5]), "pos": torch.tensor(pos[0]), **cache.feeds()}, keep=cache.keep)
            cache.advance(o)
            pos[0] += 1

        ms = timed(step, steps, dev)
        kv_bytes = L * 2 * Hkv * (P + T + steps) * Dh * 2
        wb = wbytes - (sum(q_params) if mode == "fast+fp8" else 0)  # e4m3: one byte per quantized weight
        floor = (wb + kv_bytes) / bw * 1e3
        row(f"decode {mode} ({dt})".replace("torch.", ""), f"{ms:.2f} ms/token", f"floor {floor:.2f} ms (weights {wb / 1e9:.1f} GB + KV {kv_bytes / 1e9:.2f} GB)",
            f"{ms / floor:.2f}x floor", f"{1e3 / ms:.1f} tok/s")
        if mode == "fast":
            for T in (64, 2048 if not SMOKE else 128):
                ids = torch.randint(0, cfg.vocab_size, (T,))
                ms = timed(lambda: r.infer("prefill", {"ids": ids, **feeds, "logit_rows": torch.tensor([T - 1])},
                                           keep=r.prefill_keep), 3, dev)
                row(f"TTFT T={T}", f"{ms:.1f} ms", "prefill: retrieval per layer + prefix attention", "", "")
            if cfg.is_mplus:
                dm = r._memories.get(feeds)
                for T in (64, 2048 if not SMOKE else 128):
                    q = torch.randn(T, cfg.selector_hidden_dim, generator=g, device=dev, dtype=dt)
                    ms = timed(lambda: dm.retrieve(0, q, cfg.K0), 5, dev)
                    row(f"retrieval T={T}", f"{ms:.2f} ms/layer", f"S={n_ltm}, K0={cfg.K0}", "", "")
                idx = dm.retrieve(0, q, cfg.K0)
                ms = timed(lambda: dm.gather(0, idx, dev, dt), 5, dev)
                row("gather K0 rows", f"{ms:.2f} ms/layer", "host-mapped LTM K/V" if dev.type == "cuda" else "CPU", "", "")
            n = 512 if not SMOKE else 64
            up = {"ids": torch.randint(0, cfg.vocab_size, (n,)),
                  "mem_tail": torch.randn(L, cfg.K, cfg.hidden_size, generator=g, device=dev, dtype=dt).cpu()}
            rows = torch.randn(L, cfg.K, cfg.hidden_size, generator=g, device=dev, dtype=dt).cpu()
            ms = timed(lambda: (r.infer("memory_update", up), r.infer("memory_project", {"rows": rows})), 3, dev)
            row("memorize", f"{n / (ms / 1e3):.0f} tok/s", f"{n}-token chunk: memory_update + memory_project", "", "")
        r.deactivate()
        r = out = cache = None  # freed before the next mode's runner


def main() -> int:
    if not SMOKE and not torch.cuda.is_available():
        print("gpu_engine: no CUDA device. Run on the GPU machine, or --smoke on the CPU.", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if SMOKE else "cuda")
    row("device", torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU (smoke)", f"torch {torch.__version__}", "", "")
    rc = 0
    if not SMOKE:
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/runtime/test_gpu.py"], cwd=ROOT,
                           capture_output=True, text=True, timeout=240)
        tail = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(p.stdout[-4000:], p.stderr[-2000:], flush=True)
        row("gpu tests", "pass" if p.returncode == 0 else f"FAIL rc={p.returncode}", tail, f"{time.perf_counter() - t:.0f}s", "")
        rc |= p.returncode != 0
    try:
        with torch.no_grad():
            bench(dev)
    except Exception as e:  # the table so far still prints
        row("bench", "ERROR", f"{type(e).__name__}: {str(e)[:300]}".replace("|", "/").replace("\n", " "), "", "")
        traceback.print_exc()
        rc = 1
    table = "| what | value | detail | ratio | rate |\n| --- | --- | --- | --- | --- |\n" + "\n".join(ROWS)
    print("\n" + table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_engine.md").write_text(table + "\n")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
