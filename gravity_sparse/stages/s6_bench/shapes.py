"""Model shapes for benchmarks with random weights (no checkpoint needed)."""

from __future__ import annotations

import dataclasses

import torch

from gravity_sparse.model.configuration_gravity import GravityConfig


def gravity2_config(num_layers: int = 36) -> GravityConfig:
    """Gravity-2's shape (DESIGN §1): hidden 2048, 16 q / 2 kv heads, head_dim 128, Qwen2-3B MLP."""
    return GravityConfig(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


def smol_config(num_layers: int = 30) -> GravityConfig:
    """gravity-smol's shape (SmolLM2-135M-Instruct, DESIGN §2): hidden 576, 9 q / 3 kv heads,
    head_dim 64, MLP 1536, vocabulary 49,152, 8k positions, tied embeddings."""
    return GravityConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


SHAPES = {"gravity2": (gravity2_config, 36), "smol": (smol_config, 30)}


def synthetic_model_and_masks(
    shape: str,
    num_layers: int | None,
    solve_cfg,
    *,
    block_size: int,
    seq_len: int,
    device="cpu",
    dtype=torch.float32,
    seed: int = 0,
):
    """A random-weight model of a known shape and masks the QUBO solve picks on a synthetic field of
    that shape (`solve_cfg`: density, head_drop, ...) over `seq_len` tokens in blocks of `block_size`."""
    from gravity_sparse.model.masks import Masks
    from gravity_sparse.model.modeling_gravity import GravityForCausalLM
    from gravity_sparse.qubo.synthetic import synthetic_field
    from gravity_sparse.stages.s2_solve.solve import solve_field

    make, default_layers = SHAPES[shape]
    config = make(num_layers or default_layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = GravityForCausalLM(config).to(dtype).eval()
    nqb = -(-seq_len // block_size)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    field, meta = synthetic_field(
        config.num_hidden_layers, heads, kv, nqb, block_size=block_size, seed=seed
    )
    meta["seq_len"] = str(seq_len)
    solve_cfg = dataclasses.replace(solve_cfg, exact_layers=0, baselines=[])
    result = solve_field(field, meta, solve_cfg, eps=config.gravity_eps)
    masks = Masks(
        result.head_keep, result.block_mask, block_size, seq_len, f"qubo-sa-synthetic-{shape}"
    )
    return model, masks
