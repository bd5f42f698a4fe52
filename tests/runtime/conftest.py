import pytest
import torch

from mplus_deploy.model import MPlus, preset
from mplus_deploy.model.layers import ADAPTER_GENERATE


def tiny_model(kind: str = "tiny", seed: int = 0, ltm_rf=None) -> MPlus:
    """Tiny preset (K=8, N=32, K0=16, F=3). ``ltm_rf`` per layer sets the checkpoint LTM rf so that
    evictions happen within a few merges (and differently per layer)."""
    m = MPlus.from_config(preset(kind), seed=seed)
    if ltm_rf is not None:
        for l, rf in enumerate(ltm_rf):
            m.memory.ltm_rf[l] = torch.full_like(m.memory.ltm_rf[l], float(rf))
        m.memory.touch()
    return m


def reference_kv(model: MPlus, rows: torch.Tensor, l: int):
    """W_dec pre-RoPE K/V of hidden rows [n, d] at layer l, [Hkv, n, Dh] each (MemoryKV's math)."""
    layer = model.model.layers[l]
    return layer.self_attn.kv(layer.input_layernorm(rows.to(model.dtype)), ADAPTER_GENERATE)


def chunks(n: int, seed: int = 1, vocab: int = 256, lengths=(40, 8, 5, 20, 32, 17, 3, 64, 9, 30, 24, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=g) for i in range(n)]


@pytest.fixture
def make_tiny():
    return tiny_model


def char_tokenizer():
    """A 256-id character-level tokenizer for the tiny presets (ids 0..2 special, printable ASCII after)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable[:95]:
        vocab.setdefault(c, len(vocab))
    for i in range(len(vocab), 256):
        vocab[f"<x{i}>"] = i
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
