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


def memorized(model, mem: MemoryState, context: torch.Tensor, generator: torch.Generator):
    """(memory after one differentiable update with ``context``, the delta [L, K, d]). ``mem`` is not written;
    the returned memory shares its LTM (read-only) and has its own drop RNG state (``generator``)."""
    cfg = model.config
    delta = F_.update_forward.__wrapped__(model, context, F_.memory_tail(mem))
    m = mem.clone()
    m.generator = generator
    keep, _ = m.draw_drops()
    li = torch.arange(cfg.num_hidden_layers)[:, None]
    m.stm = torch.cat([mem.stm[li, keep].to(delta.dtype), delta], dim=1)
    m.touch()
    return m, delta


def answer_loss(model, mem, prompt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``target`` after ``prompt``, prefilled over memory ``mem`` (direct path)."""
    ids = torch.cat([prompt, target[:-1]])
    logits, _ = F_.prefill.__wrapped__(model, mem, ids, fast=False)
    return F.cross_entropy(logits[prompt.numel() - 1:].float(), target)


def retrieval_loss(model, mem, prompt: torch.Tensor, rows: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """BCE over ``rows`` [L, n, d] (hidden memory rows) of each layer's mean-sigmoid score for the prompt's query
    (layer inputs from a plain forward of the prompt, no gradient): ``positive`` [n] bool marks the rows the fact
    wrote. Trains ``query_proj`` / ``key_proj`` (spec §6.1)."""
    with torch.no_grad():
        h, hs = model.model.embed_tokens(prompt), []
        cos, sin = model.rope_tables(torch.arange(prompt.numel()), h.dtype)
        for l in range(model.config.num_hidden_layers):
            hs.append(h)
            h, _, _ = F_.block_direct(model, l, h, 0, cos, sin, ADAPTER_GENERATE)
    losses = []
    for l, layer in enumerate(model.model.layers):
        q = layer.self_attn.query_proj(layer.input_layernorm(hs[l]))
        k = layer.self_attn.key_proj(layer.input_layernorm(rows[l]))
        score = torch.sigmoid(q @ k.T).mean(0).clamp(1e-6, 1 - 1e-6)
        losses.append(F.binary_cross_entropy(score, positive.float()))
    return torch.stack(losses).mean()
