import pytest
import numpy as np
import torch

from mplus_deploy.runtime.backends.onnxruntime_runner import _to_numpy


def test_scalar_feeds_stay_scalar():
    """0-d graph inputs (retriever `layer`, `valid_len`, decode `pos`) must not become shape [1]."""
    a = _to_numpy(torch.tensor(3), np.int64)
    assert a.shape == () and a.dtype == np.int64 and int(a) == 3
    b = _to_numpy(np.float64(2.5), np.float32)
    assert b.shape == () and b.dtype == np.float32
    c = _to_numpy(torch.arange(6).reshape(2, 3).T, np.int64)
    assert c.flags["C_CONTIGUOUS"] and c.tolist() == [[0, 3], [1, 4], [2, 5]]


def test_arena_modes_give_the_same_tokens(tiny_artifact):
    """The shared, shrinking CPU arena (default) changes where ORT's temporaries live, never what is computed."""
    import pytest

    from mplus_deploy.runtime import Engine

    prompt = torch.tensor([3, 17, 5, 9, 11, 2], dtype=torch.int64)
    got = {}
    for arena in ("shared", "session", "off"):
        eng = Engine(tiny_artifact, seed=0, arena=arena)
        assert eng.describe()["arena"] == arena
        got[arena] = eng.generate_ids(prompt, max_new_tokens=6)
        eng.close()
    assert torch.equal(got["shared"], got["session"]) and torch.equal(got["shared"], got["off"])
    assert got["shared"].numel() == 6
    with pytest.raises(ValueError, match="arena must be one of"):
        Engine(tiny_artifact, arena="big")


def test_denormal_flush_and_sleeping_workers_change_no_number(tiny_artifact):
    """``flush_denormals`` and ``spin`` (issue 16) change how fast ORT runs, not the tokens or logits."""
    import torch as _t

    from mplus_deploy.artifact.graph_io import all_rows
    from mplus_deploy.runtime import Engine

    prompt = _t.tensor([3, 17, 5, 9, 11, 2], dtype=_t.int64)
    got = {}
    for i, opts in enumerate(({}, {"flush_denormals": False, "spin": True}, {"spin": False})):
        eng = Engine(tiny_artifact, seed=0, **opts)
        d = eng.describe()
        assert d["flush_denormals"] == opts.get("flush_denormals", True) and d["spin"] == opts.get("spin", "run")
        logits = eng.runner.infer("prefill", {"ids": prompt, "logit_rows": all_rows(prompt), **eng.host_memory.prefill_feeds()})["logits"]
        got[i] = (eng.generate_ids(prompt, max_new_tokens=6), logits)
        eng.close()
    for i in (1, 2):
        assert torch.equal(got[0][0], got[i][0]) and torch.equal(got[0][1], got[i][1])
    with pytest.raises(ValueError, match="spin must be False, True or 'run'"):
        Engine(tiny_artifact, spin="always")
    tiny = _t.tensor([1e-39]) * 1.0  # a denormal: the calling thread is left without flush-to-zero after a run
    assert tiny.item() != 0.0
