"""Knowledge-retention data: made-up facts no real-world knowledge can answer, distractor text, and user sets.

``builtin_facts(n, seed)``: ``n`` facts generated from templates and nonsense names (seeded, offline; the same
``seed`` gives the same facts). Each is a short paragraph holding one fact (``context``), a cloze-style
``question`` a base language model continues with the answer, and the ``answers`` that count as a hit.
``load_jsonl(path)``: a user set, one ``{"context": str, "question": str, "answers": [str, ...]}`` per line
(SQuAD / NQ style, as the paper uses). ``distractor_text()``: the package's own English prose (calibration
and demo text), unrelated to every fact, cut into chunks by the protocol.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from mplus_deploy.util.io import jsonl_objects

DATA = Path(__file__).resolve().parent.parent / "data"
_ONSETS = ["br", "qu", "v", "th", "z", "m", "k", "dr", "sl", "gw", "f", "t", "p", "l", "n", "h", "c", "j"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou", "y"]
_CODAS = ["n", "r", "l", "sk", "th", "m", "x", "nd", "rk", "s", "", ""]
_COLORS = ["blue", "green", "red", "amber", "violet", "silver", "golden", "grey"]
_ANIMALS = ["parrot", "cat", "goat", "owl", "hound", "tortoise", "raven", "pony"]
_FILLER = ["The weather that year was mild, and the roads were busy with traders.",
           "Most people in the valley worked the fields or kept bees.",
           "Nobody wrote much down in those days, so the story was passed on by word of mouth.",
           "The nearest town was two days away on foot."]

TEMPLATES = [  # (fact sentence, question prefix, answer key)
    ("{A} kept a {color} {animal} named {B}.", "{A} kept a {color} {animal} named", "B"),
    ("The old bridge at {P} was built by a mason called {A}.", "The old bridge at {P} was built by a mason called", "A"),
    ("The password to the vault of {P} is {W}.", "The password to the vault of {P} is", "W"),
    ("{A} was born in the mountain village of {P}.", "{A} was born in the mountain village of", "P"),
    ("The ship {S} was captained by {A} for thirty years.", "The ship {S} was captained by", "A"),
    ("In {P}, the festival of {W} is held every autumn.", "In {P}, the festival held every autumn is called", "W"),
]


@dataclass(frozen=True)
class Fact:
    context: str
    question: str
    answers: tuple[str, ...]


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def builtin_facts(n: int = 24, seed: int = 0) -> list[Fact]:
    rng = random.Random(seed)
    out, used = [], set()
    while len(out) < n:
        tpl, q, key = TEMPLATES[len(out) % len(TEMPLATES)]
        v = {"A": f"{_name(rng, 2)} {_name(rng, 2)}", "B": _name(rng, 2), "P": _name(rng, 3), "W": _name(rng, 3),
             "S": _name(rng, 2), "color": rng.choice(_COLORS), "animal": rng.choice(_ANIMALS)}
        if v[key] in used:
            continue
        used.add(v[key])
        lead, tail = rng.sample(_FILLER, 2)
        out.append(Fact(f"{lead} {tpl.format(**v)} {tail}", q.format(**v), (v[key],)))
    return out


def load_jsonl(path) -> list[Fact]:
    """A user set: one JSON object per line with ``context`` (str), ``question`` (str), ``answers`` (list of str)."""
    facts = []
    for i, o in jsonl_objects(path):
        ok = (isinstance(o, dict) and isinstance(o.get("context"), str) and o["context"].strip()
              and isinstance(o.get("question"), str) and o["question"].strip() and isinstance(o.get("answers"), list)
              and o["answers"] and all(isinstance(a, str) and a.strip() for a in o["answers"]))
        if not ok:
            raise ValueError(f"{path}:{i}: expected {{\"context\": str, \"question\": str, \"answers\": [str, ...]}} "
                             "with non-empty strings")
        facts.append(Fact(o["context"], o["question"], tuple(o["answers"])))
    if not facts:
        raise ValueError(f"{path}: no facts (one JSON object per line)")
    return facts


def distractor_text() -> str:
    """Unrelated English prose shipped with the package (about 20 kB; the protocol cycles through it)."""
    parts = [(DATA / "calib_builtin.txt").read_text(), (DATA / "demo_memory.txt").read_text(),
             (DATA.parent / "calibration" / "heldout_eval.txt").read_text()]
    return "\n\n".join(p.strip() for p in parts)
