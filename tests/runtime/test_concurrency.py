"""Issue 15 §3: sessions under concurrent use. Calls on one session are serialized (its re-entrant lock),
separate sessions run in parallel, the shared initial memory is built once; ``Engine.close()`` refuses
later calls with a clear message.

Every check compares against the same calls made serially (fixed seeds, random non-zero inputs). On a
shared session the interleaving of the threads is free, so the test is built so that any serial order gives
the same memory: every thread memorizes the same multi-chunk input (chunks that differ from each other, so
interleaving two calls at update granularity would change the result), and generation never writes memory.
"""
import threading

import pytest
import torch

from mplus_deploy.runtime import Engine
from mplus_deploy.runtime.engine import EngineClosed

pytest.importorskip("onnxruntime")

THREADS = 8
ROUNDS = 2  # shared-session memorize calls per thread
CHUNK = 16  # 48 tokens -> 3 updates (one merge with F=3) per memorize call


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed))


SHARED_TEXT = _ids(11, 3 * CHUNK)
PROMPT = _ids(12, 6)


def _gen(s, prompt=PROMPT) -> list[int]:
    return s.generate_ids(prompt, max_new_tokens=8, stop_at_eos=False).tolist()


def _own_program(s, w: int, tmp_path, shared=None, log=None) -> dict:
    """What thread ``w`` does on its own session (and, interleaved, on the shared one)."""
    out = {"gen": [], "stats": []}
    for r in range(ROUNDS):
        out["stats"].append(s.memorize(_ids(100 + 10 * w + r, 20 + 7 * w + 5 * r), chunk_size=CHUNK, progress=False))
        if shared is not None:
            log["mem"].append(shared.memorize(SHARED_TEXT, chunk_size=CHUNK, progress=False))
        out["gen"].append(_gen(s, _ids(200 + w, 4 + w)))
        if shared is not None:
            log["gen"].append(_gen(shared))
            log["text"].append("".join(shared.generate(PROMPT.tolist(), max_new_tokens=5, stream=bool(w % 2))))
    f = s.save_memory(tmp_path / f"w{w}.safetensors")
    out["saved"] = s.host_memory.clone()
    s.reset_memory()
    out["reset_gen"] = _gen(s)
    out["loaded"] = s.load_memory(f)
    out["final_gen"] = _gen(s)
    return out


