"""`MPlus`: the faithful PyTorch reference of M+ and MemoryLLM (spec §3–§9, §11).

Public API (stable, later issues build on it): ``MPlus.from_config``, ``memory.seed``, ``inject``,
``prefill_logits``, ``retrieved_indices``, ``generate``. Switches (spec §11/§12):

- ``rope_inv_freq_dtype``: "auto" (bf16 for a bf16 M+ model, as the README's double cast; fp32
  otherwise) | "bf16" | "fp32".
- ``retrieval_score_dtype``: "auto" (the model's own dtype) | "bf16" (emulated in fp32) | "fp32".
- ``ltm_age_order``: "stable" (default, portable) | "numpy" (replay one official run).
- ``fast_path``: False (direct, faithful) | True (memory K/V computed once per memory state, R1/R2).
- ``attention_impl``: "eager" (explicit softmax, default) | "sdpa" (torch fused attention, same mask).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import forward as F_
from .config import MPlusConfig
from .layers import Backbone
from .memory import MemoryState
from .memory_kv import MemoryKV, project_layer
from .rope import cos_sin, inv_freq
from .rules import MIN_TRAINED_CHUNK, check_ids, check_ltm, check_window, eos_ids, short_chunk_warning  # noqa: F401
from .sampling import SamplingParams, decode_loop


class MPlus(nn.Module):
    def __init__(self, cfg: MPlusConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        L, d = cfg.num_hidden_layers, cfg.hidden_size
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.add_bos_embedding:
            self.bos_embedding = nn.Parameter(torch.zeros(L, 1, d))
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d))
        self.memory = self.empty_memory()
        self.rope_inv_freq_dtype = "auto"
        self.retrieval_score_dtype = "auto"
        self.ltm_age_order = "stable"
        self.fast_path = False
        self.attention_impl = "eager"  # "sdpa": fused attention kernels (GPU speed), same math
        self.compute_dtype: torch.dtype | None = None  # set by precision.upcast_compute (bf16 storage, fp32 math)
        self._kv = None
        self._rope = None
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction
    def empty_memory(self) -> MemoryState:
        cfg = self.config
        L, N, d = cfg.num_hidden_layers, cfg.N, cfg.hidden_size
        m = MemoryState(cfg=cfg, stm=torch.zeros(L, N, d), stm_ages=torch.zeros(L, N, dtype=torch.float64))
        if cfg.is_mplus:
            dr = cfg.selector_hidden_dim
            m.ltm = [torch.zeros(0, d) for _ in range(L)]
            m.ltm_keys = [torch.zeros(0, dr) for _ in range(L)]
            m.ltm_ages = [torch.zeros(0, dtype=torch.float64) for _ in range(L)]
            m.ltm_rf = [torch.zeros(0, dtype=torch.float64) for _ in range(L)]
            m.ltm_age_dtype = ["int32"] * L
        return m

    @classmethod
    def from_config(cls, cfg: MPlusConfig, seed: int = 0, initialized: bool = True) -> "MPlus":
        """Random init with non-trivial scale; LoRA B non-zero so the two adapters really differ."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = cls(cfg)
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    nn.init.normal_(p, std=0.5 / p.shape[1] ** 0.5)
                elif name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif name == "model.embed_tokens.weight" or name == "bos_embedding":
                    nn.init.normal_(p, std=1.0)
                elif name == "new_memory_positional_emb":
                    nn.init.normal_(p, std=0.1)
            mem = m.memory
            mem.stm = torch.randn_like(mem.stm)
            mem.initialized = bool(initialized)
            if cfg.is_mplus:
                S0 = cfg.ltm_initial_size
                for l, layer in enumerate(m.model.layers):
                    vals = torch.randn(S0, cfg.hidden_size)
                    mem.ltm[l] = vals
                    mem.ltm_keys[l] = layer.self_attn.key_proj(layer.input_layernorm(vals))
                    mem.ltm_ages[l] = torch.randint(0, 3 * cfg.K, (S0,)).to(torch.float64)  # with ties
                    mem.ltm_rf[l] = torch.full((S0,), float(cfg.initial_rf_when_moving_stm_to_ltm), dtype=torch.float64)
        m.memory.touch()
        return m

    # ------------------------------------------------------------------ dtype / device
    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        mem = self.memory
        conv = lambda t: None if t is None else t.to(device=device or t.device, dtype=dtype or t.dtype)  # noqa: E731
        mem.stm = conv(mem.stm)
        mem.ltm = [conv(t) for t in mem.ltm]
        mem.ltm_keys = [conv(t) for t in mem.ltm_keys]
        mem.pend_vals, mem.pend_keys = conv(mem.pend_vals), conv(mem.pend_keys)
        mem.touch()
        self._rope = None
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in: the weights' own, or ``compute_dtype`` (``precision.py``)."""
        return self.compute_dtype or self.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ switches
    def rope_tables(self, pos: torch.Tensor, dtype: torch.dtype):
        mode = self.rope_inv_freq_dtype
        if mode == "auto":
            mode = "bf16" if (self.dtype == torch.bfloat16 and self.config.is_mplus) else "fp32"
        if self._rope is None or self._rope[0] != mode:
            self._rope = (mode, *inv_freq(self.config, mode))
        return cos_sin(pos.to(self.device), self._rope[1], self._rope[2], dtype)

    def score_mode(self) -> str:
        m = self.retrieval_score_dtype
        if m == "auto":
            return "fp32" if self.dtype == torch.float32 else "native"
        if m not in ("bf16", "fp32"):
            raise ValueError(f"retrieval_score_dtype must be 'auto', 'bf16' or 'fp32', got {m!r}")
        return m

    def memory_kv(self, mem=None) -> MemoryKV:
        """``mem``'s rows as pre-RoPE K/V (default ``self.memory``), recomputed when that memory changed."""
        mem = self.memory if mem is None else mem
        if self._kv is None or not self._kv.is_for(mem):
            self._kv = MemoryKV(self, mem)
        return self._kv

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h)).float()

    # ------------------------------------------------------------------ input checks (model/rules.py)
    def _check_ids(self, ids, what: str) -> torch.Tensor:
        return check_ids(ids, self.config.vocab_size, what)

    def _check_ltm(self) -> None:
        if self.config.is_mplus:
            check_ltm(t.shape[0] for t in self.memory.ltm)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def inject(self, input_ids) -> None:
        """Memory update (spec §3–§5). Inputs longer than ``max_chunk`` are injected in document-order
        chunks (spec §8 toolkit rule); chunks shorter than 16 tokens run the official math with a warning."""
        ids = self._check_ids(input_ids, "inject")
        C = self.config.max_chunk
        for s in range(0, ids.numel(), C):
            self._inject_chunk(ids[s : s + C])

    def _inject_chunk(self, ids: torch.Tensor) -> None:
        mem = self.memory
        msg = short_chunk_warning(ids.numel(), mem.short_chunk_warned)
        if msg:
            warnings.warn(msg, stacklevel=3)
            mem.short_chunk_warned = True
        delta = F_.inject_forward(self, mem, ids)
        self.write_delta(delta)

    def write_delta(self, delta: torch.Tensor, keep=None, drop=None) -> None:
        """STM write + (M+) pending/merge for one update's ``delta`` [L, K, d]; drops drawn here unless given."""
        mem, cfg = self.memory, self.config
        if not mem.initialized:
            mem.tile_first_update(delta)
        else:
            if keep is None:
                keep, drop = mem.draw_drops()
            dropped, dropped_age = mem.write_stm(delta, keep, drop)
            if cfg.is_mplus:
                mem.append_pending(dropped, self.retriever_keys(dropped), dropped_age)
        mem.touch()

    def retriever_keys(self, rows: torch.Tensor) -> torch.Tensor:
        """f_k(input_layernorm_l(rows_l)) per layer: [L, n, d] → [L, n, d_r] (spec §5.1)."""
        return torch.stack([project_layer(self, l, rows[l], True)[0] for l in range(self.config.num_hidden_layers)])

    @torch.no_grad()
    def prefill_logits(self, input_ids, use_memory: bool = True) -> torch.Tensor:
        """Retrieval + prefill → logits [T, vocab] fp32; memory unchanged. ``use_memory=False`` runs the
        bare Llama backbone with the decoder adapter (for parity with transformers)."""
        ids = self._check_ids(input_ids, "prefill")
        check_window(self.config, ids.numel(), 0)
        if use_memory:
            self._check_ltm()
        return F_.prefill(self, self.memory, ids, use_memory=use_memory)[0]

    @torch.no_grad()
    def retrieved_indices(self, input_ids) -> list[torch.Tensor]:
        """Per layer, indices into ``concat(ltm, pending)`` in prefix order (M+; [] for MemoryLLM)."""
        ids = self._check_ids(input_ids, "retrieved_indices")
        check_window(self.config, ids.numel(), 0)
        if not self.config.is_mplus:
            return []
        self._check_ltm()
        rec: list = []
        F_.prefill(self, self.memory, ids, record=rec)
        return rec

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int | None = None, *, params: SamplingParams | None = None,
                 use_memory: bool = True, **sampling) -> torch.Tensor:
        """Greedy or sampled continuation → LongTensor of the new tokens only (eos included if hit).
        ``params`` (``sampling.SamplingParams``) or keyword options (``do_sample, temperature, top_p, top_k,
        seed, stop_at_eos``); ``max_new_tokens`` defaults to 32 here."""
        ids = self._check_ids(input_ids, "generate")
        sp = SamplingParams.of(params, max_new_tokens, default_max_new_tokens=32, **sampling)
        check_window(self.config, ids.numel(), sp.max_new_tokens)
        if use_memory:
            self._check_ltm()
        state = {}

        def first():
            logits, state["cache"] = F_.prefill(self, self.memory, ids, use_memory=use_memory)
            state["pos"] = (self.config.prefix_len if use_memory else 0) + ids.numel()
            return logits[-1]

        def step(tok: int) -> torch.Tensor:
            lg = F_.decode_step(self, tok, state["pos"], state["cache"])
            state["pos"] += 1
            return lg

        return torch.tensor(list(decode_loop(first, step, sp, eos_ids(self.config))), dtype=torch.int64)
