"""Random official-layout checkpoints at any width, streamed tensor by tensor (issue 13 item 5).

``write_synthetic(out, "mplus-8b", layers=2, ltm_rows=150_000)`` writes exactly the directory
:func:`.checkpoint.load` reads (config.json, model.safetensors or shards + index, the keys of
:func:`.checkpoint.checkpoint_tensors`) without ever building the model: the (name, shape) list comes
from :class:`MPlus` built on the ``meta`` device and each tensor is generated only when the writer
reaches it, so peak RSS is about the largest single tensor in the target dtype (docs/synthetic.md).

Values (random, NOT trained M+ weights): every tensor is a function of (seed, name) only. Its
flattened elements are cut into pieces of ``PIECE`` elements; piece j is drawn in float32 by a
``torch.Generator`` seeded with ``piece_seed(seed, name, j)`` (sha256) and cast to the target dtype.
So any tensor is reproducible on its own and independent of shard layout, dtype-rounding aside.

- Linear weights, embeddings, retriever projectors, ``bos_embedding``, ``new_memory_positional_emb``,
  ``lm_head``: N(0, 0.02) (HF init); RMSNorm weights: N(1, 0.05); LoRA A: U(±1/sqrt(in_features))
  (PEFT's kaiming-uniform); LoRA B: N(0, 0.002), non-zero so the two adapters are not no-ops.
- ``memory`` (STM) and ``ltm.{i}`` rows: N(0, 1), the scale of hidden states.
- ``ltm_keys.{i}`` = key_proj_i(input_layernorm_i(rows)) of the *stored* (dtype-rounded) rows and
  weights, computed in float32 with the model's own modules, in row chunks, then cast.
- ``ltm_ages.{i}``: N+S-1 down to N (distinct, older than every STM row, as presets.demo_model);
  ``ltm_recall_frequencies.{i}``: ``initial_rf_when_moving_stm_to_ltm``; MemoryLLM ``initialized`` = 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, build_meta, MEM_RE
from .config import PRESETS, ConfigError, MPlusConfig, preset
from .layers import RMSNorm, projector
from .safetensors_io import nbytes, parse_size, split_shards, write_safetensors

SCHEME = "mplus-synth/v1"  # bump if the value rules change (recorded in the safetensors metadata)
PIECE = 1 << 22  # elements per independently seeded piece (16 MiB of float32)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "num_tokens", "num_blocks", "selector_hidden_dim", "max_position_embeddings", "head_dim")


# =============================================================================== value rules
def piece_seed(seed: int, name: str, piece: int) -> int:
    """The generator seed of piece ``piece`` of tensor ``name`` (63 bits of sha256)."""
    h = hashlib.sha256(f"{SCHEME}/{int(seed)}/{name}/{int(piece)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def value_rule(name: str, shape: tuple) -> tuple[str, float, float]:
    """("normal", mean, std) or ("uniform", low, high) for a randomly drawn tensor."""
    if name == "memory" or name.startswith("ltm."):
        return ("normal", 0.0, 1.0)
    if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
        return ("normal", 1.0, 0.05)
    if ".lora_A." in name:
        b = 1.0 / float(shape[-1]) ** 0.5
        return ("uniform", -b, b)
    if ".lora_B." in name:
        return ("normal", 0.0, 0.002)
    return ("normal", 0.0, 0.02)


def _stream(name: str, shape: tuple, seed: int, lo: int, hi: int, dest: torch.Tensor, buf: torch.Tensor) -> None:
    """Flat elements [lo, hi) of random tensor ``name`` into ``dest`` (flat, any dtype), piece by piece."""
    numel, (kind, a, b) = math.prod(int(s) for s in shape), value_rule(name, shape)
    g = torch.Generator(device="cpu")
    for j in range(lo // PIECE, -(-hi // PIECE)):
        p0 = j * PIECE
        x = buf[: min(PIECE, numel - p0)]
        g.manual_seed(piece_seed(seed, name, j))
        (x.normal_ if kind == "normal" else x.uniform_)(a, b, generator=g)
        s0, s1 = max(lo, p0), min(hi, p0 + x.numel())
        dest[s0 - lo : s1 - lo].copy_(x[s0 - p0 : s1 - p0])


def _random(name: str, shape: tuple, seed: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    n = out.numel()
    if n:
        _stream(name, shape, seed, 0, n, out.view(-1), torch.empty(min(PIECE, n)))
    return out


def _ltm_keys(cfg: MPlusConfig, i: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """key_proj(input_layernorm(ltm.i)) of layer i from the stored weights / rows, fp32 math in row chunks."""
    d, dr, S = cfg.hidden_size, cfg.selector_hidden_dim, cfg.ltm_initial_size
    pre = f"model.layers.{i}."
    with torch.device("meta"):  # built on meta, filled below: no global-RNG use, no init cost
        norm, proj = RMSNorm(d, cfg.rms_norm_eps), projector(d, dr, cfg.num_selector_layers)
    norm, proj = norm.to_empty(device="cpu"), proj.to_empty(device="cpu")
    with torch.no_grad():
        for p, n in ((norm.weight, "input_layernorm.weight"), (proj[0].weight, "self_attn.key_proj.0.weight"),
                     (proj[2].weight, "self_attn.key_proj.2.weight")):
            p.copy_(_random(pre + n, tuple(p.shape), seed, dtype))  # rounded like the stored weight
        out = torch.empty(S, dr, dtype=dtype)
        R = max(1, PIECE // d)
        rows, buf = torch.empty(min(S, R) * d), torch.empty(min(PIECE, S * d) or 1)
        for r0 in range(0, S, R):
            r1 = min(S, r0 + R)
            x = rows[: (r1 - r0) * d]
            _stream(f"ltm.{i}", (S, d), seed, r0 * d, r1 * d, x, buf)
            x = x.view(r1 - r0, d).to(dtype).float()  # the rows exactly as stored
            out[r0:r1] = proj(norm(x))
    return out


def synthetic_tensor(cfg: MPlusConfig, name: str, shape: tuple, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value ``write_synthetic`` stores under ``name`` (``dtype`` for floats; ages/rf float64)."""
    m = MEM_RE.match(name)
    if m and m.group(1) == "ltm_keys":
        return _ltm_keys(cfg, int(m.group(2)), seed, dtype)
    if m and m.group(1) == "ltm_ages":  # distinct, descending, older than every STM row
        return torch.arange(int(shape[0]) - 1, -1, -1, dtype=torch.float64) + cfg.N
    if m and m.group(1) == "ltm_recall_frequencies":
        return torch.full(tuple(shape), float(cfg.initial_rf_when_moving_stm_to_ltm), dtype=torch.float64)
    if name == "initialized":
        return torch.tensor(1, dtype=torch.uint8)
    return _random(name, tuple(shape), seed, dtype)


