"""The torch backend's fast path (``fast=True``: SDPA, the static decode cache of ``torch_static``, the memory kept
per version by ``torch_memory``) against the reference path (``fast=False``), on the CPU (the CUDA-graph capture
itself runs in tests/runtime/test_gpu.py on a GPU)."""
import threading
import warnings

import pytest
import torch

from mplus_deploy.runtime import Engine
from mplus_deploy.runtime.backends import torch_static

from .conftest import chunks, tiny_model


def _engine(kind, fast, **kw):
    eng = Engine(tiny_model(kind), backend="torch", seed=11, fast=fast, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ids in chunks(12):
            eng.memorize(ids, progress=False)
    return eng


@pytest.fixture(params=["tiny", "tiny-memoryllm"])
def pair(request):
    return _engine(request.param, False), _engine(request.param, True)


def test_fast_prefill_equals_reference(pair):
    ref, fast = pair
    assert fast.describe()["fast"] and not ref.describe()["fast"]
    torch.testing.assert_close(fast.host_memory.state.stm, ref.host_memory.state.stm, rtol=1e-5, atol=1e-5)
    p = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4))
    f = {"ids": p, **ref.host_memory.prefill_feeds(), "logit_rows": torch.arange(10)}
    a, b = ref.runner.infer("prefill", f), fast.runner.infer("prefill", f)
    if "retrieved" in a:
        assert torch.equal(a["retrieved"], b["retrieved"])
    for k in ("logits", "present_k", "present_v"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)


def test_static_decode_crosses_buckets_and_grows(pair, monkeypatch):
    """Small buckets and slots: the step changes attention length every 8 rows and the slot is regrown twice."""
    ref, fast = pair
    monkeypatch.setattr(torch_static, "GROW", 4)
    fast.runner._static.bucket = 8
    p = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4))
    want = ref.generate_ids(p, max_new_tokens=40, stop_at_eos=False)
    assert torch.equal(fast.generate_ids(p, max_new_tokens=40, stop_at_eos=False), want)
    assert torch.equal(fast.generate_ids(p, max_new_tokens=40, stop_at_eos=False), want)  # a pooled, used slot


def test_decode_logits_equal_reference_step_by_step():
    ref, fast = _engine("tiny", False), _engine("tiny", True)
    p = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(9))
    f = {"ids": p, **ref.host_memory.prefill_feeds(), "logit_rows": torch.arange(7)}
    P = ref.config.prefix_len
    ca = ref.runner.start_decode(ref.runner.infer("prefill", f, keep=ref.runner.prefill_keep), P)
    cb = fast.runner.start_decode(fast.runner.infer("prefill", f, keep=fast.runner.prefill_keep), P)
    g = torch.Generator().manual_seed(2)
    for i in range(12):
        tok = torch.randint(0, 256, (1,), generator=g)  # random tokens, not greedy: any row may matter
        step = lambda r, c: r.infer("decode", {"ids": tok, "pos": torch.tensor(P + 7 + i), **c.feeds()}, keep=c.keep)  # noqa: E731
        oa, ob = step(ref.runner, ca), step(fast.runner, cb)
        torch.testing.assert_close(ob["logits"], oa["logits"], rtol=1e-5, atol=1e-5)
        ca.advance(oa)
        cb.advance(ob)
    with pytest.raises(ValueError, match="does not follow"):  # a handle is advanced by its step: no replays
        fast.runner.infer("decode", {"ids": tok, "pos": torch.tensor(P + 7), **cb.feeds()}, keep=cb.keep)


def test_concurrent_generations_get_their_own_slots():
    ref, fast = _engine("tiny", False), _engine("tiny", True)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 13)]
    sessions = [fast.session(seed=11) for _ in prompts]
    got = [None] * 3

    def run(i):
        got[i] = sessions[i].generate_ids(prompts[i], max_new_tokens=20, stop_at_eos=False)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    # the sessions start from the initial memory, the reference engine from its memorized one: compare per session
    ref_sessions = [ref.session(seed=11) for _ in prompts]
    for i, s in enumerate(ref_sessions):
        assert torch.equal(got[i], s.generate_ids(prompts[i], max_new_tokens=20, stop_at_eos=False))
    assert len(fast.runner._static._free) >= 1  # the slots came back to the pool


def test_device_memory_is_built_once_per_version():
    fast = _engine("tiny", True)
    mems = fast.runner._memories
    f1 = fast.host_memory.prefill_feeds()
    assert fast.host_memory.prefill_feeds()["memory_id"] == f1["memory_id"]  # unchanged memory: same id
    assert mems.get(f1) is mems.get(f1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast.memorize(chunks(1, seed=5)[0], progress=False)
    f2 = fast.host_memory.prefill_feeds()
    assert f2["memory_id"] != f1["memory_id"] and mems.get(f2) is not mems.get(f1)


def test_fast_is_the_cuda_default_and_cpu_keeps_the_reference():
    assert Engine(tiny_model("tiny"), backend="torch").describe()["fast"] is False
    with pytest.raises(ValueError, match="dtype must be"):
        Engine(tiny_model("tiny"), backend="torch", dtype="float16")


def test_gpu_engine_script_runs_its_code_paths_on_the_cpu():
    """bench/gpu_engine.py (the issue-17 device script) at the `small` preset on the CPU: every stage runs."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "bench/gpu_engine.py", "--smoke"], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for what in ("decode fast", "decode fast+fp8", "decode eager", "TTFT T=64", "retrieval T=64", "memorize"):
        assert f"| {what}" in p.stdout, what
    assert "ERROR" not in p.stdout
