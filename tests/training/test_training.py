"""Training the M+ parts (issue 20) on the tiny preset: held-out facts never trained on, the loss falls on what
is trained, only the M+ parts move, runs are reproducible, and the parameter file round-trips."""
import pytest
import torch

from mplus_deploy.evaluation.facts import builtin_facts
from mplus_deploy.training import objective as O
from mplus_deploy.training.data import training_facts
from mplus_deploy.training.loop import TrainConfig, examples, load_into, save, train

from mplus_deploy.util.io import _umask

from ..runtime.conftest import char_tokenizer, tiny_model


def test_training_facts_are_disjoint_from_the_evaluation_facts():
    train_f = training_facts(300, seed=0)
    assert len(train_f) == 300 and training_facts(300, seed=0) == train_f
    held = builtin_facts(200, seed=0)
    answers = {a.lower() for f in held for a in f.answers}
    assert not answers & {a.lower() for f in train_f for a in f.answers}
    assert not {f.question for f in held} & {f.question for f in train_f}


def _cfg(**kw):
    return TrainConfig(**{"steps": 16, "lr": 5e-3, "warmup": 2, "facts": 4, "log_every": 4, **kw})


def _loss(model, ex, seed=123):
    ctx, q, a = ex
    with torch.no_grad():
        mem, _ = O.memorized(model, model.memory, ctx, torch.Generator().manual_seed(seed))
        return float(O.answer_loss(model, mem, q, a))


def test_training_lowers_the_answer_loss_and_moves_only_the_mplus_parts():
    m, tok = tiny_model(), char_tokenizer()
    cfg = _cfg()
    ex = examples(tok, cfg)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    l0 = [_loss(m, e) for e in ex]
    res = train(m, tok, cfg)
    l1 = [_loss(m, e) for e in ex]
    assert sum(l1) < 0.8 * sum(l0), (l0, l1)
    trained = set(res.tensors)
    assert any(".lora_B." in n for n in trained) and "new_memory_positional_emb" in trained
    assert any("query_proj" in n for n in trained) and "bos_embedding" in trained
    for n, p in m.named_parameters():
        if n in trained:
            continue
        assert torch.equal(p, before[n]), n  # the backbone is frozen
    assert not torch.equal(dict(m.named_parameters())["new_memory_positional_emb"], before["new_memory_positional_emb"])
    assert len(res.losses) == 4 and all(v["retrieval"] > 0 for v in res.losses)
    assert not any(p.requires_grad for p in m.parameters())


def test_training_is_reproducible_and_the_file_round_trips(tmp_path):
    tok = char_tokenizer()
    a, b = train(tiny_model(), tok, _cfg(steps=4)), train(tiny_model(), tok, _cfg(steps=4))
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    f = tmp_path / "parts.safetensors"
    save(a, f)
    assert f.stat().st_mode & 0o777 == 0o644 & ~_umask()
    m = tiny_model()
    meta = load_into(m, f)
    params = dict(m.named_parameters())
    assert all(torch.equal(params[k], t) for k, t in a.tensors.items())
    assert '"steps": 4' in meta["config"]
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="not a trained-parts file"):
        load_into(tiny_model(), bad)


def test_mark_trainable_refuses_unknown_parts():
    with pytest.raises(ValueError, match="unknown trainable parts"):
        O.mark_trainable(tiny_model(), ("lora", "backbone"))


def test_distracted_tracks_the_fact_rows_through_drops_and_a_merge():
    """After the fact, distractor updates drop its rows into the pending rows and (past F updates) the LTM; the
    flags ``distracted`` returns mark exactly the pool rows whose values are the fact's delta rows."""
    from mplus_deploy.model import forward as F_

    m = tiny_model()
    cfg = m.config
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, 200, (40,), generator=g)
    mem, delta = O.memorized(m, m.memory, ctx, torch.Generator().manual_seed(1))
    chunks = [torch.randint(3, 200, (30,), generator=g) for _ in range(2 * cfg.update_ltm_frequency)]
    ltm_before = [t.shape[0] for t in mem.ltm]
    flags = O.distracted(m, mem, chunks)
    assert all(t.shape[0] > n for t, n in zip(mem.ltm, ltm_before))  # merges moved pending rows into the LTM
    for l in range(cfg.num_hidden_layers):
        pool = F_.ltm_pool(mem, l).detach()
        assert flags[l].shape[0] == pool.shape[0] and bool(flags[l].any())
        is_delta = (pool[:, None, :] == delta[l].detach()[None]).all(-1).any(-1)
        assert torch.equal(is_delta, flags[l]), l
        in_stm = (mem.stm[l].detach()[:, None, :] == delta[l].detach()[None]).all(-1).any(-1).sum()
        assert int(flags[l].sum()) + int(in_stm) == cfg.K  # every fact row is somewhere, once


def test_checkpoints_hold_the_parts_of_their_step(tmp_path):
    """``save_every``: a checkpoint is the parts after that step (equal to a run stopped there)."""
    tok = char_tokenizer()
    seen = []
    full = train(tiny_model(), tok, _cfg(steps=4, save_every=2), on_checkpoint=seen.append)
    short = train(tiny_model(), tok, _cfg(steps=2))
    assert [r.steps_done for r in seen] == [2] and full.steps_done == 4
    assert all(torch.equal(seen[0].tensors[k], short.tensors[k]) for k in short.tensors)
    assert not all(torch.equal(seen[0].tensors[k], full.tensors[k]) for k in full.tensors)
