"""The gravitational-field view of a head: its distance profile integrated over block pairs.

Pure numpy, O(L·H·T) time and memory for the per-offset sums plus the (L, H, NQB, NQB) output; no
T × T array is ever built.

Query i puts profile[i − j] on key j. The profile is translation-invariant, so the sum over a block pair
(query block a, key block b) depends only on the block offset d = a − b: with i = aB + r, j = bB + s,
i − j = dB + (r − s), and r − s = x occurs for B − |x| of the B² pairs. Splitting x ≥ 0 (within the
profile's row d when it is cut into rows of B) from x < 0 (the tail of row d − 1) gives

    S(d) = Σ_x profile[dB + x]·(B − x) + Σ_r profile[(d − 1)B + r]·r,      x, r = 0 .. B − 1,

two matrix–vector products over the profile reshaped to (NQB, B) — the second difference of the
profile's prefix sums of prefix sums, evaluated without their cancellation. A last query block that runs
past the sequence end has only R < B real queries; its weights become max(R − x, 0) and min(r, R).
"""

from __future__ import annotations

import numpy as np
import torch


def _offset_sums(rows: np.ndarray, block: int, real_queries: int) -> np.ndarray:
    """(..., NQB) sums over the block pairs at offsets d = 0 .. NQB − 1 for a query block of
    `real_queries` real queries; rows (..., NQB + 1, B) is the profile cut into rows, row 0 zero."""
    x = np.arange(block, dtype=np.float64)
    current = np.maximum(real_queries - x, 0.0)  # weight of profile[dB + x]
    previous = np.minimum(x, real_queries)  # weight of profile[(d − 1)B + x]
    return rows[..., 1:, :] @ current + rows[..., :-1, :] @ previous


def profile_field(profile: torch.Tensor, block_field: torch.Tensor) -> np.ndarray:
    """(L, H, NQB, NQB) block field of each head's distance profile: the gravitational-field view.

    Query i puts profile[i − j] on key j (the mean attention at that distance, measured over all
    calibration queries), summed over the keys of a block and averaged over the queries of a row, rows
    renormalised to 1. It is translation-invariant, so every row keeps its local context; the sink column
    (key block 0) keeps the measured block field's mass where that is larger. Queries past the end of the
    sequence (a partial last block) count as zero rows in the block's average.
    """
    prof = profile.double().numpy()  # (L, H, S)
    num_layers, num_heads, seq = prof.shape
    nqb = block_field.shape[-1]
    block = -(-seq // nqb)
    flat = np.zeros((num_layers, num_heads, (nqb + 1) * block))
    flat[..., block : block + seq] = prof
    # row d + 1 holds the profile at offsets dB .. dB + B − 1; row 0 is zero (offset −1 and below)
    rows = flat.reshape(num_layers, num_heads, nqb + 1, block)

    qb = np.arange(nqb)
    offset = qb[:, None] - qb[None, :]  # d = a − b
    causal = offset >= 0
    full = _offset_sums(rows, block, block) / block  # (L, H, NQB), rows with B real queries
    pf = full[..., np.clip(offset, 0, None)]  # (L, H, NQB, NQB), Toeplitz in the block offset
    real = np.clip(seq - qb * block, 0, block)  # real queries per query block
    for a in np.flatnonzero(real < block):
        part = _offset_sums(rows, block, int(real[a])) / block if real[a] else np.zeros_like(full)
        pf[..., a, :] = part[..., np.clip(offset[a], 0, None)]
    pf[..., 0] = np.maximum(pf[..., 0], block_field.double().numpy()[..., 0])
    pf *= causal
    return pf / np.maximum(pf.sum(-1, keepdims=True), 1e-12)
