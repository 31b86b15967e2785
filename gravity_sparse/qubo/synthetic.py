"""A synthetic field in the `field.safetensors` format, for tests and the solve benchmark.

Each head attends with a power law over token distance, p(Δ) ∝ (Δ + 1)^(−α_h), plus an attention sink on
the first tokens; α_h differs per head (local heads ≈ 2–3, global heads ≈ 0.3). Token-level rows are
normalised over the causal prefix and averaged into blocks, so every block-field row sums to 1 over its
causal key blocks exactly as `measure` writes it. Heavier masses go with sharper (more local) heads, the
importances are heavy-tailed (a few heads matter, many barely do), and head outputs share a few latent
directions so that some pairs are redundant.

Shapes: block_field (L, H, NQB, NQB), everything else per (L, H) as in the shared format.
"""

from __future__ import annotations

import numpy as np
import torch


def _block_field(alpha: float, sink: float, nqb: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(NQB, NQB) block-averaged attention of one head with a power law plus a sink, and the
    block-averaged drop cost −log(1 − p) (see `gravity_sparse.stages.s1_measure.field.block_mass_sums`)."""
    seq = nqb * block
    pos = np.arange(seq)
    dist = pos[:, None] - pos[None, :]
    causal = dist >= 0
    weight = np.where(causal, (np.maximum(dist, 0) + 1.0) ** (-alpha), 0.0)
    weight[:, : max(block // 8, 1)] += sink * causal[:, : max(block // 8, 1)]
    probs = weight / weight.sum(1, keepdims=True)
    per_block = probs.reshape(nqb, block, nqb, block).sum(3)  # (NQB, queries, NKB)
    cost = -np.log1p(-np.minimum(per_block, 1.0 - 1e-6))
    return per_block.mean(1), cost.mean(1)


def synthetic_field(
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    nqb: int,
    *,
    block_size: int = 64,
    seed: int = 0,
    token_block: int = 8,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A realistic-looking field; the block field is built at `token_block` tokens per block (cheap)."""
    rng = np.random.default_rng(seed)
    shape = (num_layers, num_heads)
    alpha = np.where(
        rng.random(shape) < 0.2, rng.uniform(0.2, 0.6, shape), rng.uniform(1.0, 3.0, shape)
    )
    sink = rng.lognormal(np.log(2.0), 1.0, shape) * (rng.random(shape) < 0.7)
    field = np.zeros((*shape, nqb, nqb))
    cost = np.zeros_like(field)
    for layer in range(num_layers):
        for h in range(num_heads):
            field[layer, h], cost[layer, h] = _block_field(
                alpha[layer, h], sink[layer, h], nqb, token_block
            )
    noise = rng.lognormal(0.0, 0.15, field.shape)
    field *= noise
    cost *= noise
    field *= np.tril(np.ones((nqb, nqb)))
    field /= field.sum(-1, keepdims=True)

    mass_log = 0.3 * alpha - 0.5 + rng.normal(0.0, 0.3, shape)
    mass = np.log1p(np.exp(mass_log))
    importance = rng.lognormal(np.log(0.02), 1.2, shape) * (rng.random(shape) > 0.1)
    latent = rng.normal(size=(num_layers, num_heads, 4))
    own = rng.normal(size=(num_layers, num_heads, 12))
    vec = np.concatenate([latent * rng.uniform(0.0, 2.0, (*shape, 1)), own], axis=-1)
    vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
    redundancy = np.einsum("lhd,lkd->lhk", vec, vec)
    group = max(num_heads // max(num_kv_heads, 1), 1)
    kv_groups = np.broadcast_to(np.arange(num_heads) // group, shape).copy()
    seq_len = nqb * block_size
    profile = np.zeros((*shape, seq_len))
    profile[..., :] = (np.arange(seq_len) + 1.0)[None, None, :] ** (-alpha[..., None])

    # first-order loss sensitivity of a log-gate per block (measure's block_grad): signed, each query
    # row sums to zero (the diagonal block takes the rest); off-diagonal blocks with more than a third of
    # their row's mean mass help (negative gradient), lighter ones hurt a little
    causal = np.tril(np.ones((nqb, nqb)))
    row_mean = field.sum(-1, keepdims=True) / causal.sum(-1)
    block_grad = -(field - row_mean / 3) * np.tril(causal, -1) * importance[..., None, None] * nqb
    idx = np.arange(nqb)
    block_grad[..., idx, idx] = -block_grad.sum(-1)

    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    tensors = {
        "block_field": f32(field),
        "block_cost": f32(cost),
        "block_grad": f32(block_grad),
        "block_grad_abs": f32(np.abs(block_grad) * 1.5),
        "importance": f32(importance),
        "importance_grad": f32(importance * rng.lognormal(0.0, 0.3, shape)),
        "redundancy": f32(redundancy),
        "mass": f32(mass),
        "mass_log": f32(mass_log),
        "entropy": f32(-(field * np.log(field + 1e-12)).sum(-1).mean(-1)),
        "profile": f32(profile),
        "score_profile": f32(profile),
        "alpha": f32(alpha),
        "alpha_amp": f32(np.ones(shape)),
        "alpha_r2": f32(np.ones(shape)),
        "kv_groups": torch.tensor(kv_groups, dtype=torch.int64),
    }
    meta = {
        "block_size": str(block_size),
        "seq_len": str(seq_len),
        "num_layers": str(num_layers),
        "num_heads": str(num_heads),
        "num_kv_heads": str(num_kv_heads),
        "num_tokens": "0",
    }
    return tensors, meta
