"""`MPlusConfig`: backbone + memory hyper-parameters, read from / written to an official-style
``config.json`` (spec §10.2), plus the named presets.

Field names follow the official `LlamaConfig` + M+ extras exactly, so an official ``config.json``
round-trips. Unknown fields are kept in ``extra`` and warned about once (issue 3).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DEFAULT_LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "inference_mode": True,
    "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_ARCHITECTURES = {"MPlus": "mplus", "MemoryLLM": "memoryllm"}


class ConfigError(ValueError):
    """A config.json that cannot describe an M+/MemoryLLM model; the message says what to fix."""


# fields that fix the weight shapes: a config.json without them is refused by name (the 8B defaults would
# only surface as dozens of shape mismatches against the checkpoint)
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_tokens", "num_blocks")

_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,), "list": (list,)}


def _check_types(kwargs: dict) -> None:
    """Each field's JSON value against its annotation (``num_hidden_layers: "two"`` or ``num_tokens: 8.5``
    otherwise fail later as a raw TypeError, or silently); whole-number floats for int fields become ints."""
    errs = []
    hints = {f.name: f.type for f in dataclasses.fields(MPlusConfig)}
    for k, v in list(kwargs.items()):
        kinds = [t.strip() for t in str(hints.get(k, "")).split("|")]
        if v is None and "None" in kinds:
            continue
        allowed = tuple(c for t in kinds for c in _TYPES.get(t, ()))
        if not allowed:
            continue
        if "int" in kinds and isinstance(v, float) and v.is_integer() and "float" not in kinds:
            kwargs[k] = int(v)
            continue
        if isinstance(v, bool) and "bool" not in kinds:
            ok = False
        else:
            ok = isinstance(v, allowed)
        if not ok:
            want = " or ".join({"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string",
                                "dict": "an object", "list": "a list", "None": "null"}.get(t, t) for t in kinds)
            errs.append(f"{k}: {json.dumps(v)} is not {want}")
    lora = kwargs.get("lora_config")
    if isinstance(lora, dict):
        for k in ("r", "lora_alpha"):
            if k in lora and (isinstance(lora[k], bool) or not isinstance(lora[k], (int, float)) or lora[k] <= 0):
                errs.append(f"lora_config.{k}: {json.dumps(lora[k])} is not a positive number")
    if errs:
        raise ConfigError("invalid config.json field(s):\n  - " + "\n  - ".join(errs)
                          + "\n(fix the values in config.json: sizes and counts are whole numbers)")


@dataclass
class MPlusConfig:
    # --- backbone (LlamaConfig field names) ---
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: int | list | None = 128001
    pad_token_id: int | None = None
    torch_dtype: str | None = "bfloat16"
    architectures: list = field(default_factory=lambda: ["MPlus"])
    model_type: str = "llama"
    # --- memory (official M+ field names, spec §1.2, §1.5, §10.2) ---
    num_tokens: int = 256
    num_blocks: int = 50
    num_ltm_blocks: int = 10
    update_ltm_frequency: int = 60
    decay_frequency: float = 1
    initial_rf_when_moving_stm_to_ltm: float = 10
    update_ltm_mode: str = "immediate"
    selector_hidden_dim: int = 256
    num_selector_layers: int = 2
    selector_layers: list | None = None
    add_selector: bool = True
    add_encoder_retriever: bool = True
    detach_hidden_state: bool = True
    map_from_hidden_states: bool = True
    lora_config: dict | None = field(default_factory=lambda: dict(_DEFAULT_LORA))
    ltm_initial_size: int = 5120
    drop_memory_per_layer: bool = True
    add_decoder_lora: bool = True
    add_bos_embedding: bool = True
    # --- toolkit-only fields (never in official configs; saved under "mplus_deploy") ---
    max_window: int = 2048  # prompt + generated tokens (spec §8)
    max_chunk: int = 512  # injection chunk length used by memorize (spec §3.1)
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def kind(self) -> str:
        for a in self.architectures or []:
            if a in SUPPORTED_ARCHITECTURES:
                return SUPPORTED_ARCHITECTURES[a]
        raise ConfigError(
            f"architectures={self.architectures!r} is not supported; mplus-deploy serves "
            f"{sorted(SUPPORTED_ARCHITECTURES)} (set config.json 'architectures' to one of them)"
        )

    @property
    def is_mplus(self) -> bool:
        return self.kind == "mplus"

    @property
    def dh(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def K(self) -> int:  # tokens written per update per layer
        return self.num_tokens

    @property
    def N(self) -> int:  # STM slots per layer (L1826: MPlus uses num_blocks - num_ltm_blocks)
        if self.is_mplus:
            return (self.num_blocks - self.num_ltm_blocks) * self.num_tokens
        return self.num_blocks * self.num_tokens

    @property
    def K0(self) -> int:  # LTM rows retrieved per layer (M+)
        return self.num_ltm_blocks * self.num_tokens if self.is_mplus else 0

    @property
    def prefix_len(self) -> int:  # generation prefix rows per layer: bos + LTM_sel + STM
        return int(self.add_bos_embedding) + self.K0 + self.N

    @property
    def lora_r(self) -> int:
        return int(self.lora_config["r"]) if self.lora_config else 0

    @property
    def lora_scale(self) -> float:
        if not self.lora_config:
            return 0.0
        return float(self.lora_config["lora_alpha"]) / float(self.lora_config["r"])

    @property
    def lora_targets(self) -> tuple[str, ...]:
        if not self.lora_config:
            return ()
        return tuple(self.lora_config.get("target_modules") or LORA_TARGETS)

    def retriever_layers(self) -> list[int]:
        if not self.is_mplus:
            return []
        return list(self.selector_layers) if self.selector_layers is not None else list(range(self.num_hidden_layers))

    # ------------------------------------------------------------------ checks
    def validate(self) -> "MPlusConfig":
        _ = self.kind
        errs = []
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads"):
            if getattr(self, k) <= 0:
                errs.append(f"{k}={getattr(self, k)} must be > 0")
        if errs:
            raise ConfigError("invalid M+ config:\n  - " + "\n  - ".join(errs))
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            errs.append(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; set head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            errs.append(f"num_attention_heads={self.num_attention_heads} must be a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.dh % 2:
            errs.append(f"head_dim={self.dh} must be even for RoPE")
        if self.num_tokens <= 0:
            errs.append(f"num_tokens={self.num_tokens} must be > 0")
        if self.is_mplus and not (0 < self.num_ltm_blocks < self.num_blocks):
            errs.append(f"num_ltm_blocks={self.num_ltm_blocks} must lie in (0, num_blocks={self.num_blocks}) for M+")
        if self.num_blocks <= 0:
            errs.append(f"num_blocks={self.num_blocks} must be > 0")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rtype not in ("linear", "llama3", "default"):
                errs.append(
                    f"rope_scaling type {rtype!r} is not supported (supported: 'linear', 'llama3', 'default'); "
                    "add 'type' to rope_scaling in config.json"
                )
            elif rtype in ("linear", "llama3") and "factor" not in self.rope_scaling:
                errs.append("rope_scaling has no 'factor'")
        if self.lora_config is not None:
            for k in ("r", "lora_alpha"):
                if k not in self.lora_config:
                    errs.append(f"lora_config is missing {k!r}")
        if self.max_chunk <= 0 or self.max_window <= 0:
            errs.append("max_chunk and max_window must be > 0")
        if errs:
            raise ConfigError("invalid M+ config:\n  - " + "\n  - ".join(errs))
        return self

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MPlusConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        toolkit = d.pop("mplus_deploy", {}) or {}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        kwargs.update({k: v for k, v in toolkit.items() if k in known})
        # Harmless HF bookkeeping fields we keep silently.
        quiet = {"transformers_version", "_name_or_path", "attention_bias", "attention_dropout",
                 "hidden_act", "initializer_range", "mlp_bias", "pretraining_tp", "use_cache",
                 "output_attentions", "output_hidden_states", "return_dict", "rope_parameters"}
        unknown = sorted(k for k in d if k not in quiet)
        if unknown:
            warnings.warn(f"config.json: unknown fields kept but unused: {unknown}", stacklevel=2)
        if kwargs.get("architectures") is None:
            raise ConfigError("config.json has no 'architectures'; set it to [\"MPlus\"] or [\"MemoryLLM\"]")
        missing = [k for k in REQUIRED_FIELDS if k not in kwargs]
        if missing:
            raise ConfigError(f"config.json is missing {', '.join(repr(k) for k in missing)}: "
                              f"{'these fields fix' if len(missing) > 1 else 'this field fixes'} the weight shapes and "
                              "has no safe default; add it with the value of the checkpoint's model")
        if "num_key_value_heads" not in kwargs and isinstance(kwargs.get("num_attention_heads"), int):
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]  # LlamaConfig: no GQA unless given
        _check_types(kwargs)
        cfg = cls(**kwargs, extra=d)
        return cfg.validate()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        toolkit = {"max_window": d.pop("max_window"), "max_chunk": d.pop("max_chunk")}
        if not self.is_mplus:
            for k in ("num_ltm_blocks", "update_ltm_frequency", "decay_frequency",
                      "initial_rf_when_moving_stm_to_ltm", "update_ltm_mode", "selector_hidden_dim",
                      "num_selector_layers", "selector_layers", "add_selector", "add_encoder_retriever",
                      "detach_hidden_state", "map_from_hidden_states", "ltm_initial_size"):
                d.pop(k)
        if d.get("head_dim") is None:
            d.pop("head_dim")
        if d.get("selector_layers", 0) is None:
            d.pop("selector_layers")
        d.update(extra)
        d["mplus_deploy"] = toolkit
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "MPlusConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path} does not exist; an M+ checkpoint directory needs a config.json")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} col {e.colno})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text; save config.json as UTF-8 JSON") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object of config fields, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg.replace("config.json", str(path), 1) if "config.json" in msg
                              else f"{path}: {msg}") from None

    def to_json(self, path: str | Path) -> None:
        from mplus_deploy.util.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **kw) -> "MPlusConfig":
        return dataclasses.replace(self, **kw).validate()


# ---------------------------------------------------------------------- presets
def _mplus_8b() -> MPlusConfig:
    # spec §1: Llama-3 8B backbone; M+ rope_scaling is (open) - the memoryllm-8b value is used.
    return MPlusConfig(rope_scaling={"type": "linear", "factor": 1.8125})


def _memoryllm_8b() -> MPlusConfig:
    return MPlusConfig(
        architectures=["MemoryLLM"], rope_scaling={"type": "linear", "factor": 1.8125}, torch_dtype="float32"
    )


def _tiny(kind: str = "mplus") -> MPlusConfig:
    # 2 layers, hidden 64; K=8, N=4*8=32 (mplus: 6 blocks - 2 LTM blocks), K0=16, F=3 merges quickly.
    return MPlusConfig(
        architectures=["MPlus" if kind == "mplus" else "MemoryLLM"],
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
        num_tokens=8, num_blocks=6 if kind == "mplus" else 4, num_ltm_blocks=2, update_ltm_frequency=3,
        selector_hidden_dim=16, ltm_initial_size=24,
        lora_config={**_DEFAULT_LORA, "r": 4, "lora_alpha": 8},
        max_window=64, max_chunk=32,
    )


def _small() -> MPlusConfig:
    # ~4 layers, hidden 256, STM 1024, K 64 (benchmarks): 20 blocks of 64, 4 of them LTM -> N=1024, K0=256.
    return MPlusConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"type": "linear", "factor": 1.0}, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
        num_tokens=64, num_blocks=20, num_ltm_blocks=4, update_ltm_frequency=8,
        selector_hidden_dim=64, ltm_initial_size=512,
        lora_config={**_DEFAULT_LORA, "r": 8, "lora_alpha": 16},
        max_window=512, max_chunk=256,
    )


PRESETS = {
    "mplus-8b": _mplus_8b,
    "memoryllm-8b": _memoryllm_8b,
    "tiny": lambda: _tiny("mplus"),
    "tiny-memoryllm": lambda: _tiny("memoryllm"),
    "small": _small,
}


def preset(name: str) -> MPlusConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)} (or pass a checkpoint directory)")
    return PRESETS[name]().validate()
