"""Engine(backend="onnxruntime") on an artifact exported with ``mplus_deploy.export``."""
import shutil
import warnings

import pytest
import torch

from mplus_deploy.runtime import BackendUnavailable, Engine
from mplus_deploy.artifact.graph_io import resolve

from .conftest import chunks, tiny_model

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def engines(tiny_artifact):
    return Engine(tiny_artifact, seed=4), Engine(tiny_artifact, backend="torch", seed=4)


def test_auto_picks_onnxruntime_and_cpu_provider(engines):
    e, _ = engines
    assert e.backend == "onnxruntime"
    d = e.describe()
    assert d["providers"] == ["CPUExecutionProvider"] and d["shared_initializers"] > 0


def test_ort_engine_matches_reference(tiny_artifact):
    ref = tiny_model()
    ref.memory.seed(4)
    e = Engine(tiny_artifact, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ids in chunks(12):
            ref.inject(ids)
            e.memorize(ids, progress=False)
    rs, st = ref.memory, e.host_memory.state
    torch.testing.assert_close(st.stm, rs.stm, atol=1e-4, rtol=1e-4)
    assert torch.equal(st.stm_ages, rs.stm_ages) and st.update_step == rs.update_step
    assert torch.equal(st.generator.get_state(), rs.generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(st.ltm_ages, rs.ltm_ages))
    assert all(torch.equal(a, b) for a, b in zip(st.ltm_rf, rs.ltm_rf))
    p = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10])
    out = e.runner.infer("prefill", {"ids": p, **e.host_memory.prefill_feeds()})
    for a, b in zip(out["retrieved"], ref.retrieved_indices(p)):
        assert torch.equal(a, b)
    torch.testing.assert_close(out["logits"], ref.prefill_logits(p), atol=1e-4, rtol=1e-4)
    assert torch.equal(e.generate_ids(p, max_new_tokens=20, stop_at_eos=False),
                      ref.generate(p, max_new_tokens=20, stop_at_eos=False))


def test_ort_and_torch_backends_agree_on_the_same_artifact(engines):
    e, t = engines
    for s in (e, t):
        s.reset_memory()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for ids in chunks(5, seed=9):
                s.memorize(ids, progress=False)
    assert e.memory["ltm_rows"] == t.memory["ltm_rows"]
    p = torch.arange(20, 40)
    a = e.runner.infer("prefill", {"ids": p, **e.host_memory.prefill_feeds()})
    b = t.runner.infer("prefill", {"ids": p, **t.host_memory.prefill_feeds()})
    assert torch.equal(a["retrieved"], b["retrieved"])
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["present_k"], b["present_k"], atol=1e-4, rtol=1e-4)


def test_decode_cache_stays_ortvalue(engines):
    """Prefill's stacked cache is split once into per-layer prefix + tail OrtValues; each step's grown tails
    come back as OrtValues (``keep``) and are bound as the next step's tails; the ORT steps agree with the
    torch backend fed the same per-layer tensors (graph contract, docs/graphs.md)."""
    from mplus_deploy.runtime.kvcache import DecodeCache

    e, t = engines
    P, L = e.config.prefix_len, e.config.num_hidden_layers
    out = e.runner.infer("prefill", {"ids": torch.tensor([5, 6]), **e.host_memory.prefill_feeds()})
    cache = DecodeCache(out["present_k"], out["present_v"], P, place=e.runner.place)
    ref = DecodeCache(out["present_k"], out["present_v"], P)
    assert all(isinstance(v, ort.OrtValue) for v in cache.feeds().values())
    assert cache.prefix["prefix_k.1"].shape() == [e.config.num_key_value_heads, P, e.config.dh]
    assert cache.tail["past_v.0"].shape()[1] == 2
    prefix = dict(cache.prefix)
    for step, tok in enumerate((7, 9)):
        feeds = {"ids": torch.tensor([tok]), "pos": torch.tensor(P + 2 + step)}
        got = e.runner.infer("decode", {**feeds, **cache.feeds()}, keep=cache.keep)
        want = t.runner.infer("decode", {**feeds, **ref.feeds()})
        assert set(cache.keep) == {f"present_{c}.{l}" for l in range(L) for c in "kv"}
        assert all(isinstance(got[n], ort.OrtValue) for n in cache.keep)
        assert got["present_k.0"].shape()[1] == 3 + step and got["logits"].shape == (1, e.config.vocab_size)
        torch.testing.assert_close(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)
        for n in cache.keep:
            torch.testing.assert_close(torch.from_numpy(got[n].numpy()), want[n], atol=1e-5, rtol=1e-5)
        cache.advance(got)
        ref.advance(want)
        assert cache.prefix == prefix  # the same prefix OrtValues every step


