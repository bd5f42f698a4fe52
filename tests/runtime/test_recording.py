"""Engine(wrap=...), RecordingRunner, token_stream(prefilled=...) and OrtRunner(shared=...)."""
import torch

from mplus_deploy.runtime import Engine
from mplus_deploy.runtime.backends.ort_weights import SharedInitializers
from mplus_deploy.runtime.backends.recording import RecordingRunner
from mplus_deploy.model.sampling import SamplingParams
from mplus_deploy.runtime.generate import token_stream
from mplus_deploy.artifact.graph_io import all_rows

from .conftest import chunks


def test_wrap_records_every_graph_call_and_changes_nothing(tiny_artifact):
    plain = Engine(tiny_artifact, backend="onnxruntime", seed=3)
    box = {}
    rec_eng = Engine(tiny_artifact, backend="onnxruntime", seed=3,
                     wrap=lambda r: box.setdefault("rec", RecordingRunner(r, per_graph=2, seed=0)))
    rec = box["rec"]
    assert rec_eng.runner is rec and rec.is_active
    for c in chunks(5):
        plain.memorize(c, progress=False)
        rec_eng.memorize(c, progress=False)
    prompt = torch.tensor([5, 9, 2, 7, 1, 3])
    a, b = plain.generate_ids(prompt, max_new_tokens=6), rec_eng.generate_ids(prompt, max_new_tokens=6)
    assert torch.equal(a, b)
    assert rec.calls["decode"] == 5 and rec.calls["prefill"] == 1 and sum(rec.calls.values()) > 7
    assert all(len(v) == min(2, rec.calls[g]) for g, v in rec.samples.items())
    # a recorded decode feed (its tail was an OrtValue) replays on the plain runner with the same result
    f = rec.samples["decode"][0]
    assert all(isinstance(v, torch.Tensor) for v in f.values())
    x, y = plain.runner.infer("decode", f), rec.inner.infer("decode", f)
    assert torch.equal(x["logits"], y["logits"])
    rec_eng.close()
    plain.close()


def test_reservoir_is_uniform_and_bounded():
    class Echo:
        name, is_active = "echo", True

        def infer(self, graph, feeds, keep=()):
            return {}

        def graphs(self):
            return {"g"}

    rec = RecordingRunner(Echo(), per_graph=10, seed=1)
    rec.is_active = True
    kept = torch.zeros(200)
    for trial in range(40):
        rec.samples.clear()
        rec.calls.clear()
        for i in range(200):
            rec.infer_impl("g", {"i": torch.tensor(i)}, ())
        assert len(rec.samples["g"]) == 10
        for f in rec.samples["g"]:
            kept[int(f["i"])] += 1
    # each call kept with probability 10/200: the first and the last hundred calls about equally often
    assert abs(float(kept[:100].sum() - kept[100:].sum())) < 0.25 * float(kept.sum())


def test_prefilled_stream_equals_a_fresh_one(tiny_artifact):
    eng = Engine(tiny_artifact, backend="onnxruntime", seed=1)
    eng.memorize(chunks(2)[0], progress=False)
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    feeds = eng.host_memory.prefill_feeds()
    out = eng.runner.infer("prefill", {"ids": ids, "logit_rows": all_rows(ids), **feeds})
    assert out["logits"].shape[0] == ids.numel()
    a = list(token_stream(eng.runner, eng.config.prefix_len, feeds, ids, SamplingParams(max_new_tokens=7), prefilled=out))
    b = eng.generate_ids(ids, max_new_tokens=7, stop_at_eos=False).tolist()
    assert a == b and len(a) == 7
    eng.close()


def test_two_engines_share_one_mapping(tiny_artifact):
    shared = SharedInitializers()
    a = Engine(tiny_artifact, backend="onnxruntime", shared=shared)
    n = len(shared)
    assert n > 0
    b = Engine(tiny_artifact, backend="onnxruntime", shared=shared)
    assert len(shared) == n  # the second engine added no mapping of its own
    ids = torch.tensor([1, 2, 3, 4])
    assert torch.equal(a.generate_ids(ids, max_new_tokens=4), b.generate_ids(ids, max_new_tokens=4))
    a.close()
    assert len(shared) == n  # the caller owns it: closing an engine does not clear it
    assert b.generate_ids(ids, max_new_tokens=2).numel() == 2
    b.close()
