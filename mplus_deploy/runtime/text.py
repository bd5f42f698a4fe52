"""Text in and out: the model's tokenizer with the M+ rules (no special tokens, no BOS, spec §3.1/§7.1),
token-id validation, incremental detokenization for streaming, and stop strings."""
from __future__ import annotations

from pathlib import Path

import dataclasses

import torch

from mplus_deploy.model.rules import check_ids  # noqa: F401 (the runtime's import of the one rule)


class TextCodec:
    """Wraps a HF tokenizer (``mplus_deploy.model.tokenizer`` rules). ``None`` → ids only."""

    def __init__(self, tokenizer=None, source: str = ""):
        self.tok, self.source = tokenizer, source

    @classmethod
    def from_dir(cls, d: Path | None) -> "TextCodec":
        if d is None:
            return cls(None)
        from mplus_deploy.model.tokenizer import load_tokenizer

        return cls(load_tokenizer(d), str(d))

    def require(self, what: str):
        if self.tok is None:
            raise ValueError(f"{what}: this model has no tokenizer (no tokenizer/ in the artifact, or a preset "
                             "without one); pass token ids instead of text, or export with a tokenizer")
        return self.tok

    def encode_memory(self, text: str) -> torch.Tensor:
        from mplus_deploy.model.tokenizer import encode_memory

        return encode_memory(self.require("memorize"), text)

    def encode_prompt(self, text: str) -> torch.Tensor:
        from mplus_deploy.model.tokenizer import encode_prompt

        return encode_prompt(self.require("generate"), text)

    def encode_chat(self, messages: list[dict]) -> torch.Tensor:
        from mplus_deploy.model.tokenizer import encode_chat

        return encode_chat(self.require("chat"), messages)

    def decode(self, ids) -> str:
        from mplus_deploy.model.tokenizer import decode

        return decode(self.require("decode"), ids)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One step of a text stream: the new ``text`` (may be empty while a stop string or a multi-byte character
    is still open), the generated ``token`` (None on the final piece) and, on the final piece only,
    ``finish_reason``: "stop" (eos or a stop string) or "length" (``max_new_tokens``)."""

    text: str
    token: int | None = None
    finish_reason: str | None = None


def text_pieces(toks, ts: "TextStream", eos, max_new_tokens: int):
    """``Piece``s of token stream ``toks`` through ``ts``, then one final piece with the held-back tail and why
    generation ended. Tokens after a stop string are not read (the decode loop stops with the stream)."""
    n, last = 0, None
    for t in toks:
        n, last = n + 1, t
        piece = ts.push(t)
        yield Piece(piece, t)
        if ts.done:
            break
    reason = "stop" if ts.done or (last is not None and last in eos) or n < max_new_tokens else "length"
    yield Piece(ts.flush(), None, reason)


class TextStream:
    """Turns a stream of token ids into text pieces; holds back incomplete UTF-8 and any tail that could
    still become a stop string; ``done`` once a stop string appeared (the text is cut before it)."""

    def __init__(self, codec: TextCodec, stop: list[str] | None = None):
        self.codec, self.stop = codec, [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters handed out
        self.text = ""
        self.done = False

    def push(self, tok: int) -> str:
        self.ids.append(int(tok))
        self.text = self.codec.decode(self.ids)
        for s in self.stop:
            i = self.text.find(s)
            if i >= 0:
                self.text, self.done = self.text[:i], True
        return self._take(final=self.done)

    def flush(self) -> str:
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # an incomplete multi-byte character
                end -= 1
            for s in self.stop:  # a suffix that is a proper prefix of a stop string
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:n]):
                        end = min(end, len(self.text[:end]) - n)
                        break
        end = max(end, self.emitted)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece
