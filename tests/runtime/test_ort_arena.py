"""OrtRunner's shared-arena shrink budget: a shrinkable graph shrinks when the process grew by more than
``arena_keep_mib`` since the last shrink, never for decode, and every run with ``arena_keep_mib=0``."""
import pytest

from mplus_deploy.artifact import load_manifest
from mplus_deploy.runtime.backends import onnxruntime_runner as R

MiB = 2**20


def _runner(art, keep):
    r = R.OrtRunner(art, load_manifest(art, verify=False), graphs=("prefill", "decode"), arena_keep_mib=keep)
    r.activate()
    return r


def _decisions(runner, monkeypatch, steps):
    """[(graph, rss after the previous run in MiB)] -> [did the run shrink]."""
    out = []
    for graph, rss in steps:
        monkeypatch.setattr(R, "rss_bytes", lambda rss=rss: rss * MiB)
        ro = runner._shrink_options(graph)
        out.append(ro is not None)
        if ro is not None:
            runner._arena_base = R.rss_bytes()  # what infer_impl records after a shrinking run
    return out


def test_budget(tiny_artifact, monkeypatch):
    r = _runner(tiny_artifact, 256)
    steps = [("prefill", 500), ("prefill", 600), ("decode", 2000), ("prefill", 757), ("prefill", 700),
             ("prefill", 950), ("prefill", 957)]
    # first run shrinks (no base yet); +100 MiB keeps; decode never; +257 over base 500 shrinks (base 757);
    # RSS fell to 700 (base follows it down); +250 over 700 keeps; +257 over 700 shrinks
    assert _decisions(r, monkeypatch, steps) == [True, False, False, True, False, False, True]
    r.deactivate()


def test_zero_budget_shrinks_every_run(tiny_artifact, monkeypatch):
    r = _runner(tiny_artifact, 0)
    assert _decisions(r, monkeypatch, [("prefill", 500), ("prefill", 501), ("decode", 600)]) == [True, True, False]
    r.deactivate()


def test_unknown_rss_shrinks(tiny_artifact, monkeypatch):
    r = _runner(tiny_artifact, 256)
    r._arena_base = 100 * MiB
    monkeypatch.setattr(R, "rss_bytes", lambda: None)
    assert r._shrink_options("prefill") is not None
    r.deactivate()


def test_negative_budget_refused(tiny_artifact):
    with pytest.raises(ValueError, match="arena_keep_mib must be >= 0"):
        R.OrtRunner(tiny_artifact, load_manifest(tiny_artifact, verify=False), arena_keep_mib=-1)


def test_prepack_default_and_refusal(tiny_artifact):
    """The per-token graph in use keeps weight prepacking by default on a small artifact (decode_batch's B-row
    GEMMs pack unprepacked weights at every call); ``prepack=()`` turns it off; unknown graphs are refused."""
    man = load_manifest(tiny_artifact, verify=False)
    assert R.OrtRunner(tiny_artifact, man).prepack == ("decode_batch",)
    assert R.OrtRunner(tiny_artifact, man, graphs=("prefill", "decode")).prepack == ("decode",)
    assert R.OrtRunner(tiny_artifact, man, prepack=()).prepack == ()
    with pytest.raises(ValueError, match="prepack names unknown graphs"):
        R.OrtRunner(tiny_artifact, man, prepack=("decoder",))


def test_prepack_changes_no_number(tiny_artifact):
    import torch

    from mplus_deploy.runtime import Engine

    prompt = torch.tensor([3, 17, 5, 9, 11, 2], dtype=torch.int64)
    got = []
    for prepack in (None, ()):
        with Engine(tiny_artifact, seed=0, max_batch=4, prepack=prepack) as eng:
            assert eng.describe()["prepack"] == ([] if prepack == () else ["decode_batch"])
            assert torch.equal(eng.generate_ids(prompt, max_new_tokens=8),
                               Engine(tiny_artifact, seed=0, prepack=prepack).generate_ids(prompt, max_new_tokens=8))
            got.append(eng.generate_ids(prompt, max_new_tokens=8))
    assert torch.equal(got[0], got[1])