def test_generate_feeds_ortvalues_only(tiny_artifact, monkeypatch):
    """``token_stream`` binds the decode cache as OrtValues at every step (prefix placed once, tails kept):
    nothing round-trips through numpy between steps. (The artifact's decode contract, ``attention="graph"``;
    the fused form's buffers: tests/runtime/test_ort_gqa.py.)"""
    e = Engine(tiny_artifact, seed=4, attention="graph")
    seen = []
    inner = e.runner.infer_impl

    def spy(graph, feeds, keep):
        if graph == "decode":
            seen.append(({n: v for n, v in feeds.items() if n.startswith(("prefix_", "past_"))}, keep))
        return inner(graph, feeds, keep)

    monkeypatch.setattr(e.runner, "infer_impl", spy)
    e.reset_memory()
    ids = e.generate_ids(torch.tensor([3, 4, 5]), max_new_tokens=4, stop_at_eos=False)
    assert ids.shape[0] == 4 and len(seen) == 3
    L = e.config.num_hidden_layers
    for feeds, keep in seen:
        assert len(feeds) == 4 * L and all(isinstance(v, ort.OrtValue) for v in feeds.values())
        assert len(keep) == 2 * L
    assert all(seen[i][0]["prefix_k.0"] is seen[0][0]["prefix_k.0"] for i in range(3))
    assert [f["past_k.0"].shape()[1] for f, _ in seen] == [3, 4, 5]


def test_unshared_weights_give_the_same_results(tiny_artifact, engines):
    e, _ = engines
    u = Engine(tiny_artifact, share_weights=False)
    assert u.describe()["shared_initializers"] == 0
    p = torch.tensor([9, 8, 7])
    a = u.runner.infer("prefill", {"ids": p, **u.host_memory.prefill_feeds()})["logits"]
    f = Engine(tiny_artifact).session()
    b = f._core.runner.infer("prefill", {"ids": p, **f.host_memory.prefill_feeds()})["logits"]
    assert torch.equal(a, b)


def test_text_generate_stream_and_stop(engines):
    e, _ = engines
    e.reset_memory()
    e.memorize("The cat sat on the mat. " * 3, progress=False)
    full = e.generate("Where is the cat?", max_new_tokens=20)
    pieces = list(e.generate("Where is the cat?", max_new_tokens=20, stream=True))
    assert "".join(pieces) == full
    # fixed seeds: 20 tokens without eos, so every stop check below runs (no eos is a precondition, not a skip)
    assert len(pieces) >= 6, pieces
    spanning = pieces[2][-1] + pieces[3][:1]  # a stop string across two tokens' text (held back, then cut)
    inside = pieces[4][-2:] if len(pieces[4]) >= 2 else pieces[4]  # ... and one that ends a later token
    for stop in (spanning, inside, [inside, spanning], [spanning, "\x00never"]):
        first = min(full.index(x) for x in ([stop] if isinstance(stop, str) else stop) if x in full)
        want = full[:first]
        assert len(want) < len(full)  # the stop really cuts
        assert e.generate("Where is the cat?", max_new_tokens=20, stop=stop) == want, stop
        assert "".join(e.generate("Where is the cat?", max_new_tokens=20, stop=stop, stream=True)) == want, stop
    assert e.generate("Where is the cat?", max_new_tokens=20, stop="\x00never") == full


