"""One differentiable memorize-then-answer step (the MemoryLLM objective, spec §3.4 / §7.2), on the reference's
own forward functions (``model.forward.update_forward`` and the direct ``prefill`` path, run with gradients):

1. ``delta = update_forward(model, context, tail = STM[:, -K:])`` (the W_enc adapter, the memory positional
   embedding and the bos embeddings get gradients);
2. ``STM' = cat(STM[keep], delta)`` with the memory's own drop draw (``MemoryState.draw_drops``);
3. the prompt is prefilled over ``[bos, LTM_sel, STM']`` (the W_dec adapter) and the loss is the cross-entropy of
   the target tokens, predicted from memory alone (the context is not in the prompt).

Retrieval indices are discrete (no gradient); the retriever projectors are trained by ``retrieval_loss``: the
query's mean-sigmoid score of the rows a context wrote should beat the other memory rows (binary cross-entropy
on the scores ``retrieval.mean_sigmoid_scores`` ranks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mplus_deploy.model import forward as F_
from mplus_deploy.model.layers import ADAPTER_GENERATE
from mplus_deploy.model.memory import MemoryState

PARTS = {  # parameter-name pieces of each trainable M+ part
    "lora": (".lora_A.", ".lora_B."),
    "memory_embeddings": ("new_memory_positional_emb", "bos_embedding"),
    "retriever": (".self_attn.query_proj.", ".self_attn.key_proj."),  # not encoder_query_proj (unused by inference)
}


def mark_trainable(model, parts=tuple(PARTS)) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then let the named M+ parts learn. → [(name, parameter)] in model order."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {sorted(PARTS)}")
    pieces = [p for part in parts for p in PARTS[part]]
    out, seen = [], set()
    for name, p in model.named_parameters():
        on = any(s in name for s in pieces) and id(p) not in seen
        p.requires_grad_(on)
        if on:
            seen.add(id(p))
            out.append((name, p))
    if not out:
        raise ValueError(f"no parameter matches the parts {list(parts)}")
    return out


def _write(model, m: MemoryState, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One update on ``m`` with the reference's own memory code (``MPlus.write_delta``: drop draw, STM write,
    M+ pending rows and merge), differentiable through the rows it moves. → (keep, drop)."""
    keep, drop = m.draw_drops()
    dropped, dropped_age = m.write_stm(delta, keep, drop)
    if model.config.is_mplus:
        with torch.no_grad():  # retrieval keys only pick rows (discrete); their projector learns in retrieval_loss
            keys = model.retriever_keys(dropped)
        m.append_pending(dropped, keys, dropped_age)
    m.touch()
    return keep, drop


def memorized(model, mem: MemoryState, context: torch.Tensor, generator: torch.Generator):
    """(memory after one differentiable update with ``context``, the delta [L, K, d]). ``mem`` is not written
    (the returned memory is a clone with its own drop RNG state, ``generator``)."""
    delta = F_.update_forward.__wrapped__(model, context, F_.memory_tail(mem))
    m = mem.clone()
    m.generator = generator
    _write(model, m, delta)
    return m, delta


def distracted(model, m: MemoryState, chunks: list[torch.Tensor]) -> torch.Tensor:
    """Memorize ``chunks`` after a fact on ``memorized``'s memory ``m`` (in place; no gradient through the
    chunks' own forward): the fact's rows get dropped to the pending rows and, past ``update_ltm_frequency``
    updates, merged into the LTM, as in the evaluation. → [L, S] bool over each layer's ``ltm_pool`` rows
    (merged then pending): which are the fact's (for ``retrieval_loss``)."""
    cfg = model.config
    L, N, K = cfg.num_hidden_layers, cfg.N, cfg.K
    li = torch.arange(L)[:, None]
    is_fact = torch.zeros(L, N, dtype=torch.bool)
    is_fact[:, N - K:] = True  # memorized() appended the fact's K rows last
    pool_fact = [torch.zeros(m.ltm[l].shape[0] + (0 if m.pend_vals is None else m.pend_vals.shape[1]), dtype=torch.bool)
                 for l in range(L)]
    for c in chunks:
        with torch.no_grad():
            delta = F_.update_forward.__wrapped__(model, c, F_.memory_tail(m).detach())
        n_ltm = [t.shape[0] for t in m.ltm]
        keep, drop = _write(model, m, delta)
        dropped = is_fact[li, drop]
        is_fact = torch.cat([is_fact[li, keep], torch.zeros(L, K, dtype=torch.bool)], dim=1)
        for l in range(L):
            pool_fact[l] = torch.cat([pool_fact[l], dropped[l]])
            if m.pend_vals is None:  # merged: survivors of the LTM + pending rows, in the merge's order
                pool_fact[l] = _survivors(pool_fact[l], n_ltm[l], m.ltm[l].shape[0])
    return pool_fact


