"""Issue 13 item 5: streamed random official-layout checkpoints (mplus_deploy.model.synthetic)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from mplus_deploy.model.checkpoint import INDEX_NAME, WEIGHTS_NAME, load, read_checkpoint_tensors
from mplus_deploy.model.safetensors_io import nbytes
from mplus_deploy.model.synthetic import (PIECE, SCHEME, main, synthetic_config, synthetic_tensor, tensor_specs,
                                          write_synthetic)

ROOT = Path(__file__).resolve().parents[2]


def _check_all(path, cfg, seed, dtype):
    stored = read_checkpoint_tensors(path)
    specs = tensor_specs(cfg, dtype)
    assert sorted(stored) == sorted(n for n, _, _ in specs)
    for name, dt, shape in specs:
        t = stored[name]
        assert t.dtype == dt and tuple(t.shape) == shape, name
        assert torch.equal(t, synthetic_tensor(cfg, name, shape, seed, dt)), name  # regenerated on its own
    return stored


@pytest.mark.parametrize("name", ["tiny", "tiny-memoryllm"])
def test_load_and_every_tensor_regenerates(tmp_path, name):
    write_synthetic(tmp_path, name, dtype=torch.float32, seed=5)
    cfg = synthetic_config(name)
    stored = _check_all(tmp_path, cfg, 5, torch.float32)
    m = load(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == cfg.architectures
    for n, p in m.named_parameters():
        assert torch.equal(p, stored[n]), n
    assert torch.equal(m.memory.stm, stored["memory"])
    if cfg.is_mplus:
        N, S = cfg.N, cfg.ltm_initial_size
        assert torch.equal(m.memory.ltm_ages[0], torch.arange(N + S - 1, N - 1, -1, dtype=torch.float64))
        assert torch.all(m.memory.ltm_rf[1] == cfg.initial_rf_when_moving_stm_to_ltm)
    else:
        assert m.memory.initialized is True and "lm_head.weight" in stored


def test_values_follow_the_documented_rule(tmp_path):
    """Piece j of a tensor = N(mean, std) / U drawn by a generator seeded from sha256(scheme/seed/name/j)."""
    cfg = synthetic_config("small", ltm_rows=20000)  # ltm.i: 5.1M elements = 2 pieces
    def gen(name, j, n):
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{SCHEME}/3/{name}/{j}".encode()).digest()[:8],
                                                         "little") & ((1 << 63) - 1))
        return g, torch.empty(n)
    g, x = gen("model.embed_tokens.weight", 0, 4096 * 256)
    assert torch.equal(synthetic_tensor(cfg, "model.embed_tokens.weight", (4096, 256), 3).view(-1), x.normal_(0, 0.02, generator=g))
    ltm = synthetic_tensor(cfg, "ltm.2", (20000, 256), 3).view(-1)
    g, x = gen("ltm.2", 1, 20000 * 256 - PIECE)
    assert torch.equal(ltm[PIECE:], x.normal_(0, 1, generator=g))
    a = synthetic_tensor(cfg, "model.layers.0.self_attn.q_proj.lora_A.default.weight", (8, 256), 3)
    b = synthetic_tensor(cfg, "model.layers.0.self_attn.q_proj.lora_B.default.weight", (256, 8), 3)
    nrm = synthetic_tensor(cfg, "model.layers.0.input_layernorm.weight", (256,), 3)
    assert a.abs().max() <= 1 / 16 and 0.001 < b.std() < 0.003 and 0.03 < nrm.std() < 0.07 and abs(nrm.mean() - 1) < 0.02
    assert not torch.equal(a, synthetic_tensor(cfg, "model.layers.0.self_attn.q_proj.lora_A.default.weight", (8, 256), 4))
    assert not torch.equal(ltm[:100], synthetic_tensor(cfg, "ltm.1", (20000, 256), 3).view(-1)[:100])


def test_shard_layout_does_not_change_values(tmp_path):
    kw = dict(preset_name="small", ltm_rows=1000, dtype="bf16", seed=1)
    one, many = write_synthetic(tmp_path / "one", **kw), write_synthetic(tmp_path / "many", shard_size="300kB", **kw)
    assert (one / WEIGHTS_NAME).exists() and not (one / INDEX_NAME).exists()
    assert (many / INDEX_NAME).exists() and len(list(many.glob("model-*.safetensors"))) > 5
    a, b = read_checkpoint_tensors(one), read_checkpoint_tensors(many)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    _check_all(many, synthetic_config("small", ltm_rows=1000), 1, torch.bfloat16)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_ltm_keys_are_the_models_retriever_keys(tmp_path, dtype, tol):
    write_synthetic(tmp_path, "small", ltm_rows=20000, dtype=dtype)  # 20000 rows: 2 key chunks of 16384
    m = load(tmp_path, dtype=dtype)
    ref = m.retriever_keys(torch.stack(m.memory.ltm)).float()
    got = torch.stack(m.memory.ltm_keys).float()
    assert got.shape == (4, 20000, 64)
    assert ((got - ref).norm() / ref.norm()).item() < tol
    assert torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("name,dtype", [("tiny", torch.float32), ("tiny-memoryllm", torch.float32), ("small", torch.bfloat16)])
def test_loaded_model_runs(tmp_path, name, dtype):
    write_synthetic(tmp_path, name, dtype=dtype, seed=2)
    m = load(tmp_path, dtype=dtype)
    ids = torch.arange(3, 40)
    lg = m.prefill_logits(ids)
    assert torch.isfinite(lg).all() and lg.std() > 1e-3 and (lg[-1] != lg[-1, 0]).any()
    assert not torch.allclose(lg, m.prefill_logits(ids, use_memory=False))  # memory matters
    out = m.generate(ids, max_new_tokens=6, seed=0, stop_at_eos=False)
    assert out.shape == (6,) and int(out.max()) < m.config.vocab_size
    m.inject(torch.arange(5, 60))  # memory update works on the loaded state
    assert torch.isfinite(m.prefill_logits(ids)).all()


def test_overrides_and_config_json(tmp_path):
    write_synthetic(tmp_path, "small", layers=2, ltm_rows=300, dtype="fp16", vocab_size=1000, rope_theta=1e4)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["ltm_initial_size"], cfg["vocab_size"], cfg["torch_dtype"]) == (2, 300, 1000, "float16")
    m = load(tmp_path)
    assert m.memory.stats()["ltm_rows"] == [300, 300] and m.model.embed_tokens.weight.shape == (1000, 256)


@pytest.mark.parametrize("kw,msg", [
    (dict(preset_name="llama-7b"), "unknown preset"),
    (dict(layers=0), "must be >= 1"),
    (dict(ltm_rows=0), "ltm_rows"),
    (dict(preset_name="tiny-memoryllm", ltm_rows=10), "no long-term memory"),
    (dict(hidden_sise=64), "unknown config field 'hidden_sise'"),
    (dict(num_attention_heads=5), "invalid config"),
    (dict(vocab_size="big"), "vocab_size='big' must be an integer"),
    (dict(dtype="int8"), "bf16, fp16, fp32"),
    (dict(shard_size="huge"), "not a size"),
])
def test_bad_input_raises(tmp_path, kw, msg):
    kw = {"preset_name": "tiny", **kw}
    with pytest.raises(ValueError, match=msg):
        write_synthetic(tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()  # nothing written before validation


def test_existing_dir_needs_overwrite(tmp_path, capsys):
    write_synthetic(tmp_path, "tiny", shard_size="20kB")
    assert (tmp_path / INDEX_NAME).exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic(tmp_path, "tiny")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--preset", "tiny"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main([str(tmp_path), "--preset", "tiny", "--overwrite", "--dtype", "fp32"]) == 0
    assert (tmp_path / WEIGHTS_NAME).exists() and not (tmp_path / INDEX_NAME).exists()
    assert not list(tmp_path.glob("model-*.safetensors"))  # stale shards removed
    load(tmp_path)
    err = capsys.readouterr().err
    assert "[1/" in err and "layer 1" in err and "done:" in err  # plain progress lines on stderr


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "tiny", "--layers", "0"], "must be >= 1"),
    (["--preset", "tiny-memoryllm", "--ltm-rows", "5"], "no long-term memory"),
    (["--preset", "tiny", "--set", "nope=1"], "unknown config field"),
    (["--preset", "nope"], "invalid choice"),
    (["--preset", "tiny", "--dtype", "int8"], "invalid choice"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "o"), *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_console_script_registered():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mplus-synth-checkpoint"] == "mplus_deploy.model.synthetic:main"


CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(2)
from mplus_deploy.model.synthetic import synthetic_config, tensor_specs, write_synthetic
tensor_specs(synthetic_config("tiny"), torch.float32)  # the first meta build imports torch._dynamo (~150 MB, fixed)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
write_synthetic(sys.argv[1], "small", layers=8, ltm_rows=64000, dtype=torch.float32)
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_peak_rss_is_one_tensor_not_the_checkpoint(tmp_path):
    out = tmp_path / "big"
    r = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    written = sum(p.stat().st_size for p in out.iterdir())
    specs = tensor_specs(synthetic_config("small", layers=8, ltm_rows=64000), torch.float32)
    largest = max(nbytes(dt, s) for _, dt, s in specs)  # one ltm.i: 65.5 MB
    grew = rss["peak"] - rss["base"]
    assert written > 600e6 and written > 9 * largest
    assert grew < largest + 128e6 and grew < 0.35 * written, (grew, largest, written)  # one tensor + buffers
