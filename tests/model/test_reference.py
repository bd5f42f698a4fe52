"""Reference model (issue 2): parity with transformers and with the naive oracle, the exact
fast path, memory rows as K/V only."""
import pytest
import torch

from mplus_deploy.model import MPlus, preset
from mplus_deploy.model import forward as F_
from mplus_deploy.model import retrieval

from . import naive


def tiny(kind="mplus", **kw):
    cfg = preset("tiny" if kind == "mplus" else "tiny-memoryllm")
    return cfg.replace(**kw) if kw else cfg


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_backbone_matches_transformers_llama():
    """Memory prefix off: logits equal LlamaForCausalLM on the same (decoder-adapter merged) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = MPlus.from_config(tiny(), seed=3)
    c = m.config
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": c.rope_scaling["factor"], "rope_theta": c.rope_theta},
        attention_bias=False, mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    sd = {}
    for k, v in m.state_dict().items():
        if ".lora_" in k or k in ("bos_embedding", "new_memory_positional_emb") or "_proj." in k and ("query_proj" in k or "key_proj" in k):
            continue
        sd[k.replace(".base_layer", "")] = v
    for name, mod in m.named_modules():
        if hasattr(mod, "merged_weight") and hasattr(mod, "base_layer"):
            sd[name + ".weight"] = mod.merged_weight("decoder_adapter")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "rotary" not in k], missing
    ids = torch.randint(0, c.vocab_size, (13,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    ours = m.prefill_logits(ids, use_memory=False)
    assert rel(ours, ref) <= 1e-5


@pytest.mark.parametrize("T", [5, 8, 13])
def test_inject_matches_naive_oracle(T):
    """Covers the chunk-shorter-than-K rule (T=5 < K=8), T == K and T > K."""
    m = MPlus.from_config(tiny(), seed=1)
    ids = torch.randint(0, 256, (T,))
    ours = F_.inject_forward(m, m.memory, ids)
    ref = naive.inject_delta(m, ids)
    assert ours.shape == (2, 8, 64)
    assert rel(ours, ref) <= 1e-5


def test_short_chunk_delta_mixes_old_tail():
    """T < K: all K outputs are query rows; the first K-T come from the old STM tail (spec §8)."""
    m = MPlus.from_config(tiny(), seed=1)
    ids = torch.randint(0, 256, (3,))
    d1 = F_.inject_forward(m, m.memory, ids)
    m.memory.stm[:, -1] += 1.0  # the newest old-tail row is a query row when T < K ...
    d2 = F_.inject_forward(m, m.memory, ids)
    assert (d1 - d2).abs().amax(dim=(0, 2)).gt(1e-4).sum() > 0
    assert m.memory.stm.shape[1] == m.config.N


@pytest.mark.parametrize("kind", ["mplus", "memoryllm"])
def test_prefill_matches_naive_oracle(kind):
    m = MPlus.from_config(tiny(kind), seed=2)
    for i in range(4):
        m.inject(torch.randint(0, 256, (11,)))
    ids = torch.randint(0, 256, (6,))
    rows = None
    if kind == "mplus":
        idx = m.retrieved_indices(ids)
        rows = [F_.ltm_pool(m.memory, l)[idx[l]] for l in range(2)]
    ref = naive.prefill_logits(m, ids, rows)
    assert rel(m.prefill_logits(ids), ref) <= 1e-5


@pytest.mark.parametrize("kind", ["mplus", "memoryllm"])
def test_fast_path_equals_direct(kind):
    m = MPlus.from_config(tiny(kind), seed=4)
    ids = torch.randint(0, 256, (9,))
    for i in range(5):  # crosses a merge (F=3) and leaves pending rows
        m.inject(torch.randint(0, 256, (10,)))
        direct = m.prefill_logits(ids)
        m.fast_path = True
        fast = m.prefill_logits(ids)
        m.fast_path = False
        assert rel(fast, direct) <= 1e-6
    m.fast_path = True
    g_fast = m.generate(ids, 6)
    m.fast_path = False
    assert torch.equal(g_fast, m.generate(ids, 6))


def test_memory_rows_are_never_queries():
    """1-layer model: a memory row reaches only k_proj/v_proj, never q_proj, o_proj or the MLP."""
    m = MPlus.from_config(tiny(num_hidden_layers=1), seed=5)
    seen = {}

    def hook(name):
        def f(mod, args, out):
            seen.setdefault(name, []).append(args[0].detach().clone())
        return f

    at, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    hs = [at.q_proj.register_forward_hook(hook("q")), at.k_proj.register_forward_hook(hook("k")),
          at.o_proj.register_forward_hook(hook("o")), mlp.gate_proj.register_forward_hook(hook("mlp"))]
    ids = torch.randint(0, 256, (7,))
    a = m.prefill_logits(ids)
    m.memory.stm[0, 5] += 3.0
    m.memory.touch()
    b = m.prefill_logits(ids)
    for h in hs:
        h.remove()
    q0, q1 = seen["q"]
    assert q0.shape[0] == 7 and torch.equal(q0, q1)  # queries: prompt rows only, untouched by memory
    for name in ("o", "mlp"):  # o_proj / MLP run on prompt rows only (their values change via attention)
        assert [x.shape[0] for x in seen[name]] == [7, 7], name
    k0, k1 = seen["k"]
    assert k0.shape[0] == m.config.prefix_len + 7 and not torch.equal(k0, k1)
    assert not torch.allclose(a, b)


def test_retrieval_topk_set_and_oldest_first_order():
    m = MPlus.from_config(tiny(), seed=6)
    for _ in range(3):
        m.inject(torch.randint(0, 256, (12,)))  # merge: LTM 24 -> 48 > K0=16; pending empty
    m.inject(torch.randint(0, 256, (12,)))  # pending present
    ids = torch.randint(0, 256, (5,))
    idx = m.retrieved_indices(ids)
    mem = m.memory
    h = m.model.embed_tokens(ids)
    q = F_.retriever_query(m, 0, h, "fp32")
    keys = torch.cat([mem.ltm_keys[0], mem.pend_keys[0]])
    s = torch.sigmoid(q @ keys.T).mean(0)  # brute force
    want = set(torch.topk(s, 16).indices.tolist())
    assert set(idx[0].tolist()) == want and retrieval.boundary_ties(s, 16) == 1
    ages = torch.cat([mem.ltm_ages[0], mem.pend_ages[0]])[idx[0]]
    assert torch.all(ages[:-1] >= ages[1:])  # oldest first


def test_cyclic_fill_when_ltm_smaller_than_k0():
    cfg = tiny(ltm_initial_size=5)
    m = MPlus.from_config(cfg, seed=7)
    m.memory.ltm_ages = [torch.tensor([3.0, 9.0, 3.0, 1.0, 9.0], dtype=torch.float64)] * 2
    m.inject(torch.randint(0, 256, (10,)))  # pending present: ignored by the small-LTM branch
    idx = m.retrieved_indices(torch.randint(0, 256, (4,)))[0]
    # arange(5) tiled to >= 16, last 16: [4, 0,1,2,3,4, 0,...] then age-desc stable-with-descending-index
    tiled = torch.arange(5).repeat(4)[-16:]
    ages = m.memory.ltm_ages[0][tiled]
    order = torch.sort(ages, stable=True).indices.flip(0)
    assert torch.equal(idx, tiled[order])
    assert idx[:7].tolist() == [4, 1, 4, 1, 4, 1, 4]  # age 9 rows, later tile positions first
    assert idx.max() < 5


def test_age_order_numpy_mode_matches_numpy():
    import numpy as np

    ages = torch.tensor([5, 1, 5, 7, 1, 0], dtype=torch.float64)
    o = retrieval.age_order(ages, "numpy", "int32")
    assert o.tolist() == np.argsort(ages.numpy().astype("int32"))[::-1].tolist()
    assert retrieval.age_order(ages, "stable").tolist() == [3, 2, 0, 4, 1, 5]


def test_rope_bf16_inv_freq_switch_changes_logits_only_when_on():
    m = MPlus.from_config(tiny(), seed=8)
    ids = torch.randint(0, 256, (6,))
    base = m.prefill_logits(ids)
    m.rope_inv_freq_dtype = "bf16"
    m._rope = None
    bf = m.prefill_logits(ids)
    m.rope_inv_freq_dtype = "fp32"
    assert torch.equal(m.prefill_logits(ids), base)
    assert not torch.equal(bf, base)


def test_bf16_score_emulation_is_close_to_fp32():
    m = MPlus.from_config(tiny(), seed=9)
    for _ in range(3):
        m.inject(torch.randint(0, 256, (12,)))
    ids = torch.randint(0, 256, (5,))
    a = m.retrieved_indices(ids)
    m.retrieval_score_dtype = "bf16"
    b = m.retrieved_indices(ids)
    overlap = len(set(a[0].tolist()) & set(b[0].tolist())) / 16
    assert overlap >= 0.5  # bf16 rounding moves boundary entries only


def test_sdpa_attention_equals_eager():
    m = MPlus.from_config(tiny(), seed=10)
    ids = torch.randint(0, 256, (9,))
    m.inject(torch.randint(0, 256, (12,)))
    a = m.prefill_logits(ids)
    g = m.generate(ids, 5)
    m.attention_impl = "sdpa"
    assert rel(m.prefill_logits(ids), a) <= 1e-5
    assert torch.equal(m.generate(ids, 5), g)
