"""Issue 3: official-layout checkpoint load/save, validation messages, offline loading."""
from __future__ import annotations

import json
import socket
import warnings

import pytest
import torch
from safetensors.torch import save_file

from mplus_deploy.model import MPlus, preset
from mplus_deploy.model.checkpoint import (INDEX_NAME, WEIGHTS_NAME, CheckpointError, load, parse_size,
                                           read_checkpoint_tensors, save)
from mplus_deploy.model.presets import resolve


def _same_params(a: MPlus, b: MPlus) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access during checkpoint loading")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", ["tiny", "tiny-memoryllm"])
def test_round_trip_exact(tmp_path, name, no_network):
    m = MPlus.from_config(preset(name), seed=3)
    save(m, tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / WEIGHTS_NAME).exists()
    m2 = load(tmp_path)
    assert _same_params(m, m2)
    assert m.memory.equal(m2.memory)  # STM, LTM values/keys/ages/rf, age dtypes, initialized
    ids = torch.arange(3, 20)
    assert torch.equal(m.prefill_logits(ids), m2.prefill_logits(ids))
    stored = read_checkpoint_tensors(tmp_path)
    assert torch.equal(stored["memory"], m.memory.stm)
    if name == "tiny":
        assert stored["ltm_keys.1"].shape == (24, 16) and stored["ltm_ages.0"].dtype == torch.float64
        assert "initialized" not in stored
    else:
        assert stored["initialized"].dtype == torch.uint8 and stored["initialized"].shape == ()
        assert not any(k.startswith("ltm") for k in stored)
    m2.inject(torch.arange(5, 30))  # a loaded model is fully usable


def test_uninitialized_memoryllm_round_trip(tmp_path):
    m = MPlus.from_config(preset("tiny-memoryllm"), initialized=False)
    save(m, tmp_path)
    assert load(tmp_path).memory.initialized is False


def test_round_trip_after_merge_keeps_ltm_and_age_dtype(tmp_path):
    m = MPlus.from_config(preset("tiny"))
    m.memory.seed(1)
    for i in range(4):  # F = 3 updates → one merge, then one pending batch
        m.inject(torch.arange(10, 42) + i)
    assert m.memory.ltm_age_dtype[0] == "float64" and m.memory.n_pending
    with pytest.warns(UserWarning, match="pending LTM cache"):
        save(m, tmp_path)
    m2 = load(tmp_path)
    mem, mem2 = m.memory, m2.memory
    assert torch.equal(mem.stm, mem2.stm)
    for a, b in zip(mem.ltm + mem.ltm_keys + mem.ltm_ages + mem.ltm_rf, mem2.ltm + mem2.ltm_keys + mem2.ltm_ages + mem2.ltm_rf):
        assert torch.equal(a, b)
    assert mem2.ltm_age_dtype == ["float64", "float64"]
    assert mem2.n_pending == 0 and mem2.update_step == 0 and not mem2.stm_ages.any()  # official: runtime state restarts
    assert json.loads((tmp_path / "config.json").read_text())["ltm_initial_size"] == mem.ltm[0].shape[0]


