"""Profile output: rich terminal tables, markdown, JSON and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def _f(x, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.1f}"
    return f"{x:.{nd}f}"


def _label(res: dict) -> str:
    prec = (res.get("runner") or {}).get("precision")
    name = Path(res["artifact"]).name or res["artifact"]
    return f"{name} ({res['backend']}{', ' + prec if prec else ''})"


# ---------------------------------------------------------------------------------- tables (rows)
def summary_rows(res: dict) -> list[list[str]]:
    return [[r["stage"], str(r["n"]), _f(r["p50"]), _f(r["p90"]), _f(r["p99"])] for r in res["stages"]]


def decode_rows(res: dict) -> list[list[str]]:
    mach = res["bandwidth"]["machine"]
    out = []
    for d in res["bandwidth"]["decode"]:
        out.append([str(d["prompt_len"]), _f(d["decode_tokens_per_s"], 1), _f(d["weight_bytes"] / 2**20, 1),
                    _f(d["kv_bytes"] / 2**20, 1), _f(d["memory_prefix_kv_bytes"] / 2**20, 1),
                    _f(d["achieved_gbps"]), _f(d["achieved_gbps_wall"]), _f(mach["read_gbps"]), _f(mach["copy_gbps"]),
                    _f(d["pct_of_read_bw"], 0) + "%"])
    return out


DECODE_HEAD = ["prompt", "tok/s", "weights MiB/step", "KV MiB/step", "of which memory prefix", "GB/s (graph)",
               "GB/s (wall)", "machine read GB/s", "machine copy GB/s", "% of read"]


def ltm_rows(res: dict) -> list[list[str]]:
    out = []
    for p in res["ltm_sweep"]:
        for b in p["by_prompt"]:
            r = b["retrieval_total_ms"]
            out.append([str(p["ltm_rows"]), "yes" if p["synthetic"] else "initial", str(b["prompt_len"]),
                        _f(b["query_ms"]["p50"]), _f(b["query_ms"]["p90"]), _f(b["query_ms"]["p99"]),
                        _f(b["prefill_ms"]["p50"]), _f(r["p50"]) if r else "-", _f(p["feed_pack_ms"])])
    return out


LTM_HEAD = ["LTM rows/layer", "synthetic", "prompt", "query p50 ms", "p90", "p99", "prefill p50", "retrieval p50",
            "feed pack ms (once)"]
STAGE_HEAD = ["stage", "n", "p50 ms", "p90 ms", "p99 ms"]


def headline(res: dict) -> list[str]:
    m, mem = res["memorize"], res["memory"]
    lines = [f"{_label(res)} on {res['machine']['cpu']} ({res['machine']['cores']} cores, torch threads "
             f"{res['machine']['torch_threads']})",
             f"memorize: {_f(m['tokens_per_s'], 0)} tok/s ({m['chunks']} chunks of {m['chunk_tokens']} tokens, "
             f"{m['merges']} LTM merge(s))"]
    for q in res["queries"]:
        lines.append(f"T={q['prompt_len']}: TTFT p50 {_f(q['ttft_ms']['p50'])} ms, decode {_f(q['decode_tokens_per_s'], 1)} "
                     f"tok/s, end-to-end {_f(q['e2e_tokens_per_s'], 1)} tok/s ({q['tokens_generated']} tokens)")
    lines.append(f"peak RSS {_f(mem['peak_rss_mb'], 0)} MiB" + (
        f"; CUDA max allocated {_f(mem['cuda']['max_allocated_mb'], 0)} MiB" if mem.get("cuda") else ""))
    return lines


# ---------------------------------------------------------------------------------- terminal
def print_rich(res: dict, console=None, others: list | None = None) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 130)
    for line in headline(res):
        console.print(line)

    def table(title, head, rows):
        t = Table(title=title)
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)

    table("per-stage latency", STAGE_HEAD, summary_rows(res))
    table("decode: achieved memory bandwidth (bytes a step must read ÷ step time)", DECODE_HEAD, decode_rows(res))
    table("query latency (prefill + first token) vs LTM size", LTM_HEAD, ltm_rows(res))
    if others:
        head, rows = compare_rows(res, others)
        table("comparison (p50 ms; ratio vs the first)", head, rows)
    for n in res["settings"]["notes"]:
        console.print(f"[yellow]note:[/yellow] {n}")


# ---------------------------------------------------------------------------------- compare
def compare_rows(base: dict, others: list) -> tuple[list[str], list[list[str]]]:
    runs = [base] + list(others)
    head = ["stage"] + [_label(r) for r in runs] + [f"× vs {i + 2}" for i in range(len(others))]
    idx = [{r["stage"]: r for r in x["stages"]} for x in runs]
    rows = []
    for st in base["stages"]:
        vals = [d.get(st["stage"], {}).get("p50") for d in idx]
        ratios = [(_f(vals[0] / v) + "x") if (v and vals[0]) else "-" for v in vals[1:]]
        rows.append([st["stage"]] + [_f(v) for v in vals] + ratios)
    return head, rows


# ---------------------------------------------------------------------------------- markdown / json
def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def to_markdown(res: dict, others: list | None = None) -> str:
    s = res["settings"]
    parts = [f"### mplus-profile: {_label(res)}", "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, torch {res['machine']['torch']}, "
             f"onnxruntime {res['machine']['onnxruntime']}. Prompts {s['prompt_lens']}, {s['new_tokens']} new tokens, "
             f"warmup {s['warmup']}, repeat {s['repeat']}.", ""]
    parts += [f"- {l}" for l in headline(res)[1:]]
    parts += ["", _md_table(STAGE_HEAD, summary_rows(res)), "",
              "Decode bandwidth (bytes a step must read = decode weights + KV cache incl. the "
              f"P={res['config']['P']} memory prefix rows, ÷ the p50 step time):", "",
              _md_table(DECODE_HEAD, decode_rows(res)), "",
              "Query latency vs LTM size (" + s["synthetic_ltm"] + "):", "", _md_table(LTM_HEAD, ltm_rows(res))]
    if others:
        head, rows = compare_rows(res, others)
        parts += ["", "Comparison (p50 ms):", "", _md_table(head, rows)]
    if s["notes"]:
        parts += [""] + [f"Note: {n}" for n in s["notes"]]
    return "\n".join(parts) + "\n"


def write_json(res: dict, path, others: list | None = None) -> None:
    data = dict(res)
    if others:
        data["compare"] = list(others)
    Path(path).write_text(json.dumps(data, indent=1, default=str))


# ---------------------------------------------------------------------------------- plots
def plot(res: dict, path, others: list | None = None) -> None:
    """Two panels: per-stage p50 bars (p90 / p99 whiskers), and query latency vs LTM size."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = [res] + list(others or [])
    stages = [r["stage"].strip() for r in res["stages"]]
    fig_h = max(4.5, 0.28 * len(stages) * (1 + 0.3 * (len(runs) - 1)) + 1.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, fig_h), gridspec_kw={"width_ratios": [1.5, 1]})
    colors = {"memorize": "#4c72b0", "retrieval": "#dd8452", "prefill": "#c44e52", "decode": "#55a868", "host": "#8172b3"}
    h = 0.8 / len(runs)
    for k, run in enumerate(runs):
        d = {r["stage"].strip(): r for r in run["stages"]}
        for i, name in enumerate(stages):
            r = d.get(name)
            if not r:
                continue
            y = i + (k - (len(runs) - 1) / 2) * h
            ax1.barh(y, r["p50"], height=h * 0.9, color=colors.get(r["group"], "grey"), alpha=1.0 - 0.35 * k,
                     label=_label(run) if i == 0 else None)
            ax1.plot([r["p50"], r["p99"]], [y, y], color="black", lw=0.8)
            ax1.plot([r["p90"]], [y], marker="|", color="black", ms=6)
            ax1.plot([r["p99"]], [y], marker="|", color="black", ms=9)
    ax1.set_yticks(range(len(stages)))
    ax1.set_yticklabels(stages, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("ms (bar p50, ticks p90 / p99; log scale)")
    ax1.set_title("per-stage latency")
    if len(runs) > 1:
        ax1.legend(fontsize=7, loc="lower right")
    for k, run in enumerate(runs):
        sweep = run["ltm_sweep"]
        for j, T in enumerate(run["settings"]["prompt_lens"]):
            xs, ys, rs = [], [], []
            for p in sweep:
                b = [b for b in p["by_prompt"] if b["prompt_len"] == T]
                if b:
                    xs.append(max(p["ltm_rows"], 1)), ys.append(b[0]["query_ms"]["p50"])
                    rs.append(b[0]["retrieval_total_ms"]["p50"] if b[0]["retrieval_total_ms"] else None)
            lab = f"T={T}" + (f" {_label(run)}" if len(runs) > 1 else "")
            line, = ax2.plot(xs, ys, marker="o", ls="-" if k == 0 else "--", label=f"query (prefill + 1st token) {lab}")
            if any(r is not None for r in rs):
                ax2.plot([x for x, r in zip(xs, rs) if r is not None], [r for r in rs if r is not None], marker="x",
                         ls=":", color=line.get_color(), label=f"retrieval, all layers {lab}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("LTM rows per layer (synthetic beyond the initial memory)")
    ax2.set_ylabel("ms (p50)")
    ax2.set_title("query latency vs LTM size")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(f"mplus-profile: {_label(res)} — {res['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def stage_rows(res: dict) -> list[dict]:
    """Flat per-stage summary (stage, p50/p90/p99 ms, n) for tables and bar plots."""
    rows = []

    def add(name, st, group):
        if st and st.get("n"):
            rows.append({"stage": name, "group": group, "n": st["n"], "p50": st["p50"], "p90": st["p90"], "p99": st["p99"]})

    m = res.get("memorize") or {}
    add(f"memorize / chunk ({m.get('chunk_tokens')} tok)", m.get("per_chunk_ms"), "memorize")
    add("  memory_update graph", m.get("memory_update_ms"), "memorize")
    add("  memory_project graph", m.get("memory_project_ms"), "memorize")
    add("  host memory manager", m.get("host_ms"), "memorize")
    for q in res.get("queries", []):
        T = q["prompt_len"]
        r = q.get("retrieval")
        if r:
            add(f"retrieval total, T={T}", r["total_ms"], "retrieval")
            per = [x["p50"] for x in r["per_layer_ms"] if x["n"]]
            if per:
                rows.append({"stage": f"retrieval / layer (mean of p50), T={T}", "group": "retrieval",
                             "n": len(per), "p50": sum(per) / len(per), "p90": max(per), "p99": max(per)})
        add(f"prefill (incl. retrieval), T={T}", q["prefill_ms"], "prefill")
        add(f"TTFT, T={T}", q["ttft_ms"], "prefill")
        add(f"decode / token (graph), T={T}", q["decode_ms"], "decode")
        add(f"decode / token (wall), T={T}", q["decode_wall_ms"], "decode")
        add(f"host / token (sampling + loop), T={T}", q["host_per_token_ms"], "host")
        add(f"host before prefill, T={T}", q["pre_prefill_host_ms"], "host")
    h = res.get("host") or {}
    add("sampling greedy", h.get("sampling_greedy_ms"), "host")
    add("sampling top-p/top-k", h.get("sampling_top_p_ms"), "host")
    if h.get("tokenize_ms"):
        add(f"tokenize prompt ({h.get('tokenize_tokens')} tok)", h["tokenize_ms"], "host")
        add("detokenize / token", h["detokenize_per_token_ms"], "host")
    return rows