def _run_threads(fn, n=THREADS):
    errors, barrier = [], threading.Barrier(n)

    def body(w):
        try:
            barrier.wait()
            fn(w)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    ts = [threading.Thread(target=body, args=(w,)) for w in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return Engine(tiny_artifact, seed=3, threads=1)


@pytest.mark.filterwarnings("ignore:memorizing a chunk")  # the separate sessions' inputs end in short chunks
def test_threads_on_shared_and_separate_sessions_equal_serial(engine, tmp_path):
    # ---- serial reference
    ser_dir = tmp_path / "serial"
    ser_dir.mkdir()
    serial = [_own_program(engine.session(seed=40 + w), w, ser_dir) for w in range(THREADS)]
    ref = engine.session(seed=7)
    ref_mem, ref_gen = [], [_gen(ref)]
    ref_text = [ref.generate(PROMPT.tolist(), max_new_tokens=5)]
    for _ in range(THREADS * ROUNDS):
        ref_mem.append(ref.memorize(SHARED_TEXT, chunk_size=CHUNK, progress=False))
        ref_gen.append(_gen(ref))
        ref_text.append(ref.generate(PROMPT.tolist(), max_new_tokens=5))
    assert len({tuple(g) for g in ref_gen}) > 1  # the memory really steers generation
    assert max(max(st["ltm_rows"]) for st in ref_mem) > min(min(st["ltm_rows"]) for st in ref_mem)  # merges/evictions

    # ---- the same, 8 threads at once
    shared = engine.session(seed=7)
    own = {w: engine.session(seed=40 + w) for w in range(THREADS)}
    log = {"mem": [], "gen": [], "text": []}
    got = {}
    con_dir = tmp_path / "threads"
    con_dir.mkdir()
    _run_threads(lambda w: got.__setitem__(w, _own_program(own[w], w, con_dir, shared, log)))

    # separate sessions: exactly their serial results
    for w in range(THREADS):
        a, b = got[w], serial[w]
        assert a["stats"] == b["stats"] and a["gen"] == b["gen"], w
        assert a["saved"].equal(b["saved"]) and a["loaded"] == b["loaded"], w
        assert a["reset_gen"] == b["reset_gen"] == ref_gen[0] and a["final_gen"] == b["final_gen"], w
        assert own[w].host_memory.equal(b["saved"]), w
    # shared session: the calls ran one at a time, in some order
    assert shared.host_memory.equal(ref.host_memory)

    def key(st):
        return st["update_step"], st["pending_rows"], tuple(st["ltm_rows"]), st["version"]

    assert sorted(map(key, log["mem"])) == sorted(map(key, ref_mem))  # each call saw the previous ones complete
    assert len(log["gen"]) == THREADS * ROUNDS
    assert all(g in ref_gen for g in log["gen"])  # each generation read one complete memory state
    assert all(t in ref_text for t in log["text"])
    assert _gen(shared) == ref_gen[-1]


def test_initial_memory_is_built_once_under_concurrent_session_creation(tiny_artifact, monkeypatch):
    from mplus_deploy.runtime import engine as engine_mod

    e = Engine(tiny_artifact, threads=1)
    expected = [e.session(seed=w).host_memory for w in range(THREADS)]
    core = e._core
    core._initial = None  # as before the first session
    builds, real = [], engine_mod._Core._build_initial
    gate = threading.Event()

    def slow_build(self):
        builds.append(threading.get_ident())
        gate.wait(0.2)  # keep the build open so that the other threads arrive while it runs
        return real(self)

    monkeypatch.setattr(engine_mod._Core, "_build_initial", slow_build)
    sessions = {}
    _run_threads(lambda w: sessions.__setitem__(w, e.session(seed=w)))
    assert len(builds) == 1
    for w in range(THREADS):
        assert sessions[w].host_memory.equal(expected[w]), w
    # every session got its own copy: writing one changes no other, nor the shared initial memory
    sessions[0].memorize(_ids(5, 48), chunk_size=CHUNK, progress=False)
    assert sessions[1].host_memory.equal(expected[1]) and e.session(seed=0).host_memory.equal(expected[0])


def test_reentrant_lock_allows_nested_calls(tiny_artifact):
    e = Engine(tiny_artifact, seed=1, threads=1)
    with e._lock:  # a caller (or a method) already holding the session's lock can call it again
        stats = e.memorize(_ids(6, 48), chunk_size=CHUNK, progress=False)
        assert e.memory == stats and len(_gen(e)) == 8


def test_calls_after_close_say_the_engine_is_closed(tiny_artifact, tmp_path):
    e = Engine(tiny_artifact, seed=1, threads=1)
    s = e.session(seed=2)
    s.memorize(_ids(7, 48), chunk_size=CHUNK, progress=False)
    stream = e.generate(PROMPT.tolist(), max_new_tokens=5, stream=True)
    first = next(stream)
    e.close()
    msg = r"this Engine is closed .*create a new Engine"
    with pytest.raises(EngineClosed, match="generate \\(stream\\): " + msg):
        list(stream)  # a stream started before close() stops at its next step
    assert first
    calls = {"generate": lambda x: x.generate("Where is the cat?", max_new_tokens=3),
             "generate_ids": lambda x: x.generate_ids(PROMPT, max_new_tokens=3),
             "memorize": lambda x: x.memorize(_ids(8, 20), progress=False),
             "reset_memory": lambda x: x.reset_memory()}
    for who in (e, s):
        for name, call in calls.items():
            with pytest.raises(EngineClosed, match=f"^{name}: " + msg):
                call(who)
    with pytest.raises(EngineClosed, match="^session: " + msg):
        e.session()
    assert "activate()" not in str(pytest.raises(RuntimeError, e.generate_ids, PROMPT).value)
    # the host memory is still the caller's: readable and saveable; close() again is a no-op
    assert s.memory["update_step"] != e.memory["update_step"] or s.memory["ltm_rows"] != e.memory["ltm_rows"]
    assert s.save_memory(tmp_path / "after_close.safetensors").exists()
    e.close()
