"""Input rules shared by the reference and the runtime (one definition each): token-id validation, the eos
set, the generation window, the empty-LTM check and the trained chunk minimum. The reference (``MPlus``)
and ``runtime.Engine`` both call these; sampling and the decode loop are ``sampling.py``'s."""
from __future__ import annotations

import numpy as np
import torch

MIN_TRAINED_CHUNK = 16  # README: "larger than 16 tokens, the hard minimum when training" (spec §8)


def check_ids(ids, vocab_size: int, what: str) -> torch.Tensor:
    """Any 1-D integer sequence (list, numpy array, LongTensor, or [1, T]) → int64 CPU tensor [T]."""
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{what}: token ids must be integers, got numpy dtype {ids.dtype}; tokenize text first")
        ids = torch.from_numpy(ids.astype(np.int64))
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{what}: expected text or a 1-D sequence of token ids ({e})") from None
    if ids.numel() == 0:
        raise ValueError(f"{what}: empty input; pass at least 1 token")
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise ValueError(f"{what}: token ids must be integers, got dtype {ids.dtype}; tokenize text first")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"{what}: token ids must have shape [T] (batch 1), got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{what}: empty input; pass at least 1 token")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what}: token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size}); "
                         "check that the tokenizer matches the model")
    return ids.to(torch.int64).cpu().contiguous()


def eos_ids(cfg) -> frozenset:
    """The config's end-of-sequence ids (``eos_token_id`` is an int, a list or None) as a set."""
    eos = cfg.eos_token_id
    return frozenset(eos if isinstance(eos, list) else ([eos] if eos is not None else []))


def check_window(cfg, prompt_len: int, max_new_tokens: int) -> None:
    """Prompt + generated tokens must fit the generation window (spec §8)."""
    W = cfg.max_window
    if prompt_len + max_new_tokens > W:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the generation window of {W} "
            "tokens (spec §8); memorize the front of long inputs and keep the prompt short")


def check_ltm(rows_per_layer) -> None:
    """Retrieval needs at least one LTM row in every layer (``rows_per_layer``: merged rows per layer)."""
    for l, n in enumerate(rows_per_layer):
        if int(n) == 0:
            raise ValueError(
                f"layer {l}: the long-term memory is empty, retrieval is undefined (the official code loops "
                "forever, spec §8); load a checkpoint or artifact with an initial LTM, or memorize more text first")


def short_chunk_warning(n_tokens: int, already_warned: bool) -> str | None:
    """The warning for a memory update below the trained minimum, once per memory (None: nothing to say)."""
    if n_tokens >= MIN_TRAINED_CHUNK or already_warned:
        return None
    return (f"memorizing a chunk of {n_tokens} tokens: the model was trained on chunks of >= {MIN_TRAINED_CHUNK} "
            "tokens, memory may be disturbed (README, spec §8)")
