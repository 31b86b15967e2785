"""torch.library custom ops around the Triton kernels: autograd and torch.compile see one opaque op.

    gravity_sparse::gravity_fwd(q, k, v, mass_log, kv_groups, *index) -> (out (B,Hq,S,D), lse (B,Hq,S))
    gravity_sparse::gravity_bwd(dout, q, k, v, mass_log, kv_groups, out, lse, *index) -> dq, dk, dv, dmass
    gravity_sparse::gravity_decode(q, k, v, mass_log, kv_groups, mask, heads, group_table, ...) -> out

`index` are the eight prefill tensors of `block_index.prefill_tensors` (tile lists, heads, group table,
partial-tile bits). Fake (meta) implementations give
torch.compile the output shapes; the kernels themselves run eagerly inside the op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .block_index import BlockIndex, index_from_tensors, prefill_tensors
from .triton_decode import gravity_decode
from .triton_gravity import gravity_bwd, gravity_fwd


@torch.library.custom_op("gravity_sparse::gravity_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mass_log: Tensor,
    kv_groups: Tensor,
    kv_num: Tensor,
    kv_idx: Tensor,
    q_num: Tensor,
    q_idx: Tensor,
    heads: Tensor,
    group_table: Tensor,
    kv_bits: Tensor,
    q_bits: Tensor,
    block_size: int,
    first_q_block: int,
    tile_size: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    lists = (kv_num, kv_idx, q_num, q_idx, heads, group_table, kv_bits, q_bits)
    index = index_from_tensors(lists, block_size, first_q_block, tile_size)
    return gravity_fwd(q, k, v, mass_log, kv_groups, index, eps)


@_fwd_op.register_fake
def _(q, k, v, mass_log, kv_groups, *rest) -> tuple[Tensor, Tensor]:
    bsz, hq, s, _ = q.shape
    return torch.empty_like(q), q.new_empty((bsz, hq, s), dtype=torch.float32)


@torch.library.custom_op("gravity_sparse::gravity_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mass_log: Tensor,
    kv_groups: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_num: Tensor,
    kv_idx: Tensor,
    q_num: Tensor,
    q_idx: Tensor,
    heads: Tensor,
    group_table: Tensor,
    kv_bits: Tensor,
    q_bits: Tensor,
    block_size: int,
    first_q_block: int,
    tile_size: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lists = (kv_num, kv_idx, q_num, q_idx, heads, group_table, kv_bits, q_bits)
    index = index_from_tensors(lists, block_size, first_q_block, tile_size)
    return gravity_bwd(dout, q, k, v, mass_log, kv_groups, out, lse, index, eps)


@_bwd_op.register_fake
def _(dout, q, k, v, mass_log, *rest) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(mass_log),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mass_log, kv_groups, *lists, block_size, first_q_block, tile_size, eps = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mass_log, kv_groups, out, lse, *lists)
    ctx.meta = (block_size, first_q_block, tile_size, eps)


def _backward(ctx, dout: Tensor, _dlse: Tensor):
    q, k, v, mass_log, kv_groups, out, lse, *lists = ctx.saved_tensors
    dq, dk, dv, dmass = _bwd_op(dout, q, k, v, mass_log, kv_groups, out, lse, *lists, *ctx.meta)
    return (dq, dk, dv, dmass) + (None,) * 13


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("gravity_sparse::gravity_decode", mutates_args=())
def _decode_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mass_log: Tensor,
    kv_groups: Tensor,
    mask: Tensor,
    heads: Tensor,
    group_table: Tensor,
    dec_num: Tensor,
    dec_idx: Tensor,
    block_size: int,
    first_q_block: int,
    dec_longest: int,
    eps: float,
    num_splits: int,
) -> Tensor:
    index = BlockIndex(
        block_size=block_size,
        num_blocks=mask.shape[1],
        first_q_block=first_q_block,
        kv_num=dec_num,  # unused by decode
        kv_idx=dec_idx,
        q_num=dec_num,
        q_idx=dec_idx,
        heads=heads,
        group_table=group_table,
        mask=mask,
        dec_num=dec_num,
        dec_idx=dec_idx,
        dec_longest=dec_longest,
    )
    return gravity_decode(q, k, v, mass_log, kv_groups, index, eps, num_splits or None)


@_decode_op.register_fake
def _(q, *rest) -> Tensor:
    return torch.empty_like(q)


def triton_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mass_log: Tensor,
    kv_groups: Tensor,
    index: BlockIndex,
    eps: float,
) -> Tensor:
    """Block-sparse prefill forward (autograd-aware, compile-friendly): out (B, Hq, S, D)."""
    out, _ = _fwd_op(
        q, k, v, mass_log, kv_groups, *prefill_tensors(index),
        index.block_size, index.first_q_block, index.tile, float(eps),
    )  # fmt: skip
    return out


def triton_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mass_log: Tensor,
    kv_groups: Tensor,
    index: BlockIndex,
    eps: float,
    num_splits: int | None = None,
) -> Tensor:
    """Decode forward (no gradients): out (B, Hq, T, D)."""
    return _decode_op(
        q, k, v, mass_log, kv_groups, index.mask, index.heads, index.group_table,
        index.dec_num, index.dec_idx, index.block_size, index.first_q_block, index.dec_longest,
        float(eps),
        int(num_splits or 0),
    )  # fmt: skip
