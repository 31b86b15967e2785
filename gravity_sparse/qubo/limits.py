"""How large a solve may get: the block-variable limit and the block size that would fit under it.

Every off-diagonal causal block of every head is one binary variable: L·H·NQB(NQB−1)/2. Annealing and
polishing cost time and memory in proportion to that count (measured on 2 cores, `bench_solve.py`:
286k variables — Gravity-2 at 32 × 32 blocks — solve in ≈ 7 s; 1.16M — 64 × 64 — in ≈ 53 s), so the
default limit keeps a solve within the ≈ 10 s target, and a larger problem is refused up front with the
block size that would fit rather than running for minutes.
"""

from __future__ import annotations

from gravity_sparse.errors import UserError

MAX_BLOCK_VARIABLES = 1 << 19  # 524,288: Gravity-2's 36 × 16 heads fit up to 43 × 43 blocks


def block_variables(num_layers: int, num_heads: int, nqb: int) -> int:
    """Binary block variables of a model: L·H·NQB(NQB−1)/2."""
    return num_layers * num_heads * nqb * (nqb - 1) // 2


def fitting_block_size(
    num_layers: int, num_heads: int, seq_len: int, block_size: int, limit: int
) -> int:
    """The smallest block_size·2^k whose grid over seq_len stays within `limit` block variables."""
    size = max(block_size, 1)
    while block_variables(num_layers, num_heads, -(-seq_len // size)) > limit:
        size *= 2
    return size


def check_solve_size(
    num_layers: int, num_heads: int, seq_len: int, block_size: int, limit: int = MAX_BLOCK_VARIABLES
) -> None:
    """UserError (one line) if the block grid has more than `limit` variables; limit 0: no limit."""
    nqb = -(-seq_len // max(block_size, 1))
    count = block_variables(num_layers, num_heads, nqb)
    if limit and count > limit:
        fit = fitting_block_size(num_layers, num_heads, seq_len, block_size, limit)
        raise UserError(
            f"solve: {num_layers} layers × {num_heads} heads × {nqb}×{nqb} blocks = {count:,} block "
            f"variables, above the limit of {limit:,} (solve.max_block_variables); measure with "
            f"block_size={fit} ({-(-seq_len // fit)}×{-(-seq_len // fit)} blocks at seq_len "
            f"{seq_len}), or raise the limit (0 = none) and expect minutes and GBs"
        )
