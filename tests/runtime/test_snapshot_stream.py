"""Streamed snapshots: bounded pieces both ways, format v1 compatibility with the pre-streaming writer,
owned buffers after load (issue 15), and refusals that name the bad field before touching live state."""
import base64
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mplus_deploy.runtime import Engine, SnapshotError, snapshot
from mplus_deploy.runtime.memory_convert import from_hidden
from mplus_deploy.runtime.memory import pack_kv

from .conftest import chunks, tiny_model

META = snapshot.META_KEY


def _write(hm, delta, project):
    """One update as the engine makes it: project the new rows, hand the tensors to the memory."""
    return hm.write(delta, project(delta))


@pytest.fixture
def eng():
    e = Engine(tiny_model(ltm_rf=[1.0, 2.0]), backend="torch", seed=9)
    for ids in chunks(4, lengths=(20, 32, 24, 17)):  # one merge with per-layer eviction, 8 pending rows
        e.memorize(ids, progress=False)
    assert e.memory["ltm_rows"] == [24, 48] and e.memory["pending_rows"] == 8
    return e


def _old_style_tensors(mem) -> dict:
    """The tensors the pre-streaming ``snapshot.save`` built (whole, packed k|v rows)."""
    st, s = mem.state, mem.store
    t = {"stm": st.stm, "stm_ages": st.stm_ages, "stm_k": mem.stm_k, "stm_v": mem.stm_v,
         "stm_written": mem.stm_written, "stm_keys": mem.stm_keys}
    for l in range(s.L):
        m = s.merged[l]
        t[f"ltm_kv.{l}"] = pack_kv(s.k[l: l + 1, :, :m], s.v[l: l + 1, :, :m])[0]
        t[f"ltm_keys.{l}"], t[f"ltm_ages.{l}"], t[f"ltm_rf.{l}"] = s.keys[l, :m], s.ages[l, :m], s.rf[l, :m]
    if s.n_pending:
        t["pend_kv"] = torch.stack([pack_kv(s.k[l: l + 1, :, s.merged[l]: s.valid[l]],
                                            s.v[l: l + 1, :, s.merged[l]: s.valid[l]])[0] for l in range(s.L)])
        t["pend_keys"], t["pend_ages"] = mem.state.pend_keys, mem.state.pend_ages
    return {k: v.contiguous().clone() for k, v in t.items()}


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as h:
        return json.loads(h.metadata()[META])


def test_small_pieces_round_trip_bit_exact(eng, tmp_path, monkeypatch):
    kv_row = 2 * 2 * 16 * 4  # k|v of one row in the tiny preset: Hkv 2, Dh 16, fp32
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 3 * kv_row)  # 3 rows per re-laid-out piece (and per read)
    sizes, real = [], snapshot._emit
    monkeypatch.setattr(snapshot, "_emit", lambda fh, t: sizes.append(t.numel() * t.element_size()) or real(fh, t))
    f = eng.save_memory(tmp_path / "m.safetensors")
    assert max(sizes) == eng.host_memory.state.stm.numel() * 4  # whole STM tensors go out as they are (no copy) ...
    assert sizes.count(3 * kv_row) > 10  # ... LTM / pending K/V rows in 3-row re-laid-out pieces
    saved = eng.host_memory.clone()
    got = Engine(tiny_model(ltm_rf=[1.0, 2.0]), backend="torch")
    got.load_memory(f)
    assert got.host_memory.equal(saved)


def test_format_v1_compatible_both_ways(eng, tmp_path):
    mem = eng.host_memory
    new = eng.save_memory(tmp_path / "new.safetensors")
    want = _old_style_tensors(mem)
    have = load_file(str(new))
    assert have.keys() == want.keys()
    assert all(torch.equal(have[k], want[k]) and have[k].dtype == want[k].dtype for k in want)
    # A file written by the pre-streaming code (safetensors save_file of whole tensors) loads bit-exactly.
    old = tmp_path / "old.safetensors"
    save_file(want, str(old), metadata={META: json.dumps(_meta(new))})
    other = Engine(tiny_model(ltm_rf=[1.0, 2.0]), backend="torch")
    other.load_memory(old)
    assert other.host_memory.equal(mem)


