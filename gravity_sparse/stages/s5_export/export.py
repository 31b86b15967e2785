"""export: a pruned checkpoint that plain transformers loads (DESIGN §6).

Dropped query heads are removed physically (their q_proj rows and o_proj columns), and so is every KV head
whose whole group is dropped (its k_proj/v_proj rows). The config records per-layer head counts
(`num_attention_heads_per_layer`, `num_key_value_heads_per_layer`), the KV head of every kept query head
(`gravity_head_groups`, the original GQA grouping after removal), the block grid, and the sparsity summary.
The block masks of the kept heads and the masses are stored with the weights. The directory carries the
modeling files, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works without
`gravity_sparse` (the reference path there; on a GPU the kernel gravity_sparse's resolver picks when
`gravity_sparse.kernels` is loaded).

Shapes per layer with Hq heads (D = head_dim), keep k of them:
    q_proj.weight (Hq·D, hidden) → (k·D, hidden), q_proj.bias (Hq·D) → (k·D)
    o_proj.weight (hidden, Hq·D) → (hidden, k·D)
    k_proj/v_proj (Hkv·D, hidden) → (k_kv·D, hidden)
"""

from __future__ import annotations

from typing import Any

import torch

from gravity_sparse.model.configuration_gravity import GravityConfig
from gravity_sparse.model.masks import Masks
from gravity_sparse.model.modeling_gravity import GravityForCausalLM


def _rows(heads: list[int], d: int) -> torch.Tensor:
    return torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long)


def prune_model(
    model: GravityForCausalLM, masks: Masks, record: dict[str, Any] | None = None
) -> GravityForCausalLM:
    """A new model with dropped heads removed and the kept heads' block masks stored as buffers."""
    src = model.config
    d = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    q_heads, kv_heads, groups = [], [], []
    plans = []
    for i, attn in enumerate(model.gravity_layers()):
        keep = [h for h in range(attn.num_heads) if bool(masks.head_keep[i, h])]
        old_groups = attn.gravity_kv_groups.tolist()
        kept_kv = sorted({old_groups[h] for h in keep})
        q_heads.append(len(keep))
        kv_heads.append(len(kept_kv))
        groups.append([kept_kv.index(old_groups[h]) for h in keep])
        plans.append((keep, kept_kv))
    cfg_dict = src.to_dict()
    cfg_dict.update(
        head_dim=d,
        num_attention_heads_per_layer=q_heads,
        num_key_value_heads_per_layer=kv_heads,
        gravity_head_groups=groups,
        gravity_block_size=masks.block_size,
        gravity_max_length=masks.max_length,
        gravity_sparsity={
            "density": round(masks.density(), 6),
            "heads_kept": masks.heads_kept(),
            "heads_total": int(masks.head_keep.numel()),
            "kv_heads_kept": sum(kv_heads),
            "block_size": masks.block_size,
            "max_length": masks.max_length,
            "method": masks.method,
            **(record or {}),
        },
    )
    for key in ("model_type", "transformers_version", "_attn_implementation_autoset"):
        cfg_dict.pop(key, None)
    new_cfg = GravityConfig(**cfg_dict)
    new_cfg._attn_implementation = "gravity"
    dtype = next(model.parameters()).dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the model's dtype: no fp32 copy (12 GB at Gravity-2)
    try:
        pruned = GravityForCausalLM(new_cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)

    state = {k: v for k, v in model.state_dict().items() if ".self_attn." not in k}
    for i, (attn, (keep, kept_kv)) in enumerate(zip(model.gravity_layers(), plans, strict=True)):
        p = f"model.layers.{i}.self_attn."
        q_rows, kv_rows = _rows(keep, d), _rows(kept_kv, d)
        state[p + "q_proj.weight"] = attn.q_proj.weight.detach()[q_rows]
        state[p + "q_proj.bias"] = attn.q_proj.bias.detach()[q_rows]
        state[p + "o_proj.weight"] = attn.o_proj.weight.detach()[:, q_rows]
        for name in ("k_proj", "v_proj"):
            lin = getattr(attn, name)
            state[p + name + ".weight"] = lin.weight.detach()[kv_rows]
            state[p + name + ".bias"] = lin.bias.detach()[kv_rows]
        idx = torch.tensor(keep, dtype=torch.long)
        state[p + "gravity_mass_log"] = attn.gravity_mass_log.detach()[idx]
        state[p + "gravity_head_keep"] = torch.ones(len(keep), dtype=torch.bool)
        state[p + "gravity_block_mask"] = masks.block_mask[i][idx].clone()
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    # lm_head may be tied to the embeddings; nothing else may be missing
    missing = [k for k in missing if k != "lm_head.weight" or not new_cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"export: state mismatch, missing {missing}, unexpected {unexpected}")
    return pruned


def model_costs(model: GravityForCausalLM, seq_len: int, dtype_bytes: int = 2) -> dict[str, float]:
    """Parameters, KV-cache bytes per token, attention FLOPs per token at `seq_len` (dense or sparse).

    Attention FLOPs per token: the q/k/v/o projections (2 per weight) plus, per head, 4·D per computed
    (query, key) pair (QKᵀ-distance and PV), averaged over the `seq_len` query positions. A sparse head
    computes the causal pairs of its kept blocks only.
    """
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    params = sum(p.numel() for p in model.parameters())
    kv_bytes = 0
    proj_flops = 0
    pair_flops = 0.0
    pos = torch.arange(seq_len)
    causal_pairs = (seq_len * (seq_len + 1)) / 2
    for attn in model.gravity_layers():
        kv_bytes += 2 * attn.num_key_value_heads * d * dtype_bytes
        proj_flops += 2 * sum(
            getattr(attn, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
        if attn.gravity_block_mask is None:
            pair_flops += attn.num_heads * 4 * d * causal_pairs / seq_len
            continue
        b = cfg.gravity_block_size
        qb, kb = pos // b, pos // b
        for h in range(attn.num_heads):
            if attn.gravity_head_keep is not None and not bool(attn.gravity_head_keep[h]):
                continue
            grid = attn.gravity_block_mask[h].cpu()
            allowed = grid[qb][:, kb] & (pos[None, :] <= pos[:, None])
            pair_flops += 4 * d * float(allowed.sum()) / seq_len
    return {
        "parameters": params,
        "kv_cache_bytes_per_token": kv_bytes,
        "attention_flops_per_token": proj_flops + pair_flops,
        "seq_len": seq_len,
    }