def _survivors(flags: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """The fact flags of a layer's pool after a merge that kept ``after`` of its rows. ``decay_and_evict`` evicts
    only old merged rows (rf <= 0.01, oldest first); the rows just merged (the pending ones) always survive, so
    the evicted rows are the first ``len(flags) - after`` ones."""
    return flags[len(flags) - after:] if after < len(flags) else flags


def answer_loss(model, mem, prompt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``target`` after ``prompt``, prefilled over memory ``mem`` (direct path)."""
    ids = torch.cat([prompt, target[:-1]])
    logits, _ = F_.prefill.__wrapped__(model, mem, ids, fast=False)
    return F.cross_entropy(logits[prompt.numel() - 1:].float(), target)


def backbone_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The frozen backbone alone (no adapter, no memory) reading ``[bos, ids]`` → logits [T, vocab] for ``ids``."""
    with torch.no_grad():
        x = torch.cat([torch.tensor([model.config.bos_token_id]), ids])
        h = model.model.embed_tokens(x)
        cos, sin = model.rope_tables(torch.arange(x.numel()), h.dtype)
        for l in range(model.config.num_hidden_layers):
            h, _, _ = F_.block_direct(model, l, h, 0, cos, sin, None)
        return model.logits(h)[1:].float()


def fluency_loss(model, mem, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """KL(backbone || model over memory ``mem``) of the next-token distributions of ordinary text ``ids`` after its
    first ``n_prompt`` tokens: whatever the memory holds, text the memory does not concern reads as the pretrained
    backbone reads it (the distillation term that keeps a long-used memory fluent)."""
    logits, _ = F_.prefill.__wrapped__(model, mem, ids, fast=False)
    student = F.log_softmax(logits[n_prompt - 1:-1].float(), -1)
    teacher = F.log_softmax(backbone_logits(model, ids)[n_prompt - 1:-1], -1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def retrieval_loss(model, prompt: torch.Tensor, rows: list[torch.Tensor], positive: list[torch.Tensor]) -> torch.Tensor:
    """BCE, per layer l, of the prompt query's mean-sigmoid score (spec §6.1) over the hidden memory rows
    ``rows[l]`` [n_l, d] against ``positive[l]`` [n_l] bool (the rows the fact wrote); the layer inputs come from a
    plain forward of the prompt (no gradient). Trains ``query_proj`` / ``key_proj``; layers without rows or
    without a positive row are skipped."""
    with torch.no_grad():
        h, hs = model.model.embed_tokens(prompt), []
        cos, sin = model.rope_tables(torch.arange(prompt.numel()), h.dtype)
        for l in range(model.config.num_hidden_layers):
            hs.append(h)
            h, _, _ = F_.block_direct(model, l, h, 0, cos, sin, ADAPTER_GENERATE)
    losses = []
    for l, layer in enumerate(model.model.layers):
        if rows[l].shape[0] == 0 or not bool(positive[l].any()):
            continue
        q = layer.self_attn.query_proj(layer.input_layernorm(hs[l]))
        k = layer.self_attn.key_proj(layer.input_layernorm(rows[l].detach()))
        score = torch.sigmoid(q @ k.T).mean(0).clamp(1e-6, 1 - 1e-6)
        losses.append(F.binary_cross_entropy(score, positive[l].float()))
    return torch.stack(losses).mean() if losses else torch.zeros(())