def test_snapshot_across_ort_sessions(engines, tmp_path):
    e, _ = engines
    s = e.session(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.memorize(chunks(1)[0], progress=False)
    f = s.save_memory(tmp_path / "s.safetensors")
    s2 = e.session()
    s2.load_memory(f)
    assert s2.host_memory.equal(s.host_memory)


def test_corrupt_artifact_is_refused(tiny_artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    with open(bad / "graphs" / "weights.data", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    from mplus_deploy.runtime import ArtifactError

    with pytest.raises(ArtifactError, match=r"does not match its manifest: graphs/weights\.data \(sha256 mismatch\).*re-export") as ei:
        Engine(bad)
    assert ei.value.files == ["graphs/weights.data"]


def test_cuda_without_onnxruntime_gpu_is_a_clear_error(tiny_artifact):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        Engine(tiny_artifact, backend="onnxruntime", device="cuda")


# int4 (RTN, block 32, prefill + decode) on the random tiny model, measured: the largest logit error is
# 0.034-0.059 x the largest fp32 logit over 16 prompts x 12 steps (prefill and teacher-forced decode), the
# int4 greedy token equals the fp32 one at 168/192 teacher-forced steps, and every divergence of greedy
# generation falls on a near-tie (fp32 top-2 gap <= 0.06). Bounds with margin:
INT4_REL_ERR = 0.075
INT4_MIN_TOP1 = 0.8


def _forced_logits(e, p, toks):
    """Last-row logits of prefill(p), then of each decode step fed ``toks[:-1]`` (teacher forcing): [len(toks), V]."""
    from mplus_deploy.artifact.graph_io import last_row
    from mplus_deploy.runtime.kvcache import DecodeCache

    r, P = e.runner, e.config.prefix_len
    out = r.infer("prefill", {"ids": p, "logit_rows": last_row(p), **e.host_memory.prefill_feeds()})
    cache = DecodeCache(out["present_k"], out["present_v"], P, place=r.place)
    rows, pos = [out["logits"][-1]], P + p.numel()
    for t in toks[:-1]:
        o = r.infer("decode", {"ids": torch.tensor([t]), "pos": torch.tensor(pos), **cache.feeds()}, keep=cache.keep)
        cache.advance(o)
        rows.append(o["logits"][-1])
        pos += 1
    return torch.stack(rows)


def test_quantized_graphs_run_in_the_engine(tiny_artifact, tmp_path):
    import numpy as np

    from mplus_deploy.calibration import quantize_artifact
    from mplus_deploy.calibration.quantize import ort_session

    out = tmp_path / "q"
    shutil.copytree(tiny_artifact, out)
    with pytest.raises(ValueError, match="no int4 graphs"):
        Engine(out, quantized="int4")
    quantize_artifact(out, "int4", None, progress=False, print_table=False, report=False, graphs=("prefill", "decode"))
    assert Engine(out, backend="torch", quantized="int4").describe()["quantized"] == "int4"  # tests/runtime/test_torch_quant.py
    fp, q = Engine(out, seed=4), Engine(out, seed=4, quantized="int4")
    d = q.describe()
    assert d["quantized"] == "int4" and d["quantized_graphs"] == ["decode", "prefill"]
    p = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10])
    a = fp.runner.infer("prefill", {"ids": p, **fp.host_memory.prefill_feeds()})["logits"]
    b = q.runner.infer("prefill", {"ids": p, **q.host_memory.prefill_feeds()})["logits"]
    assert not torch.equal(a, b)  # really the int4 graph ...
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) <= INT4_REL_ERR * scale  # ... and close to fp32 (all prompt rows)
    # the engine's session is the int4 graph as the accuracy report runs it (BASIC == ALL + MatMulNBits, exact)
    sess = ort_session(out / "graphs" / "prefill.int4.onnx", "basic")
    feeds = {"ids": p, **q.host_memory.prefill_feeds()}
    ref = sess.run(["logits"], {i.name: np.asarray(resolve(feeds, i.name)) for i in sess.get_inputs()})[0]
    assert np.abs(ref - b.numpy()).max() <= 1e-3 * max(1.0, scale)
    # int4 sessions keep prepacking (MatMulNBits is 4x slower than fp32 without it); shared fp32 ones do not, except
    # the per-token graph of an fp32 engine on a small artifact (OrtRunner's prepack default)
    def prepack_off(e, g) -> bool:
        try:
            return e.runner._sessions[g].get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
        except RuntimeError:  # the entry was never set
            return False

    assert not prepack_off(q, "decode") and prepack_off(q, "retriever") and q.describe()["prepack"] == []
    assert not prepack_off(fp, "decode") and prepack_off(fp, "retriever") and fp.describe()["prepack"] == ["decode"]

    # decode on int4 too, after memorizing (the memory graphs stay fp32: both engines hold the same memory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ids in chunks(6):
            fp.memorize(ids, progress=False)
            q.memorize(ids, progress=False)
    assert fp.host_memory.equal(q.host_memory)
    agree = steps = 0
    for s in range(8):
        p = torch.randint(3, 256, (8,), generator=torch.Generator().manual_seed(s))
        gf = fp.generate_ids(p, max_new_tokens=12, stop_at_eos=False).tolist()
        gq = q.generate_ids(p, max_new_tokens=12, stop_at_eos=False).tolist()
        a, b = _forced_logits(fp, p, gf), _forced_logits(q, p, gf)  # both along the fp32 greedy path
        assert a.argmax(-1).tolist() == gf  # the forced run is the engine's own generation
        scale = float(a.abs().max())
        bound = INT4_REL_ERR * scale
        assert float((a - b).abs().max()) <= bound, s  # every decode step, not only prefill
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        steps += len(gf)
        # int4 generation follows fp32 until a step whose fp32 top-2 gap is within the error bound; there its
        # token must be one fp32 also nearly chose
        i = next((i for i in range(len(gf)) if gf[i] != gq[i]), None)
        if i is not None:
            top2 = a[i].topk(2).values
            assert float(top2[0] - top2[1]) <= 2 * bound, (s, i, gf, gq)
            assert float(a[i].max() - a[i, gq[i]]) <= 2 * bound, (s, i, gf, gq)
    assert agree >= INT4_MIN_TOP1 * steps, (agree, steps)


def test_the_decode_cache_is_built_after_the_first_token(engines, monkeypatch):
    """``token_stream`` yields prefill's token before it splits prefill's cache (``start_decode``), and a one-token
    generation never builds it; the tokens are a longer generation's."""
    from mplus_deploy.model.sampling import SamplingParams
    from mplus_deploy.runtime.generate import token_stream

    e, _ = engines
    calls = []
    inner = e.runner.start_decode
    monkeypatch.setattr(e.runner, "start_decode", lambda out, P: calls.append(P) or inner(out, P))
    e.reset_memory()
    prompt = torch.tensor([7, 3, 9, 4])
    one = e.generate_ids(prompt, max_new_tokens=1, stop_at_eos=False)
    assert calls == [] and one.shape[0] == 1
    it = token_stream(e.runner, e.config.prefix_len, e.host_memory.prefill_feeds(), prompt,
                      SamplingParams(4, stop_at_eos=False))
    first = next(it)
    assert calls == []
    rest = list(it)
    assert calls == [e.config.prefix_len] and len(rest) == 3
    assert [first, *rest] == e.generate_ids(prompt, max_new_tokens=4, stop_at_eos=False).tolist()
    assert one.tolist() == [first]
