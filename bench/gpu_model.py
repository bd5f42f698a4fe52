"""GPU timing of the torch reference at 8B layer shapes (run on the lent CUDA machine).

Two decoder layers of Llama-3-8B shape (d 4096, 32/8 heads, FFN 14336, vocab 128256), M+ memory at
full size (K 256, N 10240, K0 2560, LTM 20480 rows), bf16. Times inject (T=512), prefill (T=2048,
direct vs K/V fast path, spec R1/R2) and decode steps (CUDA events, medians). Per-layer numbers
scale to 32 layers linearly (embedding/lm_head excluded). Writes $OUT/gpu_model.md when OUT is set.
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from mplus_deploy.model import MPlus, preset  # noqa: E402
from mplus_deploy.model import forward as F_  # noqa: E402


def cuda_time(fn, n=5, warm=1):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    smoke = "--smoke" in sys.argv  # CPU code-path check at tiny sizes
    if not torch.cuda.is_available() and not smoke:
        print("gpu_model: no CUDA device (use --smoke for a CPU code-path check)", file=sys.stderr)
        return 2
    global cuda_time
    dev = "cpu" if smoke else "cuda"
    L = int(os.environ.get("LAYERS", "2"))
    S0 = 64 if smoke else 20480
    T_inj, T_pre = (16, 32) if smoke else (512, 2048)
    base = preset("tiny").replace(max_window=128) if smoke else preset("mplus-8b").replace(max_window=2048 + 64)
    cfg = base.replace(num_hidden_layers=L, ltm_initial_size=S0)
    if smoke:
        import time

        def cuda_time(fn, n=1, warm=0):  # noqa: F811
            t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e3
    torch.manual_seed(0)
    with torch.device(dev):
        m = MPlus(cfg)
    m = m.to(torch.bfloat16)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    mem = m.memory
    mem.stm = torch.randn(L, cfg.N, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    for l in range(L):
        mem.ltm[l] = torch.randn(S0, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        mem.ltm_keys[l] = m.retriever_keys(mem.ltm[l][None].expand(L, -1, -1))[l]
        mem.ltm_ages[l] = torch.arange(S0, dtype=torch.float64)
        mem.ltm_rf[l] = torch.full((S0,), 10.0, dtype=torch.float64)
    mem.touch()
    rows = [f"| device | {torch.cuda.get_device_name() if not smoke else 'cpu smoke'} | torch {torch.__version__} | layers {L} (8B shapes, bf16) |", "|---|---|---|---|"]
    ids512 = torch.randint(0, cfg.vocab_size, (T_inj,))
    ids2048 = torch.randint(0, cfg.vocab_size, (T_pre,))

    def inject():
        F_.inject_forward(m, m.memory, ids512)
    t = cuda_time(inject)
    rows.append(f"| inject forward T={T_inj} | {t:.2f} ms | {t / L:.2f} ms/layer | x32 ≈ {t / L * 32:.0f} ms |")
    for impl in ("eager", "sdpa"):
        m.attention_impl = impl
        for fast in (False, True):
            m.fast_path = fast
            t = cuda_time(lambda: F_.prefill(m, m.memory, ids2048, fast=fast), n=3)
            rows.append(f"| prefill T={T_pre} {'fast (memory K/V cached)' if fast else 'direct'}, {impl} attention | {t:.1f} ms | {t / L:.1f} ms/layer | x32 ≈ {t / L * 32:.0f} ms |")
    m.fast_path = True
    mem.touch()
    t = cuda_time(lambda: (mem.touch(), m.memory_kv(m.memory)), n=3)
    rows.append(f"| memory K/V build (STM+LTM pool) | {t:.1f} ms | per memory state | |")
    _, cache = F_.prefill(m, m.memory, ids2048[:128])
    pos = cfg.prefix_len + 128
    c0 = [(k.clone(), v.clone()) for k, v in cache]

    def dec():
        F_.decode_step(m, 5, pos, [(k, v) for k, v in c0])
    for impl in ("eager", "sdpa"):
        m.attention_impl = impl
        t = cuda_time(dec, n=10, warm=2)
        # bytes a step must read per layer: weights (bf16) + memory/prompt K/V cache
        wb = sum(p.numel() for p in m.model.layers[0].parameters()) * 2
        kvb = 2 * cfg.num_key_value_heads * cfg.dh * pos * 2
        gbs = (wb + kvb) * L / (t / 1e3) / 1e9
        rows.append(f"| decode step (cache {pos}), {impl} | {t:.2f} ms | {t / L:.2f} ms/layer | {gbs:.0f} GB/s achieved (weights+KV), eager python, no CUDA graph |")
    # fast vs direct agreement in bf16 (rounding-level)
    a = F_.prefill(m, m.memory, ids2048[:256], fast=False)[0]
    b = F_.prefill(m, m.memory, ids2048[:256], fast=True)[0]
    rows.append(f"| fast vs direct logits (bf16) | max abs {float((a - b).abs().max()):.3e} | max |logit| {float(a.abs().max()):.2f} | |")
    txt = "\n".join(rows)
    print(txt)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_model.md").write_text(txt + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
