"""runtime.memorize: the overlapped memorize loop gives the sequential loop's memory bit for bit, and a failure
mid-document leaves the memory holding exactly the chunks before it."""
import pytest
import torch

from mplus_deploy.runtime import Engine
from mplus_deploy.runtime.backends.base import DelegatingRunner
from mplus_deploy.runtime.memorize import run_updates


def _doc(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed))


def _memorized(art, overlap: bool, ids, chunk: int, wrap=None):
    eng = Engine(art, backend="onnxruntime", seed=0, overlap_memorize=overlap, wrap=wrap)
    eng.memorize(ids, chunk_size=chunk, progress=False)
    return eng


@pytest.mark.parametrize("chunk", [24, 5])  # 24: K-row in-place writes; 5 < K: memory_update_short
def test_overlap_equals_sequential(tiny_artifact, chunk):
    ids = _doc(40 * chunk)  # 40 updates: several LTM merges (update_ltm_frequency 3) and store growth
    a = _memorized(tiny_artifact, False, ids, chunk)
    b = _memorized(tiny_artifact, True, ids, chunk)
    assert a.memory["version"] == b.memory["version"]
    assert a.host_memory.equal(b.host_memory)
    assert b.memory["ltm_rows"] != a.session().memory["ltm_rows"]  # the document did reach the LTM
    prompt = _doc(12, seed=5)
    assert torch.equal(a.generate_ids(prompt, 8, stop_at_eos=False), b.generate_ids(prompt, 8, stop_at_eos=False))


def test_tail_after_is_the_next_tail(tiny_artifact):
    eng = Engine(tiny_artifact, backend="onnxruntime", seed=0)
    mem = eng.host_memory
    eng.memorize(_doc(48), chunk_size=24, progress=False)
    delta = torch.randn(mem.L, eng.config.K, eng.config.hidden_size)
    predicted = mem.tail_after(delta)
    mem.write(delta, eng._core.project(delta))
    assert predicted is not None and torch.equal(predicted, mem.mem_tail())
    assert mem.tail_after(delta[:, :-1]) is None  # not K rows: the next tail must be read after the write


class _FailOn(DelegatingRunner):
    """Raises on the n-th memory_update call."""

    def __init__(self, inner, n: int):
        super().__init__(inner)
        self.n, self.calls = n, 0

    def infer_impl(self, graph, feeds, keep):
        if graph == "memory_update":
            self.calls += 1
            if self.calls == self.n:
                raise RuntimeError("injected memory_update failure")
        return self.inner.infer(graph, feeds, keep)


def test_failure_keeps_the_chunks_before_it(tiny_artifact):
    chunk, fail_at = 24, 7
    ids = _doc(12 * chunk)
    eng = Engine(tiny_artifact, backend="onnxruntime", seed=0, wrap=lambda r: _FailOn(r, fail_at))
    with pytest.raises(RuntimeError, match="injected"):
        eng.memorize(ids, chunk_size=chunk, progress=False)
    ref = _memorized(tiny_artifact, False, ids[: (fail_at - 1) * chunk], chunk)
    assert eng.host_memory.equal(ref.host_memory)


def test_bookkeeping_error_wins(tiny_artifact):
    """A write that fails on the bookkeeping thread is raised by memorize, not lost behind the next graph."""
    eng = Engine(tiny_artifact, backend="onnxruntime", seed=0)
    mem = eng.host_memory
    real, calls = mem.write, []

    def write(delta, projected):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected write failure")
        return real(delta, projected)

    mem.write = write
    with pytest.raises(ValueError, match="injected write failure"):
        run_updates(eng._core, mem, [c for c in _doc(5 * 24).split(24)])
    assert len(calls) == 2
