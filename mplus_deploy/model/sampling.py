"""Generation rules written once for the reference, the runtime, the CLIs and the server:

- ``SamplingParams``: how many tokens, greedy or temperature → top-k → top-p sampling, the sampling seed and
  whether eos stops (validated on construction);
- ``next_token``: logits → token id, on a dedicated generator (never the drop generator, spec §9);
- ``decode_loop``: the loop itself (first token from prefill's logits, then one ``step`` per token until
  ``max_new_tokens`` or eos). ``MPlus.generate`` and ``runtime.generate.token_stream`` both run it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch

DEFAULT_MAX_NEW_TOKENS = 256  # Engine / CLI / server default (MPlus.generate keeps its own 32)


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What to generate. ``seed`` seeds the sampling generator (None: a fresh random seed per call);
    ``stop_at_eos=False`` generates exactly ``max_new_tokens`` tokens."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self):
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {n!r}")
        check_sampling(self.temperature, self.top_p, self.top_k)

    @classmethod
    def of(cls, params: "SamplingParams | None" = None, max_new_tokens: int | None = None, /, *,
           default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **kw) -> "SamplingParams":
        """What a generate call asked for: ``params`` (a ``SamplingParams``) with any keyword options
        (``top_p=…``) and ``max_new_tokens`` applied over it, or those options alone. Naming a field that
        does not exist is a ValueError that lists the real ones."""
        if max_new_tokens is not None:
            kw["max_new_tokens"] = max_new_tokens
        elif params is None:
            kw.setdefault("max_new_tokens", default_max_new_tokens)
        unknown = set(kw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampling option(s) {sorted(unknown)}; SamplingParams has "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        if params is None:
            return cls(**kw)
        if not isinstance(params, cls):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        return dataclasses.replace(params, **kw) if kw else params

    def generator(self) -> torch.Generator:
        g = torch.Generator(device="cpu")  # sampling never uses the drop generator (spec §9)
        if self.seed is not None:
            g.manual_seed(int(self.seed))
        else:
            g.seed()
        return g

    def pick(self, logits: torch.Tensor, g: torch.Generator) -> int:
        return next_token(logits, self.do_sample, self.temperature, self.top_p, self.top_k, g)


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
               top_k: int = 0, generator: torch.Generator | None = None) -> int:
    """logits [vocab] fp32 → token id."""
    if not do_sample:
        return int(torch.argmax(logits))
    x = logits.float() / temperature
    if top_k and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sx, si = torch.sort(x, descending=True)
        cp = torch.softmax(sx, -1).cumsum(-1)
        remove = cp - torch.softmax(sx, -1) > top_p  # keep the smallest prefix with mass >= top_p
        sx = sx.masked_fill(remove, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, si, sx)
    p = torch.softmax(x, -1)
    return int(torch.multinomial(p, 1, generator=generator))


def decode_loop(first_logits: Callable[[], torch.Tensor], step: Callable[[int], torch.Tensor],
                params: SamplingParams, eos) -> Iterator[int]:
    """New token ids (eos included if hit). ``first_logits()``: the last prompt row's logits (prefill runs
    when the loop starts); ``step(tok)``: the next position's logits after ``tok``."""
    if params.max_new_tokens == 0:
        return
    g = params.generator()
    eos = eos if params.stop_at_eos else ()
    tok = params.pick(first_logits(), g)
    n = 0
    while True:
        yield tok
        n += 1
        if n >= params.max_new_tokens or tok in eos:
            return
        tok = params.pick(step(tok), g)
