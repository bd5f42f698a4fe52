"""Memory snapshots: bit-exact round trip incl. the drop-RNG state, atomic writes, refusals."""
import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from mplus_deploy.runtime import Engine, SnapshotError, snapshot

from .conftest import chunks, tiny_model


@pytest.fixture
def eng():
    e = Engine(tiny_model(ltm_rf=[1.0, 2.0]), backend="torch", seed=9)
    for ids in chunks(4, lengths=(20, 32, 24, 17)):  # 4 updates: one merge (with eviction), 1 pending batch
        e.memorize(ids, progress=False)
    return e


def test_round_trip_bit_exact_and_rng(eng, tmp_path):
    f = eng.save_memory(tmp_path / "m.safetensors")
    saved = eng.host_memory.clone()
    assert eng.memory["pending_rows"] == 8 and eng.memory["ltm_rows"] == [24, 48]
    nxt = chunks(3, seed=2, lengths=(24,))
    for ids in nxt:
        eng.memorize(ids, progress=False)
    after = eng.host_memory.clone()
    eng.load_memory(f)
    assert eng.host_memory.equal(saved)  # every tensor, scalar and the generator state
    for ids in nxt:  # the same drops are drawn again
        eng.memorize(ids, progress=False)
    assert eng.host_memory.equal(after)
    # Loading into another session (fresh engine on the same model) gives the same memory.
    other = Engine(tiny_model(ltm_rf=[1.0, 2.0]), backend="torch")
    other.load_memory(f)
    assert other.host_memory.equal(saved)
    p = [3, 4, 5, 6]
    other_tokens = other.generate_ids(p, max_new_tokens=8)
    eng.load_memory(f)
    assert torch.equal(eng.generate_ids(p, max_new_tokens=8), other_tokens)


def test_snapshot_is_safetensors_with_json_metadata(eng, tmp_path):
    f = eng.save_memory(tmp_path / "m.safetensors")
    with safe_open(str(f), framework="pt") as h:
        meta = json.loads(h.metadata()["mplus_deploy.memory"])
        keys = set(h.keys())
    assert meta["update_step"] == 8 and meta["rng_state"] and meta["config"]["num_tokens"] == 8
    assert {"stm", "stm_k", "stm_v", "stm_keys", "ltm_kv.0", "ltm_keys.1", "pend_kv", "pend_ages"} <= keys
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_failed_write_leaves_old_file_intact(eng, tmp_path, monkeypatch):
    f = eng.save_memory(tmp_path / "m.safetensors")
    old = f.read_bytes()
    eng.memorize(chunks(1, seed=5)[0], progress=False)
    real, calls = snapshot._emit, []

    def broken(fh, t):
        calls.append(1)
        if len(calls) > 3:  # a partial file lands in the temp path, then the disk fills up
            raise OSError("disk full")
        return real(fh, t)

    monkeypatch.setattr(snapshot, "_emit", broken)
    with pytest.raises(OSError, match="disk full"):
        eng.save_memory(f)
    assert f.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_mismatched_snapshot_is_refused(eng, tmp_path):
    f = eng.save_memory(tmp_path / "m.safetensors")
    other = Engine(tiny_model("tiny-memoryllm"), backend="torch")
    before = other.host_memory.clone()
    with pytest.raises(SnapshotError, match="another model config"):
        other.load_memory(f)
    assert other.host_memory.equal(before)
    g = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"stm": torch.zeros(1)}, str(g))
    with pytest.raises(SnapshotError, match="not a memory snapshot"):
        eng.load_memory(g)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SnapshotError, match="not a readable"):
        eng.load_memory(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        eng.load_memory(tmp_path / "missing.safetensors")
