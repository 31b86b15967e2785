"""A gravity model's architecture, size, masses and attention implementation (`gravity-sparse info`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Architecture, parameter count, attention implementation and per-layer mass summary of a model."""
    cfg = model.config
    layers = []
    for i, attn in enumerate(model.gravity_layers()):
        mass = F.softplus(attn.gravity_mass_log.detach().float())
        entry = {
            "layer": i,
            "q_heads": attn.num_heads,
            "kv_heads": attn.num_key_value_heads,
            "mass_min": round(float(mass.min()), 4) if mass.numel() else None,
            "mass_mean": round(float(mass.mean()), 4) if mass.numel() else None,
            "mass_max": round(float(mass.max()), 4) if mass.numel() else None,
        }
        if attn.gravity_block_mask is not None:
            entry["sparse"] = True
        layers.append(entry)
    return {
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": cfg._attn_implementation,
        "gravity_eps": cfg.gravity_eps,
        "block_size": cfg.gravity_block_size,
        "sparsity": cfg.gravity_sparsity,
        "layers": layers,
    }
