"""Decode's attention as ORT's GroupQueryAttention over one in-place KV buffer (runtime/backends/ort_gqa.py,
kvcache.BufferCache): the same logits as the exported graph (fp32, 1e-5 of the logits' scale) at every step,
the same greedy tokens, no copy of the cache between steps, and the artifact's decode contract still served."""
import onnx
import onnxruntime as ort
import pytest
import torch

from mplus_deploy.artifact import graph_path
from mplus_deploy.runtime import Engine
from mplus_deploy.runtime.backends.ort_gqa import rewrite
from mplus_deploy.runtime.kvcache import BufferCache, DecodeCache


@pytest.fixture(scope="module")
def pair(tiny_artifact):
    return Engine(tiny_artifact, seed=0), Engine(tiny_artifact, seed=0, attention="graph")


def _close(a, b, tol=1e-5):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape
    assert (a - b).abs().max() <= tol * b.abs().max(), float((a - b).abs().max() / b.abs().max())


def _np(v):
    return torch.from_numpy(v.numpy()) if isinstance(v, ort.OrtValue) else v


def test_the_default_cpu_runner_fuses_decode_attention(pair):
    g, s = pair
    L = g.config.num_hidden_layers
    assert g.runner.describe()["attention"] == "gqa" and f"gqa_attention:{L}" in g.runner.describe()["rewritten"]["decode"]
    assert "decode" not in s.runner.describe()["rewritten"]
    names = {i.name for i in g.runner._sessions["decode"].get_inputs()}
    assert {"kv_len", "kv_k.0", f"kv_v.{L - 1}"} <= names and not any(n.startswith(("prefix_", "past_")) for n in names)


def _steps(e, cache, toks, P, T):
    outs = []
    for i, tok in enumerate(toks):
        out = e.runner.infer("decode", {"ids": torch.tensor([tok]), "pos": torch.tensor(P + T + i), **cache.feeds()},
                             keep=cache.keep)
        cache.advance(out)
        outs.append(out)
    return outs


@pytest.mark.parametrize("reserve", [256, 1])
def test_buffer_steps_match_the_exported_graph_and_write_in_place(pair, reserve):
    """reserve=1: the buffers grow (reallocated) during the run; rows past kv_len hold 1e3 garbage, never read."""
    g, s = pair
    P, L = g.config.prefix_len, g.config.num_hidden_layers
    ids = torch.tensor([5, 6, 7])
    out = g.runner.infer("prefill", {"ids": ids, **g.host_memory.prefill_feeds()})
    buf = BufferCache(out["present_k"], out["present_v"], P, place=g.runner.place, reserve=reserve)
    for b in buf.buffers.values():
        b[0, :, buf.n:] = 1e3
    ref = DecodeCache(out["present_k"], out["present_v"], P, place=s.runner.place)
    first = dict(buf.values)
    toks = [9, 4, 11, 2, 8]
    got, want = _steps(g, buf, toks, P, 3), _steps(s, ref, toks, P, 3)
    for a, b in zip(got, want):
        _close(a["logits"], b["logits"])
    assert buf.n == P + 3 + len(toks)
    for l in range(L):  # the buffer's tail rows are the exported graph's grown tail
        k, v = buf.tail(l)
        _close(k, _np(ref.tail[f"past_k.{l}"]))
        _close(v, _np(ref.tail[f"past_v.{l}"]))
    if reserve == 256:  # no growth: the same OrtValues every step, nothing copied
        assert buf.values.keys() == first.keys() and all(buf.values[n] is first[n] for n in first)
        assert buf.rows == P + 3 + 256
    else:
        assert buf.rows > P + 3 + len(toks) and buf.reserve > 1


def test_generation_is_the_same(pair):
    g, s = pair
    for seed in range(3):
        prompt = torch.randint(0, g.config.vocab_size, (7,), generator=torch.Generator().manual_seed(seed))
        g.reset_memory()
        s.reset_memory()
        a = g.generate_ids(prompt, max_new_tokens=8, stop_at_eos=False)
        b = s.generate_ids(prompt, max_new_tokens=8, stop_at_eos=False)
        assert a.tolist() == b.tolist()


