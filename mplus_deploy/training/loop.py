"""The seeded training loop for the M+ parts of a frozen-backbone model (issue 20) and the parameter file it writes.

Each step draws one training fact (``data.training_facts``, never an evaluation fact) and, with the memory reset
to the model's initial memory, memorizes it (on a share ``distract_p`` of the steps followed by 1..``max_distract``
updates of other facts' text, so the fact's rows reach the pending rows and the LTM, as in the evaluation's
N > 0) and makes two memorize-then-answer losses on that memory (``objective``):
*answer*: the fact's cloze question → its answer; *recall*: the context's first ``RECALL_PROMPT`` tokens → the
rest of the context; plus, with weight ``retrieval_weight``, the retriever's BCE between the rows the context
wrote and rows of the long-term memory. AdamW, constant learning rate after a linear warm-up, gradient clipping.

The result is a safetensors file of the trained tensors only (a few MB for the demo) with JSON metadata (steps,
seed, options, the loss curve, seconds), written atomically. Same seed, same machine → the same file.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mplus_deploy.model import forward as F_

from . import objective as O
from .compact import FULL_FORMAT
from .data import training_facts

RECALL_PROMPT = 4


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    facts: int = 4000
    retrieval_weight: float = 0.1
    retrieval_negatives: int = 128
    distract_p: float = 0.5  # share of steps that memorize distractor updates after the fact
    max_distract: int = 12  # 1..max_distract updates (10 cross the demo's LTM merge)
    clip: float = 1.0
    parts: tuple = tuple(O.PARTS)
    # fluency (objective.fluency_loss): KL to the frozen backbone on ordinary text read over the step's memory
    fluency_weight: float = 1.0
    fluency_tokens: int = 48  # text tokens per step, the first fluency_prompt of them unscored
    fluency_prompt: int = 16
    # aged memories: a share of the steps start from a memory that has already memorized 1..aged_updates chunks of
    # ordinary text (no gradient; rebuilt with the current parameters every aged_refresh steps), so the adapters
    # learn to read and write a long-used memory (without it the demo's output degenerated after 50 chunks)
    aged_p: float = 0.3
    aged_updates: int = 60
    aged_refresh: int = 50
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints handed to ``train(on_checkpoint=)`` (0: only at the end)


@dataclass
class TrainResult:
    config: TrainConfig
    losses: list = field(default_factory=list)  # per logged step: {"step", "answer", "recall", "retrieval"}
    seconds: float = 0.0
    tensors: dict = field(default_factory=dict)
    steps_done: int = 0
    initial: dict = field(default_factory=dict, repr=False)  # the trained tensors' values before step 1 (compact's base)


def _ids(tok, text: str, special: bool) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=special)["input_ids"], dtype=torch.int64)


def examples(tok, cfg: TrainConfig):
    """(context ids, question ids, answer ids) per training fact, tokenized once."""
    from mplus_deploy.model.tokenizer import encode_memory, encode_prompt

    out = []
    for f in training_facts(cfg.facts, cfg.seed):
        out.append((encode_memory(tok, f.context), encode_prompt(tok, f.question), _ids(tok, " " + f.answers[0], False)))
    return out


def _distractor(data, rng: random.Random, skip: int, n: int) -> torch.Tensor:
    """About ``n`` tokens of other training facts' contexts (never the evaluation's distractor text)."""
    parts, total = [], 0
    while total < n:
        j = rng.randrange(len(data))
        if j != skip:
            parts.append(data[j][0])
            total += data[j][0].numel()
    return torch.cat(parts)[:n]


AGED_DEPTHS = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)  # snapshots of the aged memory, as shares of aged_updates


def text_pool(tok) -> torch.Tensor:
    """Ordinary English shipped with the package for the fluency term and the aged memories: the calibration corpus
    and the demo's memory text (not the calibration's held-out text, which the fluency test memorizes)."""
    from mplus_deploy.evaluation.facts import DATA
    from mplus_deploy.model.tokenizer import encode_memory

    text = (DATA / "calib_builtin.txt").read_text() + "\n\n" + (DATA / "demo_memory.txt").read_text()
    return encode_memory(tok, text)


def _window(pool: torch.Tensor, rng: random.Random, n: int) -> torch.Tensor:
    a = rng.randrange(max(1, pool.numel() - n))
    return pool[a:a + n] if pool.numel() >= a + n else pool.repeat(-(-n // pool.numel()) + 1)[a:a + n]


@torch.no_grad()
def aged_memories(model, mem0, pool: torch.Tensor, rng: random.Random, gen: torch.Generator, updates: int) -> list:
    """Memories after memorizing 1..``updates`` windows of ``pool`` from ``mem0`` (snapshots at ``AGED_DEPTHS``)."""
    depths = sorted({max(1, round(f * updates)) for f in AGED_DEPTHS})
    m, out = mem0.clone(), []
    m.generator = gen
    for u in range(1, updates + 1):
        delta = F_.update_forward.__wrapped__(model, _window(pool, rng, model.config.max_chunk), F_.memory_tail(m))
        O._write(model, m, delta)
        if u in depths:
            snap = m.clone()
            snap.generator = gen
            out.append(snap)
    return out


def _snapshot(res: TrainResult, params, steps: int, t0: float) -> TrainResult:
    out = TrainResult(res.config, list(res.losses), time.perf_counter() - t0, initial=res.initial)
    out.tensors = {n: p.detach().clone().contiguous() for n, p in params}
    out.steps_done = steps
    return out


def train(model, tok, cfg: TrainConfig, log=None, on_checkpoint=None) -> TrainResult:
    """Train ``model``'s M+ parts in place. ``log``: one line every ``log_every`` steps; ``on_checkpoint(result)``:
    called every ``save_every`` steps with the parts trained so far (e.g. ``save`` them: a long run that is
    interrupted keeps its last checkpoint)."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = O.mark_trainable(model, cfg.parts)
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    data = examples(tok, cfg)
    mem0 = model.memory
    pool = text_pool(tok) if (cfg.fluency_weight or cfg.aged_p) else None
    aged = []
    res, t0, acc = TrainResult(cfg), time.perf_counter(), []
    res.initial = {n: p.detach().clone() for n, p in params}
    model.train(False)
    for step in range(cfg.steps):
        i = rng.randrange(len(data))
        ctx, q, a = data[i]
        if cfg.aged_p and model.config.is_mplus and step % cfg.aged_refresh == 0:
            aged = aged_memories(model, mem0, pool, rng, gen, cfg.aged_updates)
        start = rng.choice(aged) if aged and rng.random() < cfg.aged_p else mem0
        mem, delta = O.memorized(model, start, ctx, gen)
        pool_fact = None
        if model.config.is_mplus and rng.random() < cfg.distract_p:
            chunks = [_distractor(data, rng, i, model.config.max_chunk) for _ in range(rng.randint(1, cfg.max_distract))]
            pool_fact = O.distracted(model, mem, chunks)
        la = O.answer_loss(model, mem, q, a)
        lr_ = O.answer_loss(model, mem, ctx[:RECALL_PROMPT], ctx[RECALL_PROMPT:])
        loss = la + lr_
        lt = torch.zeros(())
        if cfg.retrieval_weight and model.config.is_mplus:
            L = model.config.num_hidden_layers
            if pool_fact is not None:  # the fact's rows among the LTM + pending rows the question retrieves from
                rows, pos = [F_.ltm_pool(mem, l) for l in range(L)], pool_fact
            else:  # the fact's rows (still in the STM) against sampled LTM rows
                neg = [torch.randperm(start.ltm[l].shape[0], generator=gen)[: cfg.retrieval_negatives] for l in range(L)]
                rows = [torch.cat([delta[l], start.ltm[l][neg[l]].float()]) for l in range(L)]
                pos = [torch.arange(r.shape[0]) < delta.shape[1] for r in rows]
            lt = O.retrieval_loss(model, q, rows, pos)
            loss = loss + cfg.retrieval_weight * lt
        lf = torch.zeros(())
        if cfg.fluency_weight:
            lf = O.fluency_loss(model, mem, _window(pool, rng, cfg.fluency_tokens), cfg.fluency_prompt)
            loss = loss + cfg.fluency_weight * lf
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.clip)
        opt.step()
        sched.step()
        acc.append((la.item(), lr_.item(), lt.item(), lf.item()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            m = [sum(x[i] for x in acc) / len(acc) for i in range(4)]
            res.losses.append({"step": step + 1, "answer": m[0], "recall": m[1], "retrieval": m[2], "fluency": m[3]})
            acc = []
            if log:
                dt = time.perf_counter() - t0
                log(f"step {step + 1}/{cfg.steps}: answer {m[0]:.3f}, recall {m[1]:.3f}, retrieval {m[2]:.3f}, "
                    f"fluency {m[3]:.3f} ({dt / (step + 1):.2f} s/step, {dt:.0f} s)")
        if on_checkpoint and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            on_checkpoint(_snapshot(res, params, step + 1, t0))
    for _, p in params:
        p.requires_grad_(False)
    res.seconds = time.perf_counter() - t0
    res.tensors = {n: p.detach().clone().contiguous() for n, p in params}
    res.steps_done = cfg.steps
    return res


def _meta(res: TrainResult) -> dict:
    return {"config": json.dumps(asdict(res.config)), "losses": json.dumps(res.losses),
            "seconds": f"{res.seconds:.1f}", "steps_done": str(res.steps_done), "torch": torch.__version__,
            "format": FULL_FORMAT}


def _write(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save as st_save

    from mplus_deploy.util.io import atomic_write_bytes

    atomic_write_bytes(Path(path), st_save(tensors, metadata=meta), mode=0o644)


def save(res: TrainResult, path: Path) -> None:
    """The trained tensors + metadata as one safetensors file (temp + fsync + rename)."""
    _write(path, res.tensors, _meta(res))


def write_compact(model, res_or_path, path: Path, lora_rank: int = 4, delta_rank: int = 16,
                  dtype: str = "bfloat16", parts=None) -> int:
    """The compact form (``compact.compact``) of a training result or of a full parts file, as deltas against
    ``model`` (the model the parts were trained from, before training), with the training metadata. → tensors."""
    from safetensors import safe_open

    from .compact import compact

    if isinstance(res_or_path, TrainResult):
        tensors, meta = res_or_path.tensors, _meta(res_or_path)
    else:
        with safe_open(str(res_or_path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FULL_FORMAT:
                raise ValueError(f"{res_or_path}: not a full trained-parts file (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    if parts is not None:  # keep only these parts' tensors (the others stay as in ``model``)
        pieces = [x for part in parts for x in O.PARTS[part]]
        tensors = {k: t for k, t in tensors.items() if any(x in k for x in pieces)}
        meta = {**meta, "parts_kept": json.dumps(list(parts))}
    base = {k: p.detach() for k, p in model.named_parameters()}
    if isinstance(res_or_path, TrainResult):
        base = {k: res_or_path.initial.get(k, v) for k, v in base.items()}
    small, extra = compact(tensors, base, lora_rank, delta_rank, dtype)
    _write(path, small, {**meta, **extra})
    return len(small)


def load_into(model, path: Path) -> dict:
    """Copy a ``save``d file's tensors into ``model`` (names and shapes checked first). → its metadata."""
    from safetensors import safe_open

    from .compact import COMPACT_FORMAT, FULL_FORMAT, expand

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") not in (FULL_FORMAT, COMPACT_FORMAT):
            raise ValueError(f"{path}: not a trained-parts file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    have = dict(model.named_parameters())
    if meta["format"] == COMPACT_FORMAT:
        tensors = expand(tensors, {k: p.detach() for k, p in have.items()})
    bad = [k for k, t in tensors.items() if k not in have or tuple(have[k].shape) != tuple(t.shape)]
    if bad:
        raise ValueError(f"{path}: tensors that do not fit this model: {bad[:5]}")
    with torch.no_grad():
        for k, t in tensors.items():
            have[k].copy_(t)
    return meta
