"""Many users at once (issue 19): aggregate decode tok/s and inter-token latency vs concurrent users, with decode
steps batched across sessions (``Engine(max_batch=N)``, ``decode_batch``) against the same concurrent users on an
unbatched engine (each session's steps run as their own ``decode`` calls, in parallel threads).

Each user has its own memory (a different paragraph memorized into its own session) and streams ``--tokens``
greedy tokens from its own prompt; all users start together. Per round and user count: wall time, generated
tokens, aggregate tok/s (all tokens / wall, prefill included), decode tok/s (tokens after each user's first /
the span from the first user's first token to the last token), steady decode tok/s (tokens streamed while every
user is decoding: after the last user's first token, up to the first user's last one; the other users' prefills
are not inside that window), inter-token latency p50/p99 (gaps between a user's consecutive tokens). Every user's tokens are compared with its single-user run (must be identical).
Medians over ``--rounds``; CPU flags recorded.

    python bench/batch_decode.py OUT [--users 1,2,4,8,16] [--tokens 32] [--rounds 3] [--threads 2] [--append]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import publish  # noqa: E402

PROMPTS = ["The most important thing about the harbour is", "In the old days the villagers", "The weather that year",
           "She opened the letter and", "The cheapest way to travel is", "Every morning the baker",
           "The library of the town held", "When the storm came,"]


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _sessions(eng, docs):
    out = []
    for d in docs:
        s = eng.session(seed=0)
        s.memorize(d, progress=False)
        out.append(s)
    return out


def _round(sessions, n_users, tokens):
    """All n users stream at once → (wall s, tokens per user [ids], per-user token timestamps)."""
    barrier = threading.Barrier(n_users + 1)
    ids, stamps = [None] * n_users, [None] * n_users

    def run(i):
        s = sessions[i]
        barrier.wait()
        got, ts = [], []
        for piece in s.stream(PROMPTS[i % len(PROMPTS)], tokens, stop_at_eos=False):
            if piece.token is not None:
                got.append(piece.token)
                ts.append(time.perf_counter())
        ids[i], stamps[i] = got, ts

    th = [threading.Thread(target=run, args=(i,)) for i in range(n_users)]
    for t in th:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in th:
        t.join()
    return time.perf_counter() - t0, ids, stamps, t0


def measure(eng, docs, users, tokens, rounds, warmup=1):
    sessions = _sessions(eng, docs[:max(users)])
    rows = {}
    for n in users:
        for _ in range(warmup):  # untimed: the first round at a new n grows buffers and ORT's arena (cold-start noise)
            _round(sessions, n, tokens)
        res = []
        for _ in range(rounds):
            wall, ids, stamps, t0 = _round(sessions, n, tokens)
            total = sum(len(x) for x in ids)
            first = min(ts[0] for ts in stamps)
            last = max(ts[-1] for ts in stamps)
            gaps = [(b - a) * 1e3 for ts in stamps for a, b in zip(ts, ts[1:])]
            a, b = max(ts[0] for ts in stamps), min(ts[-1] for ts in stamps)  # every user past prefill, none done
            steady = sum(1 for ts in stamps for t in ts if a < t <= b) / (b - a) if b > a else float("nan")
            res.append({"wall": wall, "agg": total / wall, "decode": (total - n) / max(1e-9, last - first),
                        "steady": steady, "p50": _pct(gaps, 0.5), "p99": _pct(gaps, 0.99), "ids": ids})
        rows[n] = {k: statistics.median(r[k] for r in res) for k in ("wall", "agg", "decode", "steady", "p50", "p99")}
        rows[n]["ids"] = res[-1]["ids"]
    return rows


def main(argv=None) -> int:
    from mplus_deploy.evaluation.facts import distractor_text
    from mplus_deploy.runtime import Engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--users", default="1,2,4,8,16")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before each user count's rounds")
    p.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    a = p.parse_args(argv)
    users = [int(x) for x in a.users.split(",")]
    warnings.simplefilter("ignore")
    text = distractor_text()
    docs = [text[i * 700:(i + 1) * 700] for i in range(max(users))]
    res = {}
    for label, mb in (("unbatched", 1), ("batched", max(users))):
        eng = Engine(a.artifact, threads=a.threads, seed=0, max_batch=mb)
        try:
            res[label] = measure(eng, docs, users, a.tokens, a.rounds, a.warmup)
            if mb > 1:
                res[label]["stats"] = eng.describe()["batch"]
        finally:
            eng.close()
    solo = {}
    with Engine(a.artifact, threads=a.threads, seed=0) as eng:
        for i, s in enumerate(_sessions(eng, docs)):
            solo[i] = s.generate_ids(PROMPTS[i % len(PROMPTS)], a.tokens, stop_at_eos=False).tolist()
    same = all(res[lab][n]["ids"][i] == solo[i] for lab in ("unbatched", "batched") for n in users for i in range(n))
    base = res["unbatched"][1]["decode"]
    from mplus_deploy.util.machine import cpu_name

    flags = " ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in Path("/proc/cpuinfo").read_text().split())
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — `python bench/batch_decode.py {a.artifact} --users {a.users} "
             f"--tokens {a.tokens} --rounds {a.rounds} --warmup {a.warmup}`", "",
             f"{cpu_name()} ({flags}), {a.threads} ORT threads; artifact `{a.artifact}`; {a.tokens} greedy tokens per user, each user its own "
             f"memory; medians of {a.rounds} rounds after {a.warmup} untimed. Identical tokens per user (batched, unbatched, alone): **{same}**.",
             "", "| users | engine | wall s | aggregate tok/s | decode tok/s | x one user | steady decode tok/s | x one user "
             "| ITL p50 ms | ITL p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    sbase = res["unbatched"][1]["steady"]
    for n in users:
        for lab in ("unbatched", "batched"):
            r = res[lab][n]
            lines.append(f"| {n} | {lab} | {r['wall']:.2f} | {r['agg']:.1f} | {r['decode']:.1f} | {r['decode'] / base:.2f}x | "
                         f"{r['steady']:.1f} | {r['steady'] / sbase:.2f}x | {r['p50']:.1f} | {r['p99']:.1f} |")
    lines.append(f"\nBatcher statistics (all rounds, warm-up included): {res['batched']['stats']}.")
    publish("\n".join(lines) + "\n", a.append, "## Issue 19: batched decode across sessions")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