def test_the_artifacts_decode_contract_is_still_served(pair):
    """infer("decode") with prefix/past feeds on the fused runner: the grown tail comes back (kept as OrtValues
    when asked), equal to the exported graph's."""
    g, s = pair
    P, L = g.config.prefix_len, g.config.num_hidden_layers
    out = g.runner.infer("prefill", {"ids": torch.tensor([3, 1, 4]), **g.host_memory.prefill_feeds()})
    feeds = {"ids": torch.tensor([2]), "pos": torch.tensor(P + 3),
             **DecodeCache(out["present_k"], out["present_v"], P).feeds()}
    keep = ("present_k.0",)
    got, want = g.runner.infer("decode", feeds, keep=keep), s.runner.infer("decode", feeds)
    assert isinstance(got["present_k.0"], ort.OrtValue) and isinstance(got["present_v.0"], torch.Tensor)
    assert set(got) == set(want)
    _close(got["logits"], want["logits"])
    for l in range(L):
        for c in "kv":
            _close(_np(got[f"present_{c}.{l}"]), want[f"present_{c}.{l}"])


def test_the_rewrite_leaves_a_graph_it_does_not_recognise_untouched(tiny_artifact, pair):
    g, _ = pair
    c = g.config
    man = g.runner.manifest
    pre = onnx.load(str(graph_path(tiny_artifact, man, "prefill")), load_external_data=False)
    before = pre.SerializeToString()
    assert rewrite(pre, c.num_attention_heads, c.num_key_value_heads, c.dh) == 0 and pre.SerializeToString() == before
    dec = onnx.load(str(graph_path(tiny_artifact, man, "decode")), load_external_data=False)
    cat = next(n for n in dec.graph.node if "present_v.1" in n.output)
    cat.input[0], cat.input[1] = cat.input[1], cat.input[0]  # layer 1 no longer Concat(past_v, v)
    before = dec.SerializeToString()
    assert rewrite(dec, c.num_attention_heads, c.num_key_value_heads, c.dh) == 0 and dec.SerializeToString() == before


def test_attention_option_is_checked(tiny_artifact):
    with pytest.raises(ValueError, match="attention must be one of"):
        Engine(tiny_artifact, attention="flash")


def test_rope_inside_the_op_equals_the_exported_rope(tiny_artifact, pair):
    """do_rotary (the default) against the op fed the graph's rotated q/k: one step on the same buffers."""
    import numpy as np

    g, _ = pair
    c, man = g.config, g.runner.manifest
    path = graph_path(tiny_artifact, man, "decode")
    outs = {}
    for rot in (True, False):
        m = onnx.load(str(path), load_external_data=False)
        assert rewrite(m, c.num_attention_heads, c.num_key_value_heads, c.dh, rotary=rot) == c.num_hidden_layers
        gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
        assert {a.i for n in gqa for a in n.attribute if a.name == "do_rotary"} == {int(rot)}
        assert any(n.op_type == "Neg" for n in m.graph.node) is (not rot)  # rotate_half's Neg only without it
        so = ort.SessionOptions()
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {"ids": np.array([7]), "pos": np.array(c.prefix_len + 5), "kv_len": np.array(c.prefix_len + 5)}
        for i in s.get_inputs():
            if i.name.startswith(("kv_k.", "kv_v.")):
                feeds[i.name] = rng.standard_normal((1, c.num_key_value_heads, c.prefix_len + 8, c.dh)).astype(np.float32)
        res = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))  # unbound: present is a new tensor
        outs[rot] = (res["logits"], [res[f"present_k.{l}"][0, :, c.prefix_len + 5] for l in range(c.num_hidden_layers)])
    _close(outs[True][0], outs[False][0])
    for a, b in zip(outs[True][1], outs[False][1]):  # the row the op appended: the rotated k
        _close(a, b)
