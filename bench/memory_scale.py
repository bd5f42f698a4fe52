"""Host memory at paper scale (issue 13 item 3): a real-width M+ memory, no model.

Builds a ``HostMemory`` directly at mplus-8b width with 2 layers (d 4096, Hkv 8 x Dh 128, d_r 256,
N 10,240 STM rows, K 256, K0 2,560, update_ltm_frequency 60) and 150,000 merged LTM rows per layer
(batch-FIFO recall frequencies: the newest 15,360-row batch at rf 9, the next at 8, ..., everything
older at 1) plus 57 updates' worth of pending rows, so the 3rd of 16 updates (4,096 tokens) merges
and evicts 27,120 rows per layer. ``project`` is a stand-in returning random K/V/keys of the right
shapes, so no weights are needed. Then: ``prefill_feeds()``, ``snapshot.save`` and ``snapshot.load``
(with the original still alive, as ``Session.load_memory`` does) and a bit-exact comparison.

Prints, per phase, the peak RSS of that phase (``/proc/self/clear_refs`` 5 resets the high-water
mark; ``VmHWM``) and the process-wide ``ru_maxrss``, times per update / merge / save / load, and the
memory's bytes.

    python bench/memory_scale.py [--dtype float32|bfloat16] [--ltm-rows 150000] [--dir /tmp] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mplus_deploy.model import preset  # noqa: E402
from mplus_deploy.runtime import snapshot  # noqa: E402
from mplus_deploy.runtime.memory import HostMemory, HostState, new_store  # noqa: E402
from mplus_deploy.util.machine import cpu_name  # noqa: E402

GiB = 2 ** 30


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    def __init__(self):
        self.rows = []

    def run(self, name, fn):
        reset_peak()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        row = {"phase": name, "seconds": dt, "rss_before_gib": base / GiB, "peak_gib": _status("VmHWM") / GiB,
               "rss_after_gib": _status("VmRSS") / GiB,
               "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB}
        self.rows.append(row)
        print(f"{name:<28} {dt:8.2f} s  rss {row['rss_before_gib']:6.2f} -> {row['rss_after_gib']:6.2f} GiB, "
              f"phase peak {row['peak_gib']:6.2f} GiB", flush=True)
        return out


def build(cfg, dtype, ltm_rows: int, n_pending: int, seed: int = 0) -> HostMemory:
    """A random memory written straight into its buffers (chunked, no temporaries of full size)."""
    g = torch.Generator().manual_seed(seed)
    L, N, d = cfg.num_hidden_layers, cfg.N, cfg.hidden_size
    H, D, dr, K, F = cfg.num_key_value_heads, cfg.dh, cfg.selector_hidden_dim, cfg.K, cfg.update_ltm_frequency
    stm = torch.empty(L, N, d, dtype=dtype).normal_(generator=g)
    st = HostState(cfg, stm, torch.zeros(L, N, dtype=torch.float64), ltm_age_dtype=["float64"] * L,
                   update_step=n_pending)
    st.seed(seed)
    stm_k = torch.empty(L, H, N, D, dtype=dtype).normal_(generator=g)
    stm_v = torch.empty(L, H, N, D, dtype=dtype).normal_(generator=g)
    stm_keys = torch.empty(L, N, dr, dtype=dtype).normal_(generator=g)
    s = new_store(cfg, L, dtype, [ltm_rows] * L, n_pending, None)
    S, batch = ltm_rows + n_pending, F * K
    for l in range(L):
        for a in range(0, S, 16384):
            b = min(a + 16384, S)
            s.k[l, :, a:b].normal_(generator=g)
            s.v[l, :, a:b].normal_(generator=g)
            s.keys[l, a:b].normal_(generator=g)
        s.ages[l, :S] = torch.arange(S + N - 1, N - 1, -1, dtype=torch.float64)  # oldest first
        rf = torch.ones(ltm_rows, dtype=torch.float64)
        for i in range(8):  # the newest batch rf 9, then 8, ... 2; older rows 1 (evicted at the merge)
            hi = ltm_rows - i * batch
            if hi <= 0:
                break
            rf[max(hi - batch, 0): hi] = 9 - i
        s.rf[l, :ltm_rows] = rf
    s.set_lengths([ltm_rows] * L, [S] * L)
    st.store = s
    return HostMemory(cfg, st, stm_k, stm_v, stm_keys, torch.ones(L, N, dtype=torch.bool))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ltm-rows", type=int, default=150_000)
    ap.add_argument("--updates", type=int, default=16)
    ap.add_argument("--pending-updates", type=int, default=57, help="updates' worth of pending rows at start")
    ap.add_argument("--dir", default=None, help="where the snapshot goes (deleted afterwards)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (memory moves are bandwidth-bound; 2 threads on a busy 2-core box oversubscribe badly)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    cfg = preset("mplus-8b").replace(num_hidden_layers=2)
    L, K, d = cfg.num_hidden_layers, cfg.K, cfg.hidden_size
    H, D, dr = cfg.num_key_value_heads, cfg.dh, cfg.selector_hidden_dim
    g = torch.Generator().manual_seed(1)

    def project(rows):
        n = rows.shape[1]
        return (torch.randn(L, n, dr, generator=g).to(dtype), torch.randn(L, H, n, D, generator=g).to(dtype),
                torch.randn(L, H, n, D, generator=g).to(dtype))

    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {a.dtype}")
    ph = Phases()
    hm = ph.run("build", lambda: build(cfg, dtype, a.ltm_rows, a.pending_updates * K))
    mb = hm.memory_bytes()
    s = hm.store
    print(f"memory: STM {mb['stm'] / GiB:.3f} GiB, LTM store {mb['ltm'] / GiB:.3f} GiB "
          f"(capacity {s.cap} rows/layer, {s.row_bytes()} B/row/layer), total {mb['total'] / GiB:.3f} GiB; "
          f"rows: merged {s.merged}, pending {s.n_pending}")
    ptr0 = hm.prefill_feeds()["ltm_k"].data_ptr()  # (holding the dict would keep old buffers alive)
    times, merged_at = [], []

    def updates():
        for u in range(a.updates):
            delta = torch.randn(L, K, d, generator=g).to(dtype)
            t0 = time.perf_counter()
            m = hm.write(delta, project)
            times.append(time.perf_counter() - t0)
            if m:
                merged_at.append(u)

    ph.run(f"{a.updates} updates ({a.updates * K} tokens)", updates)
    plain = sorted(t for i, t in enumerate(times) if i not in merged_at)
    print(f"update: median {plain[len(plain) // 2] * 1e3:.0f} ms (max {plain[-1] * 1e3:.0f} ms); merges at "
          f"updates {merged_at}: {[round(times[i], 3) for i in merged_at]} s; after: merged {s.merged}, "
          f"pending {s.n_pending}, capacity {hm.store.cap}")
    feeds = ph.run("prefill_feeds", hm.prefill_feeds)
    zero_copy = feeds["ltm_k"].data_ptr() == ptr0 and feeds["ltm_k"] is hm.store.k
    print(f"prefill feeds are the store's buffers (same storage as before the updates): {zero_copy}; "
          f"S = {feeds['ltm_k'].shape[2]}, valid_len {feeds['valid_len'].tolist()}")
    ph.run("prefill_feeds (cached)", hm.prefill_feeds)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "mem.safetensors"
        ph.run("snapshot.save", lambda: snapshot.save(hm, path))
        size = path.stat().st_size
        print(f"snapshot file: {size / GiB:.3f} GiB")
        back = ph.run("snapshot.load (original alive)", lambda: snapshot.load(path, cfg))
        same = ph.run("compare", lambda: back.equal(hm))
        print(f"round trip bit-exact: {same}")
        row_bytes = s.row_bytes()
        del back, feeds, s
        hm = None  # free the original: the peak of a load into an emptied session
        back = ph.run("snapshot.load (original freed)", lambda: snapshot.load(path, cfg))
        del back
    out = {"cpu": cpu_name(), "torch": torch.__version__, "dtype": a.dtype, "layers": L, "ltm_rows": a.ltm_rows,
           "memory_bytes": mb, "row_bytes_per_layer": row_bytes, "update_seconds": times,
           "merged_at": merged_at, "snapshot_bytes": size, "phases": ph.rows, "zero_copy_feeds": zero_copy,
           "round_trip_exact": same, "memory_total_gib": mb["total"] / GiB}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