# =============================================================================== layout
def synthetic_config(preset_name: str = "mplus-8b", layers: int | None = None, ltm_rows: int | None = None,
                     **overrides) -> MPlusConfig:
    """The preset with ``layers`` / ``ltm_rows`` / field overrides applied; ValueError naming a bad field."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    base = preset(preset_name)
    fields = {f.name for f in dataclasses.fields(MPlusConfig)} - {"extra"}
    kw = dict(overrides)
    for k in kw:
        if k not in fields:
            raise ValueError(f"unknown config field {k!r}; valid fields: {', '.join(sorted(fields))}")
    if layers is not None:
        kw["num_hidden_layers"] = layers
    if ltm_rows is not None:
        kw["ltm_initial_size"] = ltm_rows
    for k, v in kw.items():
        want = type(getattr(base, k))
        if want in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))
                                     or (want is int and not float(v).is_integer())):
            raise ValueError(f"{k}={v!r} must be a{'n integer' if want is int else ' number'}")
        if want is int:
            kw[k] = v = int(v)
        if k == "num_hidden_layers" and v < 1:
            raise ValueError(f"layers (num_hidden_layers)={v} must be >= 1")
        if k == "ltm_initial_size" and v < 1:
            raise ValueError(f"ltm_rows (ltm_initial_size)={v} must be >= 1: retrieval needs a non-empty LTM")
        if k in _POSITIVE and v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{k}={v!r} must be an integer >= 1")
    try:
        cfg = base.replace(**kw)
    except ConfigError as e:
        raise ValueError(f"the overrides {sorted(kw)} give an invalid config: {e}") from None
    if ltm_rows is not None and not cfg.is_mplus:
        raise ValueError(f"ltm_rows={ltm_rows}: {preset_name!r} is a MemoryLLM config, which has no long-term "
                         "memory; drop --ltm-rows or use an M+ preset (mplus-8b, small, tiny)")
    if cfg.is_mplus and cfg.selector_layers is not None and sorted(cfg.selector_layers) != list(range(cfg.num_hidden_layers)):
        raise ValueError(f"selector_layers={cfg.selector_layers}: the synthetic writer needs a retriever on every "
                         "layer (ltm_keys.{i} is stored for each); leave selector_layers unset")
    return cfg


def tensor_specs(cfg: MPlusConfig, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple]]:
    """(name, stored dtype, shape) in :func:`.checkpoint.checkpoint_tensors` order, from a meta-built model."""
    model = build_meta(cfg)
    L, N, d = cfg.num_hidden_layers, cfg.N, cfg.hidden_size
    out = [("memory", dtype, (L, N, d))]
    out += [(n, dtype, tuple(p.shape)) for n, p in model.named_parameters()]  # tied lm_head deduplicated
    if cfg.is_mplus:
        S, dr = cfg.ltm_initial_size, cfg.selector_hidden_dim
        out += [(f"ltm.{i}", dtype, (S, d)) for i in range(L)]
        out += [(f"ltm_keys.{i}", dtype, (S, dr)) for i in range(L)]
        out += [(f"ltm_ages.{i}", torch.float64, (S,)) for i in range(L)]
        out += [(f"ltm_recall_frequencies.{i}", torch.float64, (S,)) for i in range(L)]
    else:
        out.append(("initialized", torch.uint8, ()))
    return out


def _group(name: str) -> str:
    if m := re.match(r"model\.layers\.(\d+)\.", name):
        return f"layer {m.group(1)}"
    if m := MEM_RE.match(name):
        return m.group(1)
    return name.removesuffix(".weight")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# =============================================================================== writer
def write_synthetic(out_dir, preset_name: str = "mplus-8b", layers: int | None = None, ltm_rows: int | None = None,
                    dtype: torch.dtype | str = torch.bfloat16, seed: int = 0, shard_size: int | str = "2GB",
                    overwrite: bool = False, progress: Callable[[str], None] | None = None, **config_overrides) -> Path:
    """Write a random official-layout checkpoint to ``out_dir`` (see module doc); returns the path.

    Refuses a non-empty ``out_dir`` unless ``overwrite`` (then stale weight files are replaced).
    ``progress`` gets one plain line per tensor group. Bad input raises ValueError / FileExistsError."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of bf16, fp16, fp32")
        dtype = DTYPES[dtype]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype {dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    limit = parse_size(shard_size)
    if limit < 1:
        raise ValueError(f"shard_size={shard_size!r} must be positive")
    cfg = synthetic_config(preset_name, layers, ltm_rows, **config_overrides)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose an empty/new directory or pass "
                              "overwrite=True (CLI: --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).unlink(missing_ok=True)  # an interrupted overwrite must not look like a valid checkpoint
    specs = tensor_specs(cfg, dtype)
    total = sum(nbytes(dt, shp) for _, dt, shp in specs)
    groups = list(dict.fromkeys(_group(n) for n, _, _ in specs))
    state = {"group": None, "done": 0, "t0": time.time()}

    def producer(name, dt, shape):
        def make():
            g = _group(name)
            if progress is not None and g != state["group"]:
                progress(f"[{groups.index(g) + 1}/{len(groups)}] {g}: {_size(state['done'])} of {_size(total)} "
                         f"written, {time.time() - state['t0']:.1f}s")
            state["group"] = g
            t = synthetic_tensor(cfg, name, shape, seed, dt)
            state["done"] += nbytes(dt, shape)
            return t
        return make

    entries = [(n, dt, shp, producer(n, dt, shp)) for n, dt, shp in specs]
    shards = split_shards(entries, limit)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    meta = {"format": "pt", "mplus_deploy.synthetic": json.dumps({"scheme": SCHEME, "seed": seed, "preset": preset_name})}
    if cfg.is_mplus:
        meta["mplus_deploy.ltm_age_dtype"] = json.dumps(["int32"] * cfg.num_hidden_layers)
    for fn, sh in zip(names, shards):
        write_safetensors(out / fn, sh, meta)
    from mplus_deploy.util.io import atomic_write_text

    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {e[0]: fn for fn, sh in zip(names, shards) for e in sh}}
        atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    for old in out.iterdir():  # stale weight files of an earlier checkpoint would confuse load
        if old.name not in names and (re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old.name)
                                      or (old.name == INDEX_NAME and len(shards) == 1)):
            old.unlink()
    dataclasses.replace(cfg, torch_dtype=str(dtype).replace("torch.", "")).to_json(out / CONFIG_NAME)  # last
    if progress is not None:
        progress(f"done: {_size(total)} in {len(names)} file(s), {time.time() - state['t0']:.1f}s -> {out}")
    return out


