"""Row coupling: the convex cost of dropping several blocks of one query row (`solve.row_coupling`).

Dropping key blocks of attention mass p_a, p_b, … from a query's softmax row and renormalising costs
−log(1 − Σ p) nats of that query's attention (the KL from the full row to the renormalised one). The cost
is convex in the dropped mass: two blocks dropped together cost more than the sum of their single costs,

    −log(1 − p_a − p_b) = −log(1 − p_a) − log(1 − p_b) + γ_ab,   γ_ab = log(1 + p_a p_b / (1 − p_a − p_b)) ≥ 0.

The linear block values of the QUBO (`solve.block_value=kl`: each block's −log(1 − p)) price every block
as if it were the only one dropped from its row, so a row that loses most of its off-diagonal mass is
under-priced. γ_ab is the exact pairwise term of the row cost (higher orders are left out), and it enters
the BQM as γ_ab (1 − z_a)(1 − z_b) for every pair of off-diagonal blocks of one query row of a kept head:
NQB(NQB−1)(NQB−2)/6 terms per head (4,960 at 32 × 32 blocks).

Pairs are stored as (L, H, P) weights over one (P,) pair list shared by every head (`row_pairs`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse as sp


def offdiag_blocks(nqb: int) -> tuple[np.ndarray, np.ndarray]:
    """(qb, kb) of every off-diagonal causal block, row-major (formulation's order; defined here so that
    formulation can import this module)."""
    qb, kb = np.tril_indices(nqb, k=-1)
    return qb.astype(np.int64), kb.astype(np.int64)


@lru_cache(maxsize=8)
def row_pairs(nqb: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): indices in `offdiag_blocks` order of every pair a < b of blocks that share a query row."""
    qb, _ = offdiag_blocks(nqb)
    first, second = [], []
    start = 0
    for row in range(nqb):
        n = int((qb == row).sum())
        i, j = np.triu_indices(n, k=1)
        first.append(start + i)
        second.append(start + j)
        start += n
    return np.concatenate(first).astype(np.int64), np.concatenate(second).astype(np.int64)


def pair_cost(block_field: np.ndarray) -> np.ndarray:
    """γ (…, P) in nats from row masses (…, NQB, NQB): log(1 + p_a p_b / (1 − p_a − p_b))."""
    nqb = block_field.shape[-1]
    qb, kb = offdiag_blocks(nqb)
    a, b = row_pairs(nqb)
    p = np.clip(block_field[..., qb, kb].astype(np.float64), 0.0, 1.0)
    pa, pb = p[..., a], p[..., b]
    rest = np.maximum(1.0 - pa - pb, 1e-6)  # the diagonal block always stays
    return np.log1p(pa * pb / rest)


@lru_cache(maxsize=8)
def _incidence(nqb: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(P, NB) matrices that send a pair's weight to its first / second block."""
    a, b = row_pairs(nqb)
    nb = nqb * (nqb - 1) // 2
    ones = np.ones(a.size)
    rows = np.arange(a.size)
    to_a = sp.csr_matrix((ones, (rows, a)), shape=(a.size, nb))
    to_b = sp.csr_matrix((ones, (rows, b)), shape=(a.size, nb))
    return to_a, to_b


def marginals(coupling: np.ndarray, drop: np.ndarray, nqb: int) -> np.ndarray:
    """(…, NB): Σ_b γ_ab drop_b for every block a (its coupling cost if it is dropped too).

    coupling (…, P), drop (…, NB) in [0, 1] (1 = dropped)."""
    a, b = row_pairs(nqb)
    to_a, to_b = _incidence(nqb)
    lead = coupling.shape[:-1]
    g = coupling.reshape(-1, a.size)
    d = drop.reshape(-1, drop.shape[-1]).astype(np.float64)
    out = (to_a.T @ (g * d[:, b]).T).T + (to_b.T @ (g * d[:, a]).T).T
    return np.asarray(out).reshape(*lead, -1)


def energy(coupling: np.ndarray, drop: np.ndarray, nqb: int) -> np.ndarray:
    """(…): Σ_pairs γ_ab drop_a drop_b."""
    a, b = row_pairs(nqb)
    d = drop.astype(np.float64)
    return (coupling * d[..., a] * d[..., b]).sum(-1)
