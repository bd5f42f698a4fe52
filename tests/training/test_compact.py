"""Compact trained-parts files (``training.compact``, what ships as the demo's memory): exact where nothing is
truncated, the optimal (Eckart-Young) error where it is, deltas against the base model, loadable, and the CLI."""
import pytest
import torch

from mplus_deploy.training.compact import COMPACT_FORMAT, compact, expand
from mplus_deploy.training.loop import TrainConfig, load_into, save, train, write_compact

from ..runtime.conftest import char_tokenizer, tiny_model


def _trained_like(model, seed=0):
    """Tensors shaped like a training result: random LoRA pairs (full rank), retriever = base + rank-2 delta."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        if ".lora_" in n:
            out[n] = torch.randn(p.shape, generator=g) * 0.1
        elif "query_proj" in n and n.endswith("weight") and p.dim() == 2:
            u, v = torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g)
            out[n] = p.detach() + 0.05 * u @ v
        elif n == "bos_embedding":
            out[n] = p.detach() + 1e-3 * torch.randn(p.shape, generator=g)
    return out


def _base(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _pairs(t):
    return [(n, n.replace(".lora_A.", ".lora_B.")) for n in t if ".lora_A." in n]


def test_without_truncation_the_expansion_is_exact_in_fp32():
    m = tiny_model()
    t, base = _trained_like(m), _base(m)
    r = max(t[a].shape[0] for a, _ in _pairs(t))
    small, meta = compact(t, base, lora_rank=r, delta_rank=2, dtype="float32")
    assert meta["format"] == COMPACT_FORMAT
    full = expand(small, base)
    assert set(full) == set(t)
    for a, b in _pairs(t):
        ref = t[b] @ t[a]
        assert torch.allclose(full[b] @ full[a], ref, rtol=1e-5, atol=1e-6 * ref.abs().max()), a
    for n in t:
        if ".lora_" not in n:
            assert torch.allclose(full[n], t[n], rtol=1e-5, atol=1e-6), n


def test_truncation_keeps_the_best_rank_k_product_and_bf16_is_close():
    m = tiny_model()
    t, base = _trained_like(m, seed=1), _base(m)
    full32 = expand(compact(t, base, lora_rank=2, delta_rank=2, dtype="float32")[0], base)
    full16 = expand(compact(t, base, lora_rank=2, delta_rank=2, dtype="bfloat16")[0], base)
    for a, b in _pairs(t):
        ref = (t[b] @ t[a]).double()
        s = torch.linalg.svdvals(ref)
        err = (full32[b] @ full32[a]).double() - ref
        assert abs(err.norm() ** 2 - (s[2:] ** 2).sum()) <= 1e-4 * (s ** 2).sum(), a  # Eckart-Young optimum
        assert full32[a][2:].abs().max() == 0 and full32[b][:, 2:].abs().max() == 0  # padded back to the config rank
        rel = ((full16[b] @ full16[a]).double() - (full32[b] @ full32[a]).double()).norm() / ref.norm()
        assert rel < 2e-2, (a, float(rel))


def test_compact_refuses_tensors_the_base_lacks_and_unknown_dtypes():
    m = tiny_model()
    t, base = _trained_like(m), _base(m)
    with pytest.raises(ValueError, match="base model lacks"):
        compact({**t, "nope.weight": torch.ones(2, 2)}, base)
    with pytest.raises(ValueError, match="dtype"):
        compact(t, base, dtype="int3")


def test_a_compact_file_of_a_training_result_loads_as_deltas_of_the_initial_model(tmp_path):
    tok = char_tokenizer()
    m = tiny_model()
    res = train(m, tok, TrainConfig(steps=3, lr=5e-3, warmup=1, facts=4, log_every=1))
    f = tmp_path / "c.safetensors"
    write_compact(m, res, f, lora_rank=64, delta_rank=64, dtype="float32")  # no truncation at tiny's sizes
    fresh = tiny_model()
    meta = load_into(fresh, f)
    assert meta["format"] == COMPACT_FORMAT and meta["steps_done"] == "3"
    have = dict(fresh.named_parameters())
    for a, b in _pairs(res.tensors):
        ref = res.tensors[b] @ res.tensors[a]
        assert torch.allclose(have[b] @ have[a], ref, rtol=1e-5, atol=1e-6 * ref.abs().max().clamp(min=1e-12)), a
    for n, t in res.tensors.items():
        if ".lora_" not in n:
            assert torch.allclose(have[n], t, rtol=1e-5, atol=1e-6), n


def test_cli_compacts_a_full_file_and_refuses_bad_options(tmp_path, capsys):
    from mplus_deploy.cli.train import main

    tok = char_tokenizer()
    m = tiny_model()
    full = tmp_path / "full.safetensors"
    save(train(m, tok, TrainConfig(steps=2, lr=5e-3, warmup=1, facts=4, log_every=1)), full)
    out = tmp_path / "c.safetensors"
    assert main(["tiny", "-o", str(out), "--from-parts", str(full)]) == 2  # needs --compact
    assert "--compact" in capsys.readouterr().err and not out.exists()
    assert main(["tiny", "-o", str(out), "--compact", "--from-parts", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["tiny", "-o", str(out), "--compact", "--lora-rank", "0"]) == 2
    assert main(["tiny", "-o", str(out), "--compact", "--from-parts", str(out)]) == 2  # no such file yet
    assert not out.exists()
    assert main(["tiny", "-o", str(out), "--compact", "--from-parts", str(full), "--lora-rank", "2"]) == 0
    fresh = tiny_model()
    assert load_into(fresh, out)["compact"] == '{"lora_rank": 2, "delta_rank": 16, "dtype": "bfloat16"}'
    assert main(["tiny", "-o", str(tmp_path / "d.safetensors"), "--compact", "--from-parts", str(out)]) == 2
    assert "not a full trained-parts file" in capsys.readouterr().err