# =============================================================================== CLI
def _parse_set(s: str) -> tuple[str, object]:
    k, eq, v = s.partition("=")
    if not eq or not k:
        raise argparse.ArgumentTypeError(f"--set {s!r}: expected FIELD=VALUE, e.g. --set rope_theta=10000")
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mplus-synth-checkpoint",
        description="Write a random (untrained) official-layout M+ / MemoryLLM checkpoint at real width, "
                    "streamed tensor by tensor (docs/synthetic.md).")
    ap.add_argument("out", help="output directory (must be new or empty unless --overwrite)")
    ap.add_argument("--preset", default="mplus-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="num_hidden_layers (default: the preset's)")
    ap.add_argument("--ltm-rows", type=int, help="LTM rows per layer = ltm_initial_size (M+ only)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default="2GB", help="max bytes per safetensors shard (e.g. 2GB, 500MB)")
    ap.add_argument("--vocab-size", type=int, help="vocab_size override")
    ap.add_argument("--set", dest="sets", action="append", type=_parse_set, default=[], metavar="FIELD=VALUE",
                    help="any other MPlusConfig field (JSON value), repeatable")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    a = ap.parse_args(argv)
    kw = dict(a.sets)
    if a.vocab_size is not None:
        kw["vocab_size"] = a.vocab_size
    say = None if a.quiet else (lambda s: print(f"mplus-synth-checkpoint: {s}", file=sys.stderr, flush=True))
    try:
        write_synthetic(a.out, a.preset, a.layers, a.ltm_rows, a.dtype, a.seed, a.shard_size, a.overwrite, say, **kw)
    except (ValueError, FileExistsError) as e:
        ap.exit(2, f"mplus-synth-checkpoint: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
