"""The profile field: a head's distance profile spread over the block grid (the gravitational-field view)."""

from __future__ import annotations

import numpy as np
import torch


def profile_field(profile: torch.Tensor, block_field: torch.Tensor) -> np.ndarray:
    """(L, H, NQB, NQB) block field of each head's distance profile: the gravitational-field view.

    Query i puts profile[i − j] on key j (the mean attention at that distance, measured over all
    calibration queries), summed over the keys of a block and averaged over the queries of a row, rows
    renormalised to 1. It is translation-invariant, so every row keeps its local context; the sink column
    (key block 0) keeps the measured block field's mass where that is larger.
    """
    prof = profile.double().numpy()  # (L, H, S)
    num_layers, num_heads, seq = prof.shape
    nqb = block_field.shape[-1]
    block = -(-seq // nqb)
    pos = np.arange(nqb * block)
    dist = pos[:, None] - pos[None, :]
    padded = np.concatenate([prof, np.zeros((num_layers, num_heads, nqb * block - seq))], -1)
    valid = (dist >= 0) & (pos[:, None] < seq) & (pos[None, :] < seq)
    pf = np.where(valid, padded[..., np.clip(dist, 0, None)], 0.0)  # (L, H, T, T)
    pf = pf.reshape(num_layers, num_heads, nqb, block, nqb, block).sum(-1).mean(-2)
    pf[..., 0] = np.maximum(pf[..., 0], block_field.double().numpy()[..., 0])
    pf *= np.tril(np.ones((nqb, nqb)))
    return pf / np.maximum(pf.sum(-1, keepdims=True), 1e-12)
