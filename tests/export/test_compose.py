"""Host composition of the exported graphs reproduces the reference: ids → memory_update(_short) → host
drop/write (same seed) → memory_project → prefill → decode loop."""
import warnings

import pytest
import torch

from mplus_deploy.export.compose import GraphComposer
from mplus_deploy.model import MPlus, preset


def _shrink_ltm(mem, n):
    mem.ltm = [t[:n] for t in mem.ltm]
    mem.ltm_keys = [t[:n] for t in mem.ltm_keys]
    mem.ltm_ages = [t[:n] for t in mem.ltm_ages]
    mem.ltm_rf = [t[:n] for t in mem.ltm_rf]
    mem.touch()


def _run(model, comp, chunks, seen):
    model.memory.seed(11)
    comp.mem.seed(11)
    g = torch.Generator().manual_seed(5)
    cfg = model.config
    for T in chunks:
        ids = torch.randint(0, cfg.vocab_size, (T,), generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.inject(ids)
        comp.inject(ids)
        assert (model.memory.stm - comp.mem.stm).abs().max() < 1e-4
        prompt = torch.randint(0, cfg.vocab_size, (6,), generator=g)
        a, b = model.prefill_logits(prompt), comp.prefill_logits(prompt)
        assert (a - b).abs().max() <= 1e-4, float((a - b).abs().max())
        ta = model.generate(prompt, max_new_tokens=8, stop_at_eos=False)
        tb = comp.generate(prompt, max_new_tokens=8, stop_at_eos=False)
        assert ta.tolist() == tb.tolist()
        if cfg.is_mplus:
            S_m = model.memory.ltm[0].shape[0]
            seen.add(("ltm>=K0" if S_m >= cfg.K0 else "ltm<K0", model.memory.n_pending > 0))


@pytest.mark.parametrize("ltm_rows", [None, 5], ids=["ltm>=K0", "ltm<K0-cyclic"])
def test_compose_mplus_matches_reference(tiny_art, ltm_rows):
    out, _ = tiny_art
    model = MPlus.from_config(preset("tiny"))  # same seed as the exported model
    if ltm_rows is not None:
        _shrink_ltm(model.memory, ltm_rows)
    comp = GraphComposer(out, memory=model.memory.clone())
    seen: set = set()
    _run(model, comp, [20, 5, 8, 40], seen)  # 5 < K: memory_update_short
    if ltm_rows is None:
        assert ("ltm>=K0", True) in seen
    else:
        assert ("ltm<K0", True) in seen


def test_compose_from_artifact_memory(tiny_art):
    """Without an explicit memory the composer starts from memory/initial.safetensors."""
    out, _ = tiny_art
    model = MPlus.from_config(preset("tiny"))
    comp = GraphComposer(out)
    prompt = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    assert (model.prefill_logits(prompt) - comp.prefill_logits(prompt)).abs().max() <= 1e-4
    assert comp.generate(prompt, 6, stop_at_eos=False).tolist() == model.generate(prompt, 6, stop_at_eos=False).tolist()


def test_compose_memoryllm_matches_reference(mllm_art):
    model = MPlus.from_config(preset("tiny-memoryllm"))
    comp = GraphComposer(mllm_art, memory=model.memory.clone())
    assert set(comp.sessions) == {"memory_update", "memory_update_short", "memory_project", "prefill", "decode"}
    _run(model, comp, [12, 3, 33], set())  # 33 > max_chunk=32: two chunks


def test_compose_fp16_close(fp16_art):
    out, report = fp16_art
    assert all(g.validation.ok for g in report.graphs)
    model = MPlus.from_config(preset("tiny"))
    comp = GraphComposer(out, memory=model.memory.clone())
    prompt = torch.tensor([3, 1, 4, 1, 5, 9])
    a, b = model.prefill_logits(prompt), comp.prefill_logits(prompt)
    assert (a - b).abs().max() <= 3e-2 * max(1.0, float(a.abs().max()))
