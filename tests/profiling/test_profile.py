"""mplus-profile on the tiny artifact: every JSON field present and sane, PNG / markdown written."""
import pytest

from mplus_deploy.model import preset
from mplus_deploy.profiling import report
from mplus_deploy.profiling.profiler import SCHEMA, Settings, plan

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _ordered(st):
    assert st["n"] > 0
    assert 0 <= st["min"] <= st["p50"] <= st["p90"] <= st["p99"] <= st["max"], st
    assert st["min"] <= st["mean"] <= st["max"]


def test_exit_code_and_top_level(tiny_profile):
    rc, res, _, _ = tiny_profile
    assert rc == 0 and res is not None
    assert res["schema"] == SCHEMA
    assert res["backend"] == "onnxruntime" and res["device"] == "cpu"
    for k in ("runner", "machine", "config", "settings", "bandwidth", "host", "memorize", "queries", "ltm_sweep",
              "memory", "stages", "load_s"):
        assert k in res, k
    assert res["machine"]["cores"] >= 1 and res["load_s"] > 0


def test_settings_clipped_with_notes(tiny_profile):
    _, res, _, _ = tiny_profile
    s, cfg = res["settings"], res["config"]
    # tiny: max_window 64, 8 new tokens -> 500 is clipped to 56
    assert s["prompt_lens"] == [8, 24, 56]
    assert max(s["prompt_lens"]) + s["new_tokens"] <= cfg["max_window"]
    assert any("500 clipped to 56" in n for n in s["notes"])
    assert s["ltm_sizes"] == [0, 512, 2048]  # ascending, as requested (k = 1024)
    assert "synthetic" in s["synthetic_ltm"]


def test_stages_percentiles(tiny_profile):
    _, res, _, _ = tiny_profile
    assert len(res["stages"]) >= 10
    for r in res["stages"]:
        assert r["n"] > 0 and 0 <= r["p50"] <= r["p90"] <= r["p99"], r
    names = " ".join(r["stage"] for r in res["stages"])
    for want in ("memorize", "memory_update graph", "memory_project graph", "host memory manager", "retrieval total",
                 "retrieval / layer", "prefill", "TTFT", "decode / token (graph)", "decode / token (wall)",
                 "host / token", "sampling greedy"):
        assert want in names, want


def test_memorize(tiny_profile):
    _, res, _, _ = tiny_profile
    m = res["memorize"]
    assert m["chunks"] == 4 and m["chunk_tokens"] == res["config"]["max_chunk"]
    assert m["merges"] == 1  # tiny: update_ltm_frequency 3
    for k in ("per_chunk_ms", "memory_update_ms", "memory_project_ms", "host_ms"):
        _ordered(m[k])
        assert m[k]["n"] == 4
    assert m["memory_update_ms"]["p50"] > 0 and m["memory_project_ms"]["p50"] > 0
    assert m["per_chunk_ms"]["p50"] >= m["memory_update_ms"]["p50"]
    assert m["tokens_per_s"] > 0


def test_queries(tiny_profile):
    _, res, _, _ = tiny_profile
    cfg, s = res["config"], res["settings"]
    assert [q["prompt_len"] for q in res["queries"]] == s["prompt_lens"]
    for q in res["queries"]:
        assert q["tokens_generated"] == s["repeat"] * s["new_tokens"]  # stop_at_eos=False: every token counted
        assert q["decode_ms"]["n"] == s["repeat"] * (s["new_tokens"] - 1)
        for k in ("prefill_ms", "ttft_ms", "decode_ms", "decode_wall_ms", "total_ms"):
            _ordered(q[k])
            assert q[k]["p50"] > 0
        assert q["ttft_ms"]["p50"] >= q["prefill_ms"]["min"]
        assert q["decode_wall_ms"]["min"] >= 0 and q["host_per_token_ms"]["min"] >= 0
        assert q["decode_tokens_per_s"] > 0 and q["e2e_tokens_per_s"] > 0 and q["prefill_tokens_per_s"] > 0
        r = q["retrieval"]
        assert len(r["per_layer_ms"]) == cfg["L"]
        _ordered(r["total_ms"])
        assert r["rows_scored"] >= cfg["K0"] and r["padded_rows"] >= r["rows_scored"]


