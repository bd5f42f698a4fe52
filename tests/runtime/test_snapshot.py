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


# ---------------------------------------------------------------------------- weights id (issue 15)
def _manifest() -> dict:
    def h(c):  # a fake sha256 digest
        return c * 64

    return {
        "weights_file": "graphs/weights.data",
        "files": {"graphs/weights.data": h("a"), "graphs/decode.onnx": h("b"), "graphs/decode.int4.onnx": h("c"),
                  "graphs/memory_project.int4.onnx": h("d"), "graphs/weights.int4.data": h("e"),
                  "graphs/decode.int8.onnx": h("1"), "graphs/weights.int8.data": h("2")},
        "quantized": {
            "int4": {"graphs": {"decode": {"file": "graphs/decode.int4.onnx"},
                                "memory_project": {"file": "graphs/memory_project.int4.onnx"},
                                "retriever": {"skipped": "no quantizable MatMul"}},
                     "data_file": "graphs/weights.int4.data"},
            "int8": {"graphs": {"decode": {"file": "graphs/decode.int8.onnx"}}, "data_file": "graphs/weights.int8.data"},
        },
    }


def test_weights_id_covers_the_quantized_files():
    import copy

    from mplus_deploy.model import preset
    from mplus_deploy.artifact.source import Source

    cfg, m = preset("tiny"), _manifest()
    src = Source("artifact", cfg, manifest=m)
    assert src.weights_id == "a" * 64  # fp32: the sha256 of graphs/weights.data, as before (old snapshots load)
    i4, i8 = src.weights_id_for("int4"), src.weights_id_for("int8")
    assert i4.startswith("int4:") and i8.startswith("int8:") and len({src.weights_id, i4, i8}) == 3
    src.quantized = "int4"
    assert src.weights_id == i4
    for rel in ("graphs/weights.int4.data", "graphs/memory_project.int4.onnx", "graphs/decode.int4.onnx",
                "graphs/weights.data"):  # every file the int4 graphs run on is part of the int4 id ...
        m2 = copy.deepcopy(m)
        m2["files"][rel] = "9" * 64
        assert Source("artifact", cfg, manifest=m2).weights_id_for("int4") != i4, rel
    for rel in ("graphs/weights.int8.data", "graphs/decode.onnx"):  # ... and only those
        m2 = copy.deepcopy(m)
        m2["files"][rel] = "9" * 64
        assert Source("artifact", cfg, manifest=m2).weights_id_for("int4") == i4, rel
    assert Source("preset", cfg).weights_id is None


def _fake_int4(art, out):
    """``art`` plus an ``int4`` section whose graphs are copies of the fp32 ones (same math, other files):
    only the weights id tells the engines apart."""
    import shutil

    from mplus_deploy.artifact import hash_files

    shutil.copytree(art, out)
    g = out / "graphs"
    sec = {"mode": "int4", "graphs": {}, "data_file": "graphs/weights.int4.data"}
    for name in ("memory_project", "memory_update", "decode"):
        shutil.copyfile(g / f"{name}.onnx", g / f"{name}.int4.onnx")
        sec["graphs"][name] = {"file": f"graphs/{name}.int4.onnx"}
    (g / "weights.int4.data").write_bytes(torch.randn(64, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    m = json.loads((out / "manifest.json").read_text())
    m["quantized"] = {"int4": sec}
    m["files"] = hash_files(out)
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


def test_snapshots_do_not_move_between_fp32_and_quantized_engines(tiny_artifact, tmp_path):
    q = _fake_int4(tiny_artifact, tmp_path / "q")
    ids = chunks(2, seed=4, lengths=(24, 16))
    engines = {}
    for mode in (None, "int4"):
        e = Engine(q, backend="onnxruntime", seed=3, **({"quantized": mode} if mode else {}))
        for x in ids:
            e.memorize(x, progress=False)
        engines[mode] = e
    fp, i4 = engines[None], engines["int4"]
    assert fp.host_memory.equal(i4.host_memory)  # identical math: the id is the only difference
    f_fp, f_q = fp.save_memory(tmp_path / "fp.safetensors"), i4.save_memory(tmp_path / "q.safetensors")
    for e, f in ((i4, f_fp), (fp, f_q)):
        e.memorize(chunks(1, seed=6, lengths=(16,))[0], progress=False)
        before = e.host_memory.clone()
        with pytest.raises(SnapshotError, match="projected with other weights"):
            e.load_memory(f)
        assert e.host_memory.equal(before)
    fp.load_memory(f_fp)
    i4.load_memory(f_q)
    assert fp.host_memory.equal(i4.host_memory)
    # A snapshot of the torch reference on the preset (no weights id: fp32) goes into fp32 engines only.
    ref = Engine(tiny_model(), backend="torch", seed=3)
    for x in ids:
        ref.memorize(x, progress=False)
    f_ref = ref.save_memory(tmp_path / "ref.safetensors")
    with pytest.raises(SnapshotError, match="fp32 weights without an id"):
        i4.load_memory(f_ref)
    fp.load_memory(f_ref)