def test_two_shard_bf16_loads_into_fp32(tmp_path):
    m = MPlus.from_config(preset("tiny"), seed=1)
    total = sum(t.numel() for t in m.state_dict().values()) * 2  # rough bf16 size
    save(m, tmp_path, shard_size=int(total * 0.6), dtype=torch.bfloat16)
    idx = json.loads((tmp_path / INDEX_NAME).read_text())
    files = sorted(set(idx["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert idx["metadata"]["total_size"] > 0 and not (tmp_path / WEIGHTS_NAME).exists()
    stored = read_checkpoint_tensors(tmp_path, ["memory", "model.norm.weight", "ltm_ages.0"])
    assert stored["memory"].dtype == torch.bfloat16 and stored["ltm_ages.0"].dtype == torch.float64
    m2 = load(tmp_path, dtype=torch.float32)
    assert m2.dtype == torch.float32 and m2.memory.stm.dtype == torch.float32
    ids = torch.arange(3, 20)
    ref, got = m.prefill_logits(ids), m2.prefill_logits(ids)
    # bf16 storage: 8 significant bits per weight; tolerance rel 2e-2 of the logit scale
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    # loading into bf16 converts per tensor; ages / rf stay float64
    m3 = load(tmp_path, dtype=torch.bfloat16)
    assert m3.dtype == torch.bfloat16 and m3.memory.ltm[0].dtype == torch.bfloat16
    assert m3.memory.ltm_ages[0].dtype == torch.float64
    # re-saving unsharded removes the stale shards and index
    save(m, tmp_path)
    assert not (tmp_path / INDEX_NAME).exists() and not list(tmp_path.glob("model-*.safetensors"))
    assert _same_params(m, load(tmp_path))


def test_tied_embeddings_round_trip(tmp_path):
    cfg = preset("tiny").replace(tie_word_embeddings=True)
    m = MPlus.from_config(cfg)
    save(m, tmp_path)
    assert "lm_head.weight" not in read_checkpoint_tensors(tmp_path)
    m2 = load(tmp_path)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert torch.equal(m.prefill_logits(torch.arange(4, 9)), m2.prefill_logits(torch.arange(4, 9)))


def test_presets_and_resolve(tmp_path):
    for name in ("tiny", "tiny-memoryllm", "small"):
        m = load(name)
        assert isinstance(m, MPlus) and m.config.num_hidden_layers == preset(name).num_hidden_layers
    m, tok = resolve("tiny")
    assert tok is None
    save(m, tmp_path)
    m2, tok2 = resolve(str(tmp_path))
    assert tok2 is None and _same_params(m, m2)
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a preset"):
        load("no-such-model")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(123) == 123
    assert parse_size("500MB") == 5 * 10**8
    with pytest.raises(ValueError):
        parse_size("lots")


# ------------------------------------------------------------------------------ broken checkpoints
def _rewrite(path, fn):
    sd = read_checkpoint_tensors(path)
    fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


@pytest.fixture
def ckpt(tmp_path):
    save(MPlus.from_config(preset("tiny")), tmp_path)
    return tmp_path


def _err(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load(path)
    return str(e.value)


def test_missing_key(ckpt):
    _rewrite(ckpt, lambda sd: (sd.pop("model.layers.1.mlp.up_proj.lora_B.decoder_adapter.weight"), sd.pop("ltm_keys.1")))
    msg = _err(ckpt)
    assert "missing keys (2)" in msg and "model.layers.1.mlp.up_proj.lora_B.decoder_adapter.weight" in msg and "ltm_keys.1" in msg


def test_unexpected_key(ckpt):
    _rewrite(ckpt, lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    msg = _err(ckpt)
    assert "unexpected keys (1)" in msg and "rotary_emb.inv_freq" in msg


def test_shape_mismatch(ckpt):
    _rewrite(ckpt, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}))
    msg = _err(ckpt)
    assert "shape mismatch for model.norm.weight: expected [64]" in msg and "got [65]" in msg


def test_inconsistent_stm_size(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_blocks"] = 7
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = _err(ckpt)
    assert "inconsistent memory fields" in msg and "N=32 STM slots" in msg and "num_blocks=7" in msg and "= 40" in msg


def test_inconsistent_ltm_layers(ckpt):
    def add(sd):
        for f in ("ltm", "ltm_keys", "ltm_ages", "ltm_recall_frequencies"):
            sd[f"{f}.2"] = sd[f"{f}.0"].clone()
    _rewrite(ckpt, add)
    msg = _err(ckpt)
    assert "LTM entries for layer(s) 2" in msg and "num_hidden_layers=2" in msg


def test_inconsistent_ltm_keys_width(ckpt):
    _rewrite(ckpt, lambda sd: sd.update({"ltm_keys.0": torch.zeros(24, 8)}))
    msg = _err(ckpt)
    assert "ltm_keys.0 has shape [24, 8]" in msg and "selector_hidden_dim=16" in msg


def test_inconsistent_ltm_rows(ckpt):
    _rewrite(ckpt, lambda sd: sd.update({"ltm_ages.1": torch.zeros(5, dtype=torch.float64)}))
    assert "layer 1 LTM row counts differ" in _err(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-1000])
    msg = _err(ckpt)
    assert str(f) in msg and "truncated" in msg


def test_not_safetensors(ckpt):
    f = ckpt / WEIGHTS_NAME
    f.write_bytes(b"PK\x03\x04 this is a zip / pickle, not safetensors" * 10)
    msg = _err(ckpt)
    assert str(f) in msg and "not a valid safetensors file" in msg


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text('{"architectures": ["MPlus"], "hidden_size": 64,')
    msg = _err(ckpt)
    assert "config.json is not valid JSON" in msg


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    assert "needs a config.json" in _err(ckpt)


def _sharded(tmp_path):
    save(MPlus.from_config(preset("tiny")), tmp_path, shard_size=60_000)
    return tmp_path


def test_invalid_index_json(tmp_path):
    p = _sharded(tmp_path)
    (p / INDEX_NAME).write_text("{not json")
    msg = _err(p)
    assert INDEX_NAME in msg and "invalid JSON" in msg


def test_missing_shard(tmp_path):
    p = _sharded(tmp_path)
    shards = sorted(p.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    msg = _err(p)
    assert "missing" in msg and shards[1].name in msg


def test_index_disagrees_with_shard(tmp_path):
    p = _sharded(tmp_path)
    idx = json.loads((p / INDEX_NAME).read_text())
    k = next(k for k, v in idx["weight_map"].items() if v.startswith("model-00001"))
    other = next(v for v in idx["weight_map"].values() if not v.startswith("model-00001"))
    idx["weight_map"][k] = other
    (p / INDEX_NAME).write_text(json.dumps(idx))
    assert "has no such tensor" in _err(p)


def test_no_weights(ckpt):
    (ckpt / WEIGHTS_NAME).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"x")
    msg = _err(ckpt)
    assert "no model.safetensors" in msg and ".bin weights are not supported" in msg


def test_unknown_config_field_kept_and_warned(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["my_custom_field"] = 7
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="my_custom_field"):
        m = load(ckpt)
    assert m.config.extra["my_custom_field"] == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save(m, ckpt / "again")
    assert json.loads((ckpt / "again" / "config.json").read_text())["my_custom_field"] == 7


def test_load_builds_on_meta_and_reads_lazily(ckpt, monkeypatch):
    """No full-model random init happens on load (the model is built on the meta device)."""
    calls = []
    orig = torch.nn.init.kaiming_uniform_

    def spy(tensor, *a, **k):
        if not tensor.is_meta:
            calls.append(tuple(tensor.shape))
        return orig(tensor, *a, **k)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    load(ckpt)
    assert calls == []
