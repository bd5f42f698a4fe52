"""An independent, deliberately naive oracle of spec §3.3/§3.4/§7.2 for tiny models: merged LoRA
weights, one row at a time, RoPE recomputed from the formula. Shares no code with mplus_deploy's
forward functions, so agreement is evidence, not tautology."""
import math

import torch


def W(mod, adapter):
    w = mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight
    if hasattr(mod, "lora_A") and adapter in mod.lora_A:
        w = w + mod.scale * mod.lora_B[adapter].weight @ mod.lora_A[adapter].weight
    return w


def rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope_row(x, pos, cfg):
    # x [heads, Dh] at integer position pos; linear scaling divides inv_freq by factor.
    Dh = x.shape[-1]
    f = (cfg.rope_scaling or {}).get("factor", 1.0)
    out = torch.empty_like(x)
    for i in range(Dh // 2):
        inv = 1.0 / (cfg.rope_theta ** (2 * i / Dh)) / f
        c, s = math.cos(pos * inv), math.sin(pos * inv)
        a, b = x[:, i], x[:, i + Dh // 2]
        out[:, i] = a * c - b * s
        out[:, i + Dh // 2] = b * c + a * s
    return out


def layer(model, l, X, P, adapter):
    """X [R, d], rows < P prefix (K/V only); positions 0..R-1. Returns [R-P, d]."""
    cfg = model.config
    ly = model.model.layers[l]
    at = ly.self_attn
    H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dh
    R = X.shape[0]
    xn = rms(X, ly.input_layernorm.weight, cfg.rms_norm_eps)
    K = [rope_row((xn[j] @ W(at.k_proj, adapter).T).view(Hkv, Dh), j, cfg) for j in range(R)]
    V = [(xn[j] @ W(at.v_proj, adapter).T).view(Hkv, Dh) for j in range(R)]
    out = []
    for i in range(P, R):
        q = rope_row((xn[i] @ W(at.q_proj, adapter).T).view(H, Dh), i, cfg)
        heads = []
        for h in range(H):
            kv = h // (H // Hkv)
            sc = torch.stack([q[h] @ K[j][kv] / math.sqrt(Dh) for j in range(i + 1)])
            p = torch.softmax(sc, 0)
            heads.append(sum(p[j] * V[j][kv] for j in range(i + 1)))
        r = X[i] + torch.cat(heads) @ at.o_proj.weight.T
        m = ly.mlp
        rn = rms(r, ly.post_attention_layernorm.weight, cfg.rms_norm_eps)
        g = torch.nn.functional.silu(rn @ W(m.gate_proj, adapter).T) * (rn @ W(m.up_proj, adapter).T)
        out.append(r + g @ W(m.down_proj, adapter).T)
    return torch.stack(out)


def inject_delta(model, ids):
    cfg, mem = model.config, model.memory
    K, N, T = cfg.K, cfg.N, len(ids)
    h = model.model.embed_tokens.weight[ids]
    deltas = []
    for l in range(cfg.num_hidden_layers):
        X = torch.cat([model.bos_embedding[l], mem.stm[l, N - K:], h]).clone()
        X[-K:] += model.new_memory_positional_emb[0, 0]
        P = 1 + min(T, K)
        y = layer(model, l, X, P, "default")
        deltas.append(y[-K:])
        h = y[-T:]
    return torch.stack(deltas)


def prefill_logits(model, ids, retrieved_rows=None):
    """retrieved_rows: per layer [K0, d] in prefix order (M+), or None (MemoryLLM)."""
    cfg, mem = model.config, model.memory
    h = model.model.embed_tokens.weight[ids]
    for l in range(cfg.num_hidden_layers):
        parts = [model.bos_embedding[l]]
        if retrieved_rows is not None:
            parts.append(retrieved_rows[l])
        parts.append(mem.stm[l])
        X = torch.cat(parts + [h])
        h = layer(model, l, X, X.shape[0] - len(ids), "decoder_adapter")
    return rms(h, model.model.norm.weight, cfg.rms_norm_eps) @ model.lm_head.weight.T
