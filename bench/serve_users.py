"""Issue 19's serving bench: aggregate tok/s and inter-token latency vs concurrent users over HTTP, one
``mplus-serve`` process against ``mplus-serve --ray --replicas R``, on the same artifact and machine.

Each server runs as its own child process (``python -m mplus_deploy.cli.serve``), on loopback. Every user has
its own memory id: one paragraph memorized through ``POST /v1/memory/{id}/memorize`` before the timed part.
Then for each user count, that many clients stream ``/v1/completions`` (greedy, ``--tokens`` tokens, the user's
id as ``user``) at once; per round: aggregate tok/s (all streamed tokens / wall), inter-token latency p50/p99
(gaps between one client's consecutive chunks), TTFT p50. Every client's text is compared with the single
process's one-user answer (must be identical). Medians over ``--rounds``; CPU flags recorded.

    python bench/serve_users.py OUT [--users 1,2,4,8,16] [--tokens 32] [--rounds 2] [--replicas 2] [--append]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import publish  # noqa: E402
from bench.batch_decode import PROMPTS, _pct  # noqa: E402 (the same prompts and percentile as the in-process bench)

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, art: str, store: Path, extra: list[str], threads: int):
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mplus_deploy.cli.serve", art, "--port", str(self.port), "--store", str(store),
               "--threads", str(threads), "--log-level", "warning", *extra]
        self.log = open(store.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "MPLUS_PROGRESS": "0"})
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server {cmd} did not come up; see {self.log.name}")
            time.sleep(0.5)
        self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def stop(self):
        self.proc.send_signal(2)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _stream(url, model, user, prompt, tokens):
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "user": user}
    stamps, text = [], []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0].get("text", "")
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
    return t0, stamps, "".join(text)


def measure(srv: Server, users, tokens, rounds):
    rows = {}
    with cf.ThreadPoolExecutor(max(users)) as ex:
        for n in users:
            res = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                futs = [ex.submit(_stream, srv.url, srv.model, f"user{i}", PROMPTS[i % len(PROMPTS)], tokens) for i in range(n)]
                got = [f.result() for f in futs]
                wall = time.perf_counter() - t0
                total = sum(len(s) for _, s, _ in got)
                gaps = [(b - a) * 1e3 for _, s, _ in got for a, b in zip(s, s[1:])]
                res.append({"wall": wall, "agg": total / wall, "p50": _pct(gaps, 0.5), "p99": _pct(gaps, 0.99),
                            "ttft": _pct([(s[0] - t) * 1e3 for t, s, _ in got if s], 0.5), "texts": [x for _, _, x in got]})
            rows[n] = {k: statistics.median(r[k] for r in res) for k in ("wall", "agg", "p50", "p99", "ttft")}
            rows[n]["texts"] = res[-1]["texts"]
    return rows


def main(argv=None) -> int:
    from mplus_deploy.evaluation.facts import distractor_text
    from mplus_deploy.util.machine import cpu_name

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--users", default="1,2,4,8,16")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="ORT threads of the single process (each replica: 1)")
    p.add_argument("--append", action="store_true")
    a = p.parse_args(argv)
    users = [int(x) for x in a.users.split(",")]
    text = distractor_text()
    docs = [text[i * 700:(i + 1) * 700] for i in range(max(users))]
    variants = (("single process", [], a.threads),
                (f"Ray, {a.replicas} replicas", ["--ray", "--replicas", str(a.replicas), "--replica-cpus", "0.5"], 1))
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra, threads in variants:
            store = Path(tmp) / label.replace(" ", "_").replace(",", "") / "store"
            store.parent.mkdir(parents=True)
            srv = Server(a.artifact, store, extra, threads)
            try:
                for i, d in enumerate(docs):
                    httpx.post(f"{srv.url}/v1/memory/user{i}/memorize", json={"text": d}, timeout=600).raise_for_status()
                res[label] = measure(srv, users, a.tokens, a.rounds)
            finally:
                srv.stop()
    ref = res[variants[0][0]][1]["texts"][0]
    solo = {i: res[variants[0][0]][n]["texts"][i] for n in users for i in range(n)}
    same = all(res[lab][n]["texts"][i] == solo[i] for lab, _, _ in variants for n in users for i in range(n))
    flags = " ".join(f for f in ("avx2", "avx512f", "amx_tile") if f in Path("/proc/cpuinfo").read_text().split())
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — `python bench/serve_users.py {a.artifact} --users {a.users} "
             f"--tokens {a.tokens} --rounds {a.rounds} --replicas {a.replicas}`", "",
             f"{cpu_name()} ({flags}), loopback HTTP, streaming /v1/completions, {a.tokens} greedy tokens per user, each "
             f"user its own memory (700 characters memorized); single process: {a.threads} ORT threads; Ray: "
             f"{a.replicas} replicas x 1 ORT thread on the same 2 cores; medians of {a.rounds} rounds. Every user's "
             f"text equal across servers and user counts: **{same}** (user0 alone: {ref[:40]!r}...).", "",
             "| users | server | wall s | aggregate tok/s | x one user | TTFT p50 ms | ITL p50 ms | ITL p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for lab, _, _ in variants:
        base = res[lab][1]["agg"]
        for n in users:
            r = res[lab][n]
            lines.append(f"| {n} | {lab} | {r['wall']:.2f} | {r['agg']:.1f} | {r['agg'] / base:.2f}x | {r['ttft']:.0f} | "
                         f"{r['p50']:.1f} | {r['p99']:.1f} |")
    publish("\n".join(lines) + "\n", a.append, "## Issue 19: batched decode across sessions")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
