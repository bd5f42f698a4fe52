"""One store directory shared by several ``MemoryStore``s (the replicas of ``mplus-serve --ray``): an id's lock
excludes the other store, a resident session is reloaded when the other store committed, and orphan files are
removed only by a store that has the directory to itself. Two stores in one process behave as two processes
here: each opens its own lock files, and ``flock`` locks belong to open files."""
import pytest

from mplus_deploy.runtime import Engine
from mplus_deploy.serve.store import MemoryStore

TEXT_A = "The harbour master of Velmora keeps a ledger bound in green sealskin."
TEXT_B = "Every spring the ledger is read aloud on the pier at dawn."


@pytest.fixture
def engine(serve_art):
    eng = Engine(serve_art, seed=0)
    yield eng
    eng.close()


def _memorize(store: MemoryStore, mid: str, text: str) -> dict:
    with store.lock(mid):
        s = store.session(mid)
        s.memorize(text)
        return store.commit(mid, s)


def test_resident_session_follows_the_other_stores_commits(engine, tmp_path):
    a, b = MemoryStore(engine, tmp_path), MemoryStore(engine, tmp_path)
    _memorize(a, "u", TEXT_A)
    with b.lock("u"):
        assert b.session("u").memory == a.session("u").memory  # b loads a's commit
    _memorize(b, "u", TEXT_B)  # a still holds its own (now stale) resident session of "u"
    ref = engine.session(seed=0)
    ref.memorize(TEXT_A)
    ref.memorize(TEXT_B)
    with a.lock("u"):
        assert a.session("u").memory == ref.memory  # reloaded: b's update is not lost
    row = _memorize(a, "u", TEXT_A)
    assert row["version"] == 3 and row["updates"] == 3
    with b.lock("u"):  # deleted by a, then b's resident copy must not come back
        assert b.delete("u")
    with a.lock("u"):
        assert a.session("u").memory == engine.session(seed=0).memory
    a.close()
    b.close()


def test_an_ids_lock_excludes_the_other_store(engine, tmp_path):
    a, b = MemoryStore(engine, tmp_path), MemoryStore(engine, tmp_path)
    lk = a.lock("u")
    with lk:
        with lk:  # re-entrant in its own process
            assert not b.lock("u").acquire(blocking=False)
        assert not b.lock("u").acquire(blocking=False)
        assert b.lock("v").acquire(blocking=False)  # other ids are free
        b.lock("v").release()
    assert b.lock("u").acquire(blocking=False)
    b.lock("u").release()
    a.close()
    b.close()


def test_orphans_are_removed_only_by_a_store_alone(engine, tmp_path):
    a = MemoryStore(engine, tmp_path)
    _memorize(a, "u", TEXT_A)
    orphan = a.snapshots / "f00d-7.safetensors"  # as another process's commit in progress would look
    orphan.write_bytes(b"in progress")
    b = MemoryStore(engine, tmp_path)  # a is open: b must not touch it
    assert orphan.exists()
    b.close()
    a.close()
    c = MemoryStore(engine, tmp_path)  # alone: a crash's leftover, removed
    assert not orphan.exists()
    with c.lock("u"):
        ref = engine.session(seed=0)
        ref.memorize(TEXT_A)
        assert c.session("u").memory == ref.memory  # the committed file stays
    c.close()