def test_bandwidth(tiny_profile):
    _, res, _, _ = tiny_profile
    b, cfg = res["bandwidth"], res["config"]
    assert b["machine"]["copy_gbps"] > 0 and b["machine"]["read_gbps"] > 0
    rows = b["decode"]
    assert [d["prompt_len"] for d in rows] == res["settings"]["prompt_lens"]
    prefix = cfg["L"] * 2 * cfg["Hkv"] * cfg["Dh"] * cfg["P"] * cfg["itemsize"]
    for d in rows:
        assert d["weight_bytes"] > 0
        assert d["memory_prefix_kv_bytes"] == prefix
        assert d["kv_bytes"] > d["memory_prefix_kv_bytes"]
        assert d["bytes_per_step"] == d["weight_bytes"] + d["kv_bytes"]
        assert d["achieved_gbps"] > 0 and d["achieved_gbps"] >= d["achieved_gbps_wall"] * 0.999
    kv = [d["kv_bytes"] for d in rows]
    assert kv == sorted(kv)  # longer prompts read a longer cache


def test_ltm_sweep(tiny_profile):
    _, res, _, _ = tiny_profile
    sw = res["ltm_sweep"]
    assert [p["requested"] for p in sw] == [0, 512, 2048]
    assert [p["synthetic"] for p in sw] == [False, True, True]
    rows = [p["ltm_rows"] for p in sw]
    assert rows == sorted(rows) and rows[1:] == [512, 2048]
    assert rows[0] == preset("tiny").ltm_initial_size  # 0 = the artifact's initial LTM
    for p in sw:
        assert p["feed_pack_ms"] > 0 and p["peak_rss_mb"] > 0
        assert [b["prompt_len"] for b in p["by_prompt"]] == res["settings"]["prompt_lens"]
        for b in p["by_prompt"]:
            _ordered(b["query_ms"])
            _ordered(b["prefill_ms"])
            _ordered(b["retrieval_total_ms"])


def test_memory_and_host(tiny_profile):
    _, res, _, _ = tiny_profile
    m = res["memory"]
    assert m["peak_rss_mb"] >= m["peak_rss_after_queries_mb"] >= m["peak_rss_after_memorize_mb"] > 0
    assert m["rss_after_load_mb"] > 0 and m["cuda"] is None
    _ordered(res["host"]["sampling_greedy_ms"])
    _ordered(res["host"]["sampling_top_p_ms"])


def test_png_and_markdown(tiny_profile):
    _, res, md, png = tiny_profile
    data = png.read_bytes()
    assert data[:8] == PNG_SIG
    assert len(data) > 20_000  # two panels with text, not an empty canvas
    text = md.read_text()
    assert "| stage | n | p50 ms | p90 ms | p99 ms |" in text
    assert "GB/s" in text and "LTM rows/layer" in text


def test_compare_outputs(tiny_profile, tmp_path):
    _, res, _, _ = tiny_profile
    head, rows = report.compare_rows(res, [res])
    assert len(head) == 4 and all(r[-1] in ("1.00x", "-") for r in rows)
    report.plot(res, tmp_path / "c.png", others=[res])
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIG
    assert "Comparison" in report.to_markdown(res, [res])


@pytest.mark.parametrize("backend,ltm,mx,expect", [
    ("onnxruntime", 1 << 20, 288, "exceeds"),  # beyond the steady-state bound: run, with a note
    ("tensorrt", 4096, 288, "clipped to 288"),  # the TensorRT profile bound is hard
])
def test_plan_ltm_notes(backend, ltm, mx, expect):
    cfg = preset("tiny")
    s = plan(cfg, {"max_ltm": mx, "max_prompt": 64}, Settings(prompt_lens=(8,), ltm_sizes=(ltm,), new_tokens=8),
             backend, ltm_row_bytes=1000, avail=1 << 40)
    assert any(expect in n for n in s.notes), s.notes


def test_plan_ram_budget():
    cfg = preset("tiny")
    s = plan(cfg, {}, Settings(prompt_lens=(8,), ltm_sizes=(0, 10_000_000), new_tokens=8), "onnxruntime",
             ltm_row_bytes=1000, avail=2 * 2**30)
    assert s.ltm_sizes[0] == 0 and 0 < s.ltm_sizes[1] * 1000 <= 2**30
    assert any("GiB" in n for n in s.notes)
