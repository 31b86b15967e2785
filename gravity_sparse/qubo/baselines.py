"""Baseline block selections at exactly the QUBO's budget, diagonal blocks always on.

Heads: every head is kept, unless the budget also fixes a number of heads (`solve.head_drop`); then the
baselines keep the most important heads (ablation importance, the value the QUBO uses) and spend the block
budget inside them, so every method is compared at equal density and equal head count.

All return (heads (L, H) bool, blocks (L, H, NB) bool) over the off-diagonal blocks of `offdiag_blocks`,
with exactly `target_blocks` computed causal blocks (diagonals included), so they are compared with the
QUBO selection at equal density.

    greedy   top-k off-diagonal blocks by measured field, over the whole model
    window   per head: attention-sink column (key block 0) then the nearest diagonals (StreamingLLM-style)
    random   uniform random off-diagonal blocks (seeded)
    uniform  the same number of blocks in every head, top-k by field inside the head
"""

from __future__ import annotations

import numpy as np

from gravity_sparse.errors import UserError
from gravity_sparse.qubo.formulation import offdiag_blocks
from gravity_sparse.qubo.registry import BASELINES


def _extra(heads: np.ndarray, nb: int, nqb: int, target_blocks: int) -> int:
    kept = int(heads.sum())
    extra = target_blocks - kept * nqb
    if not 0 <= extra <= kept * nb:
        raise UserError(f"budget of {target_blocks} blocks is not reachable with {kept} heads kept")
    return extra


def important_heads(importance: np.ndarray, count: int) -> np.ndarray:
    """(L, H) bool: the `count` heads of largest importance (ties by position)."""
    return _top(np.nan_to_num(importance, nan=0.0), count)


def _top(scores: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of the `count` largest entries of scores (ties by position, deterministic)."""
    keep = np.zeros(scores.size, dtype=bool)
    keep[np.argsort(-scores, axis=None, kind="stable")[:count]] = True
    return keep.reshape(scores.shape)


def _per_head_quota(heads: np.ndarray, extra: int, nb: int) -> np.ndarray:
    """(L, H) blocks per kept head, equal up to one, summing to extra; 0 for dropped heads."""
    kept = np.flatnonzero(heads.reshape(-1))
    base, rest = divmod(extra, max(kept.size, 1))
    quota = np.zeros(heads.size, dtype=np.int64)
    quota[kept] = base
    quota[kept[:rest]] += 1
    if quota.max(initial=0) > nb:
        raise UserError("per-head budget exceeds the blocks of a head")
    return quota.reshape(heads.shape)


def _by_rank(rank: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Keep, per head, the blocks whose rank (L, H, NB; 0 = first choice) is below the head's quota."""
    return rank < quota[..., None]


def _rank_within_head(scores: np.ndarray) -> np.ndarray:
    order = np.argsort(-scores, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(scores.shape[-1])[None, None, :], axis=-1)
    return rank


def baseline_masks(
    name: str,
    block_field: np.ndarray,
    target_blocks: int,
    *,
    seed: int = 0,
    sink_blocks: int = 1,
    heads: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of one baseline. block_field (L, H, NQB, NQB); heads (L, H) bool kept heads (None: all)."""
    num_layers, num_heads, nqb, _ = block_field.shape
    qb, kb = offdiag_blocks(nqb)
    nb = qb.size
    shape = (num_layers, num_heads, nb)
    if heads is None:
        heads = np.ones((num_layers, num_heads), dtype=bool)
    heads = heads.astype(bool)
    extra = _extra(heads, nb, nqb, target_blocks)
    dropped = ~heads[..., None]
    field = block_field[..., qb, kb].astype(np.float64)  # (L, H, NB)
    if name == "greedy":
        blocks = _top(np.where(dropped, -np.inf, field), extra)
    elif name == "random":
        scores = np.random.default_rng(seed).random(shape)
        blocks = _top(np.where(dropped, -np.inf, scores), extra)
    elif name == "uniform":
        blocks = _by_rank(_rank_within_head(field), _per_head_quota(heads, extra, nb))
    elif name == "window":
        # sink column first, then by distance to the diagonal, nearest first (then by query block)
        key = np.where(kb < sink_blocks, qb - nqb * 2, (qb - kb) * nqb + qb).astype(np.float64)
        rank = np.broadcast_to(np.argsort(np.argsort(key, kind="stable")), shape)
        blocks = _by_rank(rank, _per_head_quota(heads, extra, nb))
    else:
        raise UserError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    return heads, blocks
