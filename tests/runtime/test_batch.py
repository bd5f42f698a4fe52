"""Issue 19: decode steps batched across sessions (``decode_batch``, ``runtime.batch``): every sequence's greedy
tokens equal its unbatched generation, whatever joins and leaves around it; the masked rows of the buffers never
matter; bad settings are refused."""
import threading

import pytest
import torch

from mplus_deploy.runtime import Engine


def _work(cfg, n, seed=0):
    """n (memory text ids, prompt ids, max_new_tokens): distinct memories, prompt lengths and generation lengths."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, cfg.vocab_size, (cfg.K * (1 + i % 3),), generator=g),
             torch.randint(0, cfg.vocab_size, (3 + 4 * i,), generator=g), 6 + 5 * (i % 4)) for i in range(n)]


def _unbatched(art, work, backend="onnxruntime"):
    with Engine(art, backend=backend, seed=0) as eng:
        out = []
        for mem, prompt, n in work:
            s = eng.session(seed=0)
            s.memorize(mem, progress=False)
            out.append(s.generate_ids(prompt, n, stop_at_eos=False).tolist())
        return out


def _batched(eng, work):
    sess = []
    for mem, _, _ in work:
        s = eng.session(seed=0)
        s.memorize(mem, progress=False)
        sess.append(s)
    got, errs = [None] * len(work), []

    def run(i):
        try:
            got[i] = sess[i].generate_ids(work[i][1], work[i][2], stop_at_eos=False).tolist()
        except BaseException as e:  # noqa: BLE001 - reported below
            errs.append(e)

    th = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in th:
        t.start()
    for t in th:
        t.join(timeout=120)
    assert not errs, errs
    return got


@pytest.mark.filterwarnings("ignore:memorizing a chunk")
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_batched_tokens_equal_unbatched_ones_as_sequences_join_and_leave(tiny_artifact, backend):
    cfg = Engine(tiny_artifact, backend="torch").config
    work = _work(cfg, 6)  # 6 users, at most 4 at once: the last two join as the first ones leave
    want = _unbatched(tiny_artifact, work, backend)
    with Engine(tiny_artifact, backend=backend, seed=0, max_batch=4) as eng:
        got = _batched(eng, work)
        st = eng.describe()["batch"]
    assert got == want
    assert st["active"] == 0 and st["calls"] > 0 and st["mean_batch"] > 1.5, st  # steps really were shared



@pytest.mark.filterwarnings("ignore:memorizing a chunk")
def test_the_tail_buffers_grow_by_buckets_under_running_sequences(tiny_artifact, monkeypatch):
    """A 4-row bucket: the tail capacity grows many times while sequences run, join and leave; tokens unchanged."""
    from mplus_deploy.runtime import batch

    monkeypatch.setattr(batch, "TAIL_BUCKET", 4)
    cfg = Engine(tiny_artifact, backend="torch").config
    work = _work(cfg, 5, seed=3)
    want = _unbatched(tiny_artifact, work)
    with Engine(tiny_artifact, seed=0, max_batch=3) as eng:
        got = _batched(eng, work)
        st = eng.describe()["batch"]
    assert got == want
    need = max(p.numel() + n for _, p, n in work)  # the longest tail: its prompt and every token but the last
    assert st["tail_rows"] % 4 == 0 and need - 1 <= st["tail_rows"] < min(need + 4, cfg.max_window), st

def _feeds(cfg, B, C, seed):
    from mplus_deploy.artifact.graph_io import PAST, PREFIX

    g = torch.Generator().manual_seed(seed)
    Hkv, Dh, P = cfg.num_key_value_heads, cfg.dh, cfg.prefix_len
    f = {"ids": torch.randint(0, cfg.vocab_size, (B,), generator=g), "tail_len": torch.tensor([C, 2, 5][:B])}
    for l in range(cfg.num_hidden_layers):
        for n in PREFIX:
            f[f"{n}.{l}"] = torch.randn(B, Hkv, P, Dh, generator=g)
        for n in PAST:
            f[f"{n}.{l}"] = torch.randn(B, Hkv, C, Dh, generator=g)
    return f


def test_the_graph_ignores_masked_rows_and_equals_per_sequence_decode(tiny_artifact):
    """Rows at or past ``tail_len`` may hold anything (a previous user's rows): the outputs do not change by a bit;
    each sequence's outputs equal the single ``decode`` graph over its own valid rows (fp32, 1e-5 relative)."""
    eng = Engine(tiny_artifact, backend="onnxruntime", max_batch=2)
    try:
        cfg, run = eng.config, eng.runner
        f = _feeds(cfg, 3, 9, seed=1)
        a = run.infer("decode_batch", f)
        f2 = dict(f)
        for l in range(cfg.num_hidden_layers):
            for n in ("past_k", "past_v"):
                t = f[f"{n}.{l}"].clone()
                for b, m in enumerate(f["tail_len"].tolist()):
                    t[b, :, m:] = torch.randn(t[b, :, m:].shape) * 1e3
                f2[f"{n}.{l}"] = t
        b2 = run.infer("decode_batch", f2)
        assert all(torch.equal(a[k], b2[k]) for k in a)
        P = cfg.prefix_len
        for b, m in enumerate(f["tail_len"].tolist()):
            one = {"ids": f["ids"][b:b + 1], "pos": torch.tensor(P + m)}
            for l in range(cfg.num_hidden_layers):
                for c in "kv":
                    one[f"prefix_{c}.{l}"] = f[f"prefix_{c}.{l}"][b]
                    one[f"past_{c}.{l}"] = f[f"past_{c}.{l}"][b, :, :m].contiguous()
            o = run.infer("decode", one)
            scale = o["logits"].abs().max()
            assert torch.allclose(a["logits"][b], o["logits"][0], rtol=1e-5, atol=1e-5 * scale), b
            for l in range(cfg.num_hidden_layers):
                assert torch.allclose(a[f"new_k.{l}"][b], o[f"present_k.{l}"][:, -1:], rtol=1e-5, atol=1e-6)
                assert torch.allclose(a[f"new_v.{l}"][b], o[f"present_v.{l}"][:, -1:], rtol=1e-5, atol=1e-6)
    finally:
        eng.close()


def test_an_unbatched_engine_loads_no_decode_batch_session(tiny_artifact):
    with Engine(tiny_artifact, backend="onnxruntime") as eng:
        assert "decode_batch" not in eng.runner.graphs() and "decode" in eng.runner.graphs()
    with Engine(tiny_artifact, backend="onnxruntime", max_batch=2) as eng:
        assert "decode_batch" in eng.runner.graphs()


def test_a_one_token_generation_never_joins_the_batch(tiny_artifact):
    """The first token comes from prefill: a sequence joins the batch at its first decode step only."""
    prompt = torch.tensor([5, 8, 2, 6])
    with Engine(tiny_artifact, backend="onnxruntime", seed=0) as ref:
        want = ref.generate_ids(prompt, max_new_tokens=3, stop_at_eos=False).tolist()
    with Engine(tiny_artifact, backend="onnxruntime", seed=0, max_batch=2) as eng:
        one = eng.generate_ids(prompt, max_new_tokens=1, stop_at_eos=False).tolist()
        st = eng.describe()["batch"]
        assert st["calls"] == 0 and st["slots"] == 0, st  # no buffers: it never joined
        three = eng.generate_ids(prompt, max_new_tokens=3, stop_at_eos=False).tolist()
        st = eng.describe()["batch"]
    assert st["calls"] == 2 and st["active"] == 0, st
    assert three == want and one == want[:1]


def test_bad_batch_settings_are_refused(tiny_artifact):
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        Engine(tiny_artifact, max_batch=0)
    with pytest.raises(ValueError, match="exceeds the artifact's decode_batch limit 16"):
        Engine(tiny_artifact, max_batch=17)