def test_loaded_memory_owns_its_buffers(eng, tmp_path):
    f = eng.save_memory(tmp_path / "m.safetensors")
    saved = eng.host_memory.clone()
    eng.load_memory(f)
    size = f.stat().st_size
    with open(f, "r+b") as fh:  # rewrite the data in place (not via rename): a mapping would see this
        fh.seek(size // 3)
        fh.write(b"\xff" * (size - size // 3))
    assert eng.host_memory.equal(saved)
    eng.memorize(chunks(1, seed=3)[0], progress=False)  # and it keeps working


def test_truncating_or_overwriting_the_file_after_load_changes_nothing(eng, tmp_path):
    # A memory map of the file would raise SIGBUS after the truncation and see the new bytes after `cp`.
    f = eng.save_memory(tmp_path / "m.safetensors")
    keep = tmp_path / "keep.safetensors"
    shutil.copyfile(f, keep)
    saved = eng.host_memory.clone()
    eng.memorize(chunks(1, seed=3, lengths=(24,))[0], progress=False)
    other = eng.save_memory(tmp_path / "other.safetensors")
    eng.load_memory(f)
    ino = f.stat().st_ino
    os.truncate(f, 0)
    assert eng.host_memory.equal(saved)
    shutil.copyfile(other, f)  # `cp other.safetensors m.safetensors`: the same file, rewritten in place
    assert f.stat().st_ino == ino and f.read_bytes() == other.read_bytes()
    assert eng.host_memory.equal(saved)
    ref = Engine(tiny_model(ltm_rf=[1.0, 2.0]), backend="torch")
    ref.load_memory(keep)
    for e in (eng, ref):  # and the loaded memory keeps working, as the untouched copy does
        e.memorize(chunks(1, seed=4, lengths=(24,))[0], progress=False)
    assert eng.host_memory.equal(ref.host_memory)
    assert torch.equal(eng.generate_ids([5, 6, 7], max_new_tokens=6), ref.generate_ids([5, 6, 7], max_new_tokens=6))


def test_rewrite_in_place_during_load_is_refused(eng, tmp_path, monkeypatch):
    f = eng.save_memory(tmp_path / "m.safetensors")
    os.utime(f, ns=(10**18, 10**18))  # an older file (the rewrite below must change its mtime)
    eng.memorize(chunks(1, seed=3, lengths=(24,))[0], progress=False)
    live = eng.host_memory.clone()
    real, calls = snapshot._Reader.into, []

    def into(self, name, dst, first=0):
        if not calls:  # another process rewrites the file in place while the load reads it
            calls.append(name)
            data = bytearray(f.read_bytes())
            data[-256:] = bytes(255 - b for b in data[-256:])
            with open(f, "r+b") as fh:
                fh.write(data)
        return real(self, name, dst, first)

    monkeypatch.setattr(snapshot._Reader, "into", into)
    with pytest.raises(SnapshotError, match="was modified while it was read"):
        eng.load_memory(f, keep_current_until_loaded=True)
    assert calls and eng.host_memory.equal(live)


def test_a_directory_is_not_a_snapshot(eng, tmp_path):
    before = eng.host_memory.clone()
    with pytest.raises(SnapshotError, match="is a directory, not a memory snapshot file"):
        eng.load_memory(tmp_path)
    assert eng.host_memory.equal(before)


def test_memoryllm_round_trip(tmp_path):
    e = Engine(tiny_model("tiny-memoryllm"), backend="torch", seed=2)
    for ids in chunks(3):
        e.memorize(ids, progress=False)
    f = e.save_memory(tmp_path / "m.safetensors")
    saved = e.host_memory.clone()
    e.memorize(chunks(1, seed=4)[0], progress=False)
    e.load_memory(f)
    assert e.host_memory.equal(saved) and e.host_memory.store is None


def _rewrite(eng, tmp_path, name, tensors=None, meta=None, raw_meta=None):
    src = eng.save_memory(tmp_path / "src.safetensors")
    t = _old_style_tensors(eng.host_memory) if tensors is None else tensors
    m = _meta(src)
    if meta:
        m.update(meta)
    out = tmp_path / name
    save_file(t, str(out), metadata={META: raw_meta if raw_meta is not None else json.dumps(m)})
    return out


@pytest.mark.parametrize("case, match", [
    ("shape", r"tensor 'ltm_keys.1' has shape \[48, 15\], the model needs \[48, 16\]"),
    ("dtype", r"tensor 'stm_ages' has dtype torch.float32, expected torch.float64"),
    ("missing", r"missing tensor 'pend_ages'"),
    ("kv_dtype", r"tensor 'ltm_kv.0' has dtype torch.float64"),
    ("pend_rows", r"tensor 'pend_keys' has shape \[2, 7, 16\], the model needs \[2, 8, 16\]"),
    ("bad_json", r"metadata 'mplus_deploy.memory' is not valid JSON"),
    ("rng_b64", r"metadata field 'rng_state' is not base64"),
    ("rng_len", r"metadata field 'rng_state' holds 3 bytes"),
    ("update_step", r"metadata field 'update_step' is -8"),
    ("initialized", r"metadata field 'initialized' is 'yes'"),
    ("age_dtype", r"metadata field 'ltm_age_dtype'"),
    ("layers", r"metadata field 'num_ltm_layers' is 3"),
    ("no_ltm_layers", r"metadata field 'num_ltm_layers' is 0, the model has 2 LTM layers"),
    ("kv_width", r"tensor 'ltm_kv.0' has shape \[24, 60\], the model needs \[S, 64\]"),
    ("ages_len", r"tensor 'ltm_ages.1' has shape \[47\], the model needs \[48\]"),
    ("stm_k", r"tensor 'stm_k' has shape \[2, 2, 32, 8\], the model needs \[2, 2, 32, 16\]"),
    ("weights_id_type", r"metadata field 'weights_id' is 5, expected a string"),
])
def test_bad_snapshots_are_refused_naming_the_field(eng, tmp_path, case, match):
    t = _old_style_tensors(eng.host_memory)
    kw = {}
    if case == "shape":
        t["ltm_keys.1"] = t["ltm_keys.1"][:, :15].contiguous()
    elif case == "dtype":
        t["stm_ages"] = t["stm_ages"].float()
    elif case == "missing":
        del t["pend_ages"]
    elif case == "kv_dtype":
        t["ltm_kv.0"] = t["ltm_kv.0"].double()
    elif case == "pend_rows":
        t["pend_keys"] = t["pend_keys"][:, :7].contiguous()
    elif case == "bad_json":
        kw["raw_meta"] = '{"format": "mplus-deploy-memory", '
    elif case == "rng_b64":
        kw["meta"] = {"rng_state": "not base64!"}
    elif case == "rng_len":
        kw["meta"] = {"rng_state": base64.b64encode(b"abc").decode()}
    elif case == "update_step":
        kw["meta"] = {"update_step": -8}
    elif case == "initialized":
        kw["meta"] = {"initialized": "yes"}
    elif case == "age_dtype":
        kw["meta"] = {"ltm_age_dtype": ["int8", "float64"]}
    elif case == "layers":
        kw["meta"] = {"num_ltm_layers": 3}
    elif case == "no_ltm_layers":
        kw["meta"] = {"num_ltm_layers": 0}
    elif case == "kv_width":
        t["ltm_kv.0"] = t["ltm_kv.0"][:, :60].contiguous()
    elif case == "ages_len":
        t["ltm_ages.1"] = t["ltm_ages.1"][:47].contiguous()
    elif case == "stm_k":
        t["stm_k"] = t["stm_k"][..., :8].contiguous()
    elif case == "weights_id_type":
        kw["meta"] = {"weights_id": 5}
    f = _rewrite(eng, tmp_path, f"{case}.safetensors", tensors=t, **kw)
    before = eng.host_memory.clone()
    live = eng.host_memory
    with pytest.raises(SnapshotError, match=match):
        eng.load_memory(f)
    assert eng.host_memory is live and live.equal(before)


def test_damaged_files_are_refused(eng, tmp_path):
    f = eng.save_memory(tmp_path / "m.safetensors")
    data = f.read_bytes()
    before = eng.host_memory.clone()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(SnapshotError, match="truncated"):
        eng.load_memory(cut)
    hlen = int.from_bytes(data[:8], "little")
    bad = tmp_path / "badheader.safetensors"
    bad.write_bytes(data[:8] + b"x" + data[9:])
    with pytest.raises(SnapshotError, match="header is not valid JSON"):
        eng.load_memory(bad)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(SnapshotError, match="not a readable"):
        eng.load_memory(short)
    assert eng.host_memory.equal(before)


def test_inspect_validates_without_reading(eng, tmp_path):
    f = eng.save_memory(tmp_path / "m.safetensors")
    plan = snapshot.inspect(f, eng.config)
    assert plan.merged == [24, 48] and plan.n_pending == 8


def test_keys_of_another_float_dtype_are_converted_in_pieces(eng, tmp_path, monkeypatch):
    # Pre-store snapshots kept the checkpoint's key dtype for merged rows; the store holds keys in the
    # memory dtype, converted while reading (bounded pieces).
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 40)
    t = _old_style_tensors(eng.host_memory)
    for l in range(2):
        t[f"ltm_keys.{l}"] = t[f"ltm_keys.{l}"].double()
    f = _rewrite(eng, tmp_path, "f64keys.safetensors", tensors=t)
    saved = eng.host_memory.clone()
    eng.load_memory(f)
    assert eng.host_memory.equal(saved) and eng.host_memory.store.keys.dtype == torch.float32


def test_bf16_memory_updates_merges_and_round_trips(tmp_path):
    from mplus_deploy.model import MPlus, preset

    cfg = preset("tiny")
    m = MPlus.from_config(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    L, d, H, D, dr = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.dh, cfg.selector_hidden_dim
    w = torch.randn(L, d, 2 * H * D + dr, generator=g) / d ** 0.5

    def project(rows):  # a bf16 memory_project
        out = torch.bmm(rows.float(), w).to(torch.bfloat16)
        n = rows.shape[1]
        kv = out[..., : 2 * H * D].reshape(L, n, 2, H, D)
        return out[..., 2 * H * D:], kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    hm = from_hidden(cfg, m.memory, project)
    merges = sum(_write(hm, torch.randn(L, cfg.K, d, generator=g), project) for _ in range(7))
    assert merges == 2
    f = hm.prefill_feeds()
    assert {f[k].dtype for k in ("stm_k", "stm_v", "ltm_k", "ltm_v", "ltm_keys")} == {torch.bfloat16}
    assert f["ltm_ages"].dtype == torch.int64 and hm.state.ltm_rf[0].dtype == torch.float64
    p = snapshot.save(hm, tmp_path / "bf16.safetensors")
    back = snapshot.load(p, cfg)
    assert back.equal(hm) and back.store.dtype == torch.bfloat16
