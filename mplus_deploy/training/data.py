"""Training examples: made-up facts from the evaluation's templates and name generator, drawn from another seed
stream and filtered so that no answer or name of the evaluation facts (``evaluation.facts.builtin_facts`` with the
seeds ``mplus-eval`` uses) ever appears. Deterministic for a seed."""
from __future__ import annotations

import random

from mplus_deploy.evaluation.facts import Fact, builtin_facts

EVAL_SEEDS = range(0, 8)  # seeds whose builtin facts are held out (mplus-eval retention uses seed 0)
EVAL_FACTS_PER_SEED = 200
TRAIN_SEED_BASE = 1_000_003  # training draws facts from seeds TRAIN_SEED_BASE + i


def held_out_words() -> set[str]:
    """Every answer and capitalised word of the held-out evaluation facts (lower case)."""
    words = set()
    for s in EVAL_SEEDS:
        for f in builtin_facts(EVAL_FACTS_PER_SEED, seed=s):
            words.update(a.lower() for a in f.answers)
            words.update(w.strip(".,").lower() for w in f.context.split() if w[:1].isupper())
    return words


def training_facts(n: int, seed: int = 0) -> list[Fact]:
    """``n`` training facts, none sharing an answer or a name with the held-out evaluation facts."""
    banned = held_out_words()
    out, i, rng = [], 0, random.Random(seed)
    while len(out) < n:
        for f in builtin_facts(64, seed=TRAIN_SEED_BASE + 1000 * seed + i):
            names = {w.strip(".,").lower() for w in f.context.split() if w[:1].isupper()}
            if any(a.lower() in banned for a in f.answers) or names & (banned - _COMMON):
                continue
            out.append(f)
        i += 1
    rng.shuffle(out)
    return out[:n]


# capitalised words shared by every fact (sentence starts of the templates and fillers), not names
_COMMON = {"the", "in", "most", "nobody", "a"}
