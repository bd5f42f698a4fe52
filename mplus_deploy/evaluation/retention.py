"""The knowledge-retention protocol of the M+ paper, on a ``runtime.Engine`` (docs/evaluation.md).

Per fact, on a fresh session (the artifact's initial memory, the given drop seed): memorize the context, then
distractor chunks one at a time; after the context and after each count N in ``distractors`` (ascending) ask
the question: greedy generation of ``max_new_tokens`` tokens from the question alone; an *exact hit* when one of
the answers appears (case-insensitive) in that text. Asking never writes memory, so one pass over the
distractors gives the whole curve of a fact. Distractor chunk i of fact f is the ``chunk_size`` tokens of the
distractor text starting at a fact-dependent offset (cyclic): the same for every backend and mode.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .facts import Fact, distractor_text


@dataclass
class Settings:
    distractors: tuple[int, ...] = (0, 2, 5, 10)
    chunk_size: int = 512
    max_new_tokens: int = 8
    seed: int = 0


@dataclass
class Result:
    settings: Settings
    facts: int
    hits: dict = field(default_factory=dict)  # N -> hits
    rate: dict = field(default_factory=dict)  # N -> hit rate
    samples: list = field(default_factory=list)  # per fact: question, answers, {N: generated text}
    seconds: float = 0.0
    engine: dict = field(default_factory=dict)


def hit(text: str, answers) -> bool:
    t = text.lower()
    return any(a.strip().lower() in t for a in answers if a.strip())


def check(settings: Settings) -> None:
    d = settings.distractors
    if not d or any(n < 0 for n in d) or list(d) != sorted(set(d)):
        raise ValueError(f"distractor counts must be distinct, ascending and >= 0, got {list(d)}")
    if settings.chunk_size <= 0 or settings.max_new_tokens <= 0:
        raise ValueError("chunk_size and max_new_tokens must be > 0")


def run(engine, facts: list[Fact], settings: Settings, progress: bool = True, log=None) -> Result:
    check(settings)
    codec = engine.codec
    pool = codec.encode_memory(distractor_text())
    chunk = min(settings.chunk_size, engine.config.max_chunk)
    res = Result(settings, len(facts), hits={n: 0 for n in settings.distractors})
    t0 = time.perf_counter()
    bar = tqdm(facts, desc="retention", unit="fact", disable=not progress)
    for i, f in enumerate(bar):
        s = engine.session(seed=settings.seed)
        with warnings.catch_warnings():  # a short context is the protocol, not a mistake
            warnings.filterwarnings("ignore", message="memorizing a chunk of", category=UserWarning)
            s.memorize(f.context, chunk_size=chunk, progress=False)
            answers, done = {}, 0
            start = (i * 7919) % max(1, pool.numel())
            for n in settings.distractors:
                while done < n:
                    a = (start + done * chunk) % pool.numel()
                    ids = torch.cat([pool[a:], pool[:a]])[:chunk] if a + chunk > pool.numel() else pool[a:a + chunk]
                    s.memorize(ids, chunk_size=chunk, progress=False)
                    done += 1
                text = s.generate(f.question, settings.max_new_tokens, stop_at_eos=False)
                answers[n] = text
                res.hits[n] += hit(text, f.answers)
        res.samples.append({"question": f.question, "answers": list(f.answers), "generated": answers})
        if log and (i + 1) % max(1, len(facts) // 4) == 0:
            log(f"retention: {i + 1}/{len(facts)} facts, hits so far " +
                ", ".join(f"N={n}: {res.hits[n]}" for n in settings.distractors))
    res.rate = {n: res.hits[n] / max(1, len(facts)) for n in settings.distractors}
    res.seconds = time.perf_counter() - t0
    res.engine = engine.describe()
    return res


# ------------------------------------------------------------------------------------ reports
def to_json(results: dict[str, Result]) -> str:
    return json.dumps({k: {**asdict(r), "settings": asdict(r.settings)} for k, r in results.items()}, indent=2,
                      default=str)


def to_markdown(results: dict[str, Result]) -> str:
    first = next(iter(results.values()))
    ns = first.settings.distractors
    lines = [f"Exact hit (answer within the first {first.settings.max_new_tokens} greedy tokens), {first.facts} facts, "
             f"distractor chunks of {first.settings.chunk_size} tokens.", "",
             "| variant | " + " | ".join(f"N={n}" for n in ns) + " | seconds |",
             "| --- | " + " | ".join("---" for _ in ns) + " | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r.rate[n]:.0%} ({r.hits[n]}/{r.facts})" for n in ns)
                     + f" | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Result], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ns = list(r.settings.distractors)
        ax.plot(ns, [100 * r.rate[n] for n in ns], marker="o", label=name)
    ax.set_xlabel("distractor chunks memorized after the fact (N)")
    ax.set_ylabel("exact hit (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Knowledge retention")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120, format="png")  # any file name (atomic writes use a temp name)
    plt.close(fig)
