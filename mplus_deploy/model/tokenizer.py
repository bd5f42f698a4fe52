"""Offline tokenizer helpers with the M+ tokenization rules (spec §3.1, §7.1, §8).

- Injected chunks and prompts are tokenized with ``add_special_tokens=False``: the model supplies
  its own per-layer BOS (``bos_embedding``), so a BOS token in the text would be a second, spurious one.
- A chat template that writes ``bos_token`` (Llama-3: ``<|begin_of_text|>``) gets that leading BOS
  stripped, as the official README does (``[:, 1:]``). Templates that spell their first token out
  literally (SmolLM2's ``<|im_start|>`` happens to be its ``bos_token``) keep it: there it is part of
  the chat markup, not a sequence BOS.
- Loading never touches the network (``local_files_only`` + ``HF_HUB_OFFLINE``).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@contextlib.contextmanager
def offline():
    """Force the HF libraries offline for the duration (restores the environment afterwards)."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def has_tokenizer(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(dir_or_pkg: str | os.PathLike, gguf_file: str | None = None):
    """Load a tokenizer from a local directory (``tokenizer.json`` / ``tokenizer_config.json``), or
    from a GGUF file in that directory. Offline only; raises ``FileNotFoundError`` if nothing is there."""
    p = Path(dir_or_pkg)
    if p.is_file() and p.suffix == ".gguf":
        p, gguf_file = p.parent, p.name
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a directory; pass a checkpoint directory with tokenizer.json, or a .gguf file")
    if gguf_file is None and not has_tokenizer(p):
        raise FileNotFoundError(f"{p}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) found")
    from transformers import AutoTokenizer

    with offline():
        try:
            return AutoTokenizer.from_pretrained(str(p), gguf_file=gguf_file, local_files_only=True)
        except Exception:
            if gguf_file is None and (p / "tokenizer.json").exists():
                from transformers import PreTrainedTokenizerFast

                return PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
            raise


def _strip_bos(tok, ids: list[int]) -> list[int]:
    bos = getattr(tok, "bos_token_id", None)
    if ids and bos is not None and ids[0] == bos:
        return ids[1:]
    return ids


def encode_memory(tok, text: str) -> torch.Tensor:
    """Text to inject → LongTensor [T], no special tokens, no leading BOS (spec §3.1)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(_strip_bos(tok, list(ids)), dtype=torch.int64)


def encode_prompt(tok, text: str, chat: bool = False, system: str | None = None) -> torch.Tensor:
    """Prompt → LongTensor [T] (spec §7.1). ``chat=True`` applies the tokenizer's chat template
    (generation prompt added) and strips a template-written BOS."""
    if not chat:
        return encode_memory(tok, text)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return encode_chat(tok, msgs)


def encode_chat(tok, messages: list[dict]) -> torch.Tensor:
    """Chat messages (``[{"role": ..., "content": ...}]``) → LongTensor [T] through the tokenizer's chat
    template with the generation prompt added; a template-written BOS is stripped (the model has its own)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt (completions) instead")
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
    if "bos_token" in (tok.chat_template or ""):
        ids = _strip_bos(tok, ids)
    return torch.tensor(ids, dtype=torch.int64)


def decode(tok, ids, skip_special_tokens: bool = True) -> str:
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
