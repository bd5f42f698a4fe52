"""Profiling settings and the plan that clips them to what an artifact and this machine allow."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PROMPT_LENS = (64, 512, 2048)
DEFAULT_LTM_SIZES = (0, 16 * 1024, 64 * 1024, 160 * 1024)


@dataclass
class Settings:
    prompt_lens: tuple = DEFAULT_PROMPT_LENS
    ltm_sizes: tuple = DEFAULT_LTM_SIZES
    new_tokens: int = 128
    warmup: int = 1
    repeat: int = 5
    memorize_chunks: int | None = None  # default: update_ltm_frequency + 1 (one merge included)
    seed: int = 0
    ram_fraction: float = 0.5  # synthetic LTM may use at most this share of the available RAM
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------------------------- planning
def plan(cfg, limits: dict, s: Settings, backend: str, ltm_row_bytes: int, avail: int | None) -> Settings:
    """Clip prompt lengths / new tokens / LTM sizes to what the artifact and this machine allow (notes say so)."""
    notes = list(s.notes)
    W = int(cfg.max_window)
    new = int(s.new_tokens)
    if new > W // 2:
        notes.append(f"--new-tokens {new} clipped to {W // 2} (half the generation window max_window={W})")
        new = W // 2
    max_p = min(W - new, int(limits.get("max_prompt") or W))
    prompts = []
    for p in s.prompt_lens:
        q = min(int(p), max_p)
        if q != p:
            notes.append(f"prompt length {p} clipped to {q} (max_window {W} − new tokens {new}"
                         + (f", max_prompt {limits['max_prompt']}" if limits.get("max_prompt") else "") + ")")
        if q not in prompts:
            prompts.append(q)
    sizes = []
    max_ltm = limits.get("max_ltm")
    budget = None if avail is None else int(avail * s.ram_fraction)
    for n in s.ltm_sizes:
        m = int(n)
        if not cfg.is_mplus and m:
            notes.append(f"LTM size {n} skipped: {cfg.kind} has no long-term memory")
            m = 0
        if backend == "tensorrt" and max_ltm and m > max_ltm:
            notes.append(f"LTM size {n} clipped to {max_ltm} (the TensorRT profile bound limits.max_ltm)")
            m = int(max_ltm)
        if budget is not None and m * ltm_row_bytes > budget:
            fit = int(budget // max(ltm_row_bytes, 1)) // 1024 * 1024
            notes.append(f"LTM size {n} clipped to {fit} rows/layer: {n} rows would need "
                         f"{n * ltm_row_bytes / 2**30:.1f} GiB host memory, over {s.ram_fraction:.0%} of the "
                         f"{avail / 2**30:.1f} GiB available")
            m = fit
        elif max_ltm and m > max_ltm and backend != "tensorrt":
            notes.append(f"LTM size {n} exceeds the artifact's steady-state LTM bound limits.max_ltm={max_ltm} "
                         f"(spec §5.4); run anyway ({backend} has no shape profile), as a scaling measurement")
        if m not in sizes:
            sizes.append(m)
    return Settings(prompt_lens=tuple(prompts), ltm_sizes=tuple(sorted(sizes)), new_tokens=new, warmup=s.warmup,
                    repeat=s.repeat, memorize_chunks=s.memorize_chunks, seed=s.seed, ram_fraction=s.ram_fraction,
                    notes=notes)


def ltm_row_bytes(cfg, itemsize: int) -> int:
    """Host bytes per LTM row (all layers) while profiling: K/V + retriever key in the host memory's LTM
    store (which is also the prefill feed, no second copy), plus ages / rf (float64) and the feed ages (int64)."""
    row = (2 * cfg.num_key_value_heads * cfg.dh + cfg.selector_hidden_dim) * itemsize
    return int(cfg.num_hidden_layers * (row + 24))


# ---------------------------------------------------------------------------------- synthetic LTM
