"""Interrupted snapshot saves (issue 15): temp files that a killed save left are removed by the next save
into the same folder (only our own names for that target, never one a running save holds); a failed save
never leaves one; SIGKILL at random points always leaves a target that loads as a complete state."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mplus_deploy.model import preset
from mplus_deploy.runtime import Engine, snapshot

from .conftest import chunks, tiny_model

fcntl = pytest.importorskip("fcntl")  # flock: POSIX only (elsewhere stale temp files are left alone)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def eng():
    e = Engine(tiny_model(ltm_rf=[1.0, 2.0]), backend="torch", seed=9)
    for ids in chunks(4, lengths=(20, 32, 24, 17)):
        e.memorize(ids, progress=False)
    return e


def test_next_save_removes_only_our_stale_temps(eng, tmp_path):
    f = tmp_path / "m.safetensors"
    stale = [".m.safetensors.abcd1234.tmp", ".m.safetensors._9xk2l0q.tmp"]  # kill -9 leftovers: unlocked
    foreign = [
        ".other.safetensors.abcd1234.tmp",  # another target's temp file
        ".m.safetensors.abcd12345.tmp",  # not mkstemp's 8 characters
        ".m.safetensors.ABCD1234.tmp",  # not mkstemp's alphabet
        ".m.safetensors.tmp", "m.safetensors.abcd1234.tmp", ".tmp0AvJrf",  # not our pattern
        "notes.txt",
    ]
    for n in stale + foreign:
        (tmp_path / n).write_bytes(os.urandom(64))
    busy = tmp_path / ".m.safetensors.busy0000.tmp"  # a save in progress elsewhere holds its lock
    busy.write_bytes(b"partial")
    fd = os.open(busy, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert [p.name for p in snapshot.temp_files(f)] == sorted(stale + [busy.name])
        eng.save_memory(f)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(foreign + [busy.name, "m.safetensors"])
        assert busy.read_bytes() == b"partial"
    finally:
        os.close(fd)
    eng.save_memory(f)  # the lock is gone: that temp file is stale now
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(foreign + ["m.safetensors"])
    assert snapshot.load(f, eng.config).equal(eng.host_memory)


@pytest.mark.parametrize("where", ["write", "fsync", "rename", "interrupt"])
def test_failed_save_leaves_no_temp_and_the_old_file(eng, tmp_path, monkeypatch, where):
    f = eng.save_memory(tmp_path / "m.safetensors")
    old = f.read_bytes()
    eng.memorize(chunks(1, seed=5, lengths=(24,))[0], progress=False)
    exc = KeyboardInterrupt if where == "interrupt" else OSError

    def boom(*a, **k):
        raise exc(f"injected failure at {where}")

    if where in ("write", "interrupt"):
        real, n = snapshot._emit, []

        def emit(fh, t):
            n.append(1)
            if len(n) == 4:
                boom()
            return real(fh, t)

        monkeypatch.setattr(snapshot, "_emit", emit)
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(exc, match="injected failure"):
        eng.save_memory(f)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"] and f.read_bytes() == old


def test_save_onto_a_directory_is_refused_clearly(eng, tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; give the memory snapshot a file name"):
        eng.save_memory(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_saves_do_not_remove_each_others_temps(eng, tmp_path):
    """Cleanup at the start of a save must skip the temp file another running save holds (threads here;
    flock also separates open files of one process)."""
    f = tmp_path / "m.safetensors"
    mems = [eng.host_memory.clone()]
    for ids in chunks(3, seed=7, lengths=(24,)):
        eng.memorize(ids, progress=False)
        mems.append(eng.host_memory.clone())
    errors = []

    def saver(i):
        try:
            for _ in range(15):
                snapshot.save(mems[i], f)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=saver, args=(i,)) for i in range(len(mems))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    got = snapshot.load(f, eng.config)
    assert sum(got.equal(m) for m in mems) == 1


def test_sigkill_during_saves_always_leaves_a_complete_state(tmp_path):
    """bench/snapshot_faults.py with 20 kills: a forked child saves in a loop and is SIGKILLed at random
    points; after each kill the target loads as the last completed state (or the one whose rename had
    landed), and the next save leaves nothing but the target in the folder."""
    out = tmp_path / "faults.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "snapshot_faults.py"), "--kills", "20", "--seed", "3",
                        "--dir", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=240, env=env, check=False)
    assert out.exists(), r.stdout + r.stderr
    res = json.loads(out.read_text())
    recs = res["records"]
    assert len(recs) == 20 and all(x["killed_by"] == 9 for x in recs)  # SIGKILL, not a crash or an exit
    bad = [x for x in recs if not x["ok"]]
    assert not bad, json.dumps(bad, indent=1)
    assert all(x["error"] is None and x["loaded"] in x["expected"] for x in recs)
    assert sum(x["temps_after"] != [] for x in recs) == 0 and res["files_beside_target"] == []
    # The kills hit saves in progress (a temp file was there to clean) and also landed after completed ones.
    assert sum(x["temps_before"] > 0 for x in recs) >= 4
    assert sum(x["saves_completed"] > 0 for x in recs) >= 2
    assert r.returncode == 0, r.stdout + r.stderr
    # Independently: the final target equals the reference copy of the state the bench saved last.
    cfg = preset("tiny")
    target = Path(res["target"])
    ref = Path(res["reference_dir"]) / f"state{res['last_state']}.safetensors"
    wid = "bench-snapshot-faults"
    got, want = snapshot.load(target, cfg, weights_id=wid), snapshot.load(ref, cfg, weights_id=wid)
    assert got.equal(want)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    others = [snapshot.load(p, cfg, weights_id=wid) for p in sorted(ref.parent.iterdir()) if p != ref]
    assert not any(got.equal(o) for o in others) and torch.count_nonzero(got.state.stm) > 0
