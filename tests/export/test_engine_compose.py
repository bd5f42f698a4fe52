"""The exported graphs composed by the runtime (``runtime.Engine`` on onnxruntime: memory_update(_short) → host
drop/write with the same seed → memory_project → prefill → decode loop) reproduce the torch reference, for
M+ with a full LTM and with one shorter than K0 (cyclic retrieval), MemoryLLM, and fp16 graphs."""
import warnings

import torch

from mplus_deploy.build import export_artifact
from mplus_deploy.model import MPlus, preset
from mplus_deploy.runtime import Engine


def _shrink_ltm(mem, n):
    mem.ltm = [t[:n] for t in mem.ltm]
    mem.ltm_keys = [t[:n] for t in mem.ltm_keys]
    mem.ltm_ages = [t[:n] for t in mem.ltm_ages]
    mem.ltm_rf = [t[:n] for t in mem.ltm_rf]
    mem.touch()


def _run(model, eng, chunks, seen, tol=1e-4):
    model.memory.seed(11)
    eng.seed(11)
    g = torch.Generator().manual_seed(5)
    cfg = model.config
    for T in chunks:
        ids = torch.randint(0, cfg.vocab_size, (T,), generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.inject(ids)
            eng.memorize(ids, chunk_size=None, progress=False)
        assert (model.memory.stm - eng.host_memory.state.stm).abs().max() < tol
        prompt = torch.randint(0, cfg.vocab_size, (6,), generator=g)
        a = model.prefill_logits(prompt)
        b = eng.runner.infer("prefill", {"ids": prompt, **eng.host_memory.prefill_feeds()})["logits"]
        assert (a - b).abs().max() <= tol * max(1.0, float(a.abs().max())), float((a - b).abs().max())
        ta = model.generate(prompt, max_new_tokens=8, stop_at_eos=False)
        tb = eng.generate_ids(prompt, max_new_tokens=8, stop_at_eos=False)
        assert ta.tolist() == tb.tolist()
        if cfg.is_mplus:
            S_m = model.memory.ltm[0].shape[0]
            seen.add(("ltm>=K0" if S_m >= cfg.K0 else "ltm<K0", model.memory.n_pending > 0))


def test_engine_mplus_matches_reference(tiny_art):
    out, _ = tiny_art
    model = MPlus.from_config(preset("tiny"))  # same seed as the exported model
    seen: set = set()
    with Engine(out, backend="onnxruntime") as eng:
        _run(model, eng, [20, 5, 8, 40], seen)  # 5 < K: memory_update_short
    assert ("ltm>=K0", True) in seen


def test_engine_mplus_short_ltm_matches_reference(tmp_path):
    """An LTM of 5 rows < K0: retrieval takes rows cyclically (spec §8), in the graphs as in the reference."""
    model = MPlus.from_config(preset("tiny"))
    _shrink_ltm(model.memory, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifact(model, tmp_path / "short", validate=False, source={"preset": "tiny"})
    ref = MPlus.from_config(preset("tiny"))
    _shrink_ltm(ref.memory, 5)
    seen: set = set()
    with Engine(tmp_path / "short", backend="onnxruntime") as eng:
        _run(ref, eng, [20, 5, 8], seen)
    assert ("ltm<K0", True) in seen


def test_engine_memoryllm_matches_reference(mllm_art):
    model = MPlus.from_config(preset("tiny-memoryllm"))
    with Engine(mllm_art, backend="onnxruntime") as eng:
        assert eng.runner.graphs() == {"memory_update", "memory_update_short", "memory_project", "prefill", "decode"}
        _run(model, eng, [12, 3, 33], set())  # 33 > max_chunk=32: two chunks


def test_engine_fp16_close(fp16_art):
    out, report = fp16_art
    assert all(g.validation.ok for g in report.graphs)
    model = MPlus.from_config(preset("tiny"))
    prompt = torch.tensor([3, 1, 4, 1, 5, 9])
    with Engine(out, backend="onnxruntime") as eng:
        b = eng.runner.infer("prefill", {"ids": prompt, **eng.host_memory.prefill_feeds()})["logits"]
    a = model.prefill_logits(prompt)
    assert (a - b.float()).abs().max() <= 3e-2 * max(1.0, float(a.abs().max()))
