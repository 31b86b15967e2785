"""Block index lists for the block-sparse kernels, in FlexAttention's layout (pure PyTorch).

A block mask (Hq, NQB, NKB) bool says which key block each query block of each head may see. The kernels
do not read it densely; they walk index lists:

    kv_num (Hq, NB) int32       number of kept key blocks of query block qb
    kv_idx (Hq, NB, NB) int32   their indices, ascending, in the first kv_num entries (rest is padding)
    q_num  (Hq, NB) int32       transposed lists: number of query blocks that see key block kb
    q_idx  (Hq, NB, NB) int32   their indices, ascending (the backward dk/dv pass walks these)
    heads  (n_kept,) int32      kept query heads: the only heads any kernel launches
    group_table (Hkv, G) int32  kept query heads of each KV head, -1 padded (backward dk/dv, decode)

with NB = ceil(Sk / block) blocks of absolute positions. Only the causal part (kb <= qb) of query blocks
that hold queries (qb >= first_q_block) is listed, and a dropped head lists nothing. The lists depend only
on (mask, head_keep, NB, first_q_block), so callers cache them across calls that share those.

For decode (a few queries against a KV cache) the query heads of one KV head share one walk over the union
of their kept key blocks (`dec_num (Hkv,)`, `dec_idx (Hkv, NB)`), so each K/V tile is read once per group.

The prefill kernels walk hardware tiles of `tile_size` = max(block, 64) positions (`launch.prefill_tile`):
mask blocks of 16 or 32 are gathered into 64-wide tiles so that the dots are 64-row wgmma tiles. Their
lists (`tkv_num`, `tkv_idx`, `tq_num`, `tq_idx`, same layout over NT = ceil(NB / (tile / block)) tiles)
list every tile holding a kept block; a tile that is not entirely kept (some block of it dropped) is
stored as −(t + 1), and only there the kernels apply the block mask per element, from `tkv_bits` /
`tq_bits` (int32, aligned with the index lists): bit (qs · R + ks) says whether the ks-th key block of
the qs-th query block of the tile is kept (R = tile / block ≤ 4, so 16 bits). With tile = block these
are the block lists themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .launch import prefill_tile


@dataclass
class BlockIndex:
    """Index lists of one (mask, head_keep, sequence extent); see the module docstring for shapes."""

    block_size: int
    num_blocks: int
    first_q_block: int
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    q_num: torch.Tensor
    q_idx: torch.Tensor
    heads: torch.Tensor
    group_table: torch.Tensor
    # decode only (the prefill custom ops carry the lists above and nothing else)
    mask: torch.Tensor | None = None  # (Hq, NB, NB) bool: causal, restricted, dropped heads cleared
    dec_num: torch.Tensor | None = None
    dec_idx: torch.Tensor | None = None
    dec_longest: int = 0  # max of dec_num, kept on the host so decode never synchronises
    # prefill hardware tiles (see the module docstring); None: the block lists (tile = block)
    tile_size: int = 0
    tkv_num: torch.Tensor | None = None
    tkv_idx: torch.Tensor | None = None
    tq_num: torch.Tensor | None = None
    tq_idx: torch.Tensor | None = None
    tkv_bits: torch.Tensor | None = None
    tq_bits: torch.Tensor | None = None

    @property
    def tile(self) -> int:
        return self.tile_size or self.block_size

    def tile_lists(self) -> tuple[torch.Tensor, ...]:
        """(kv_num, kv_idx, kv_bits, q_num, q_idx, q_bits) over hardware tiles, partial tiles encoded
        as −(t + 1); the bits are a 1-element dummy when the tile is the mask block (never read)."""
        if self.tkv_num is None:
            dummy = torch.zeros(1, 1, 1, dtype=torch.int32, device=self.kv_num.device)
            return self.kv_num, self.kv_idx, dummy, self.q_num, self.q_idx, dummy
        return (self.tkv_num, self.tkv_idx, self.tkv_bits, self.tq_num, self.tq_idx, self.tq_bits)

    def computed_blocks(self) -> int:
        """Number of (head, query block, key block) tiles a forward pass computes."""
        return int(self.kv_num.sum())


def default_kv_groups(num_heads: int, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """KV head of each query head for the standard GQA layout (consecutive query heads share a KV head)."""
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise UserError(f"{num_heads} query heads do not split into {num_kv_heads} KV head groups")
    return torch.arange(num_heads, device=device) // (num_heads // num_kv_heads)


def _sorted_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) of the True entries of each row of a (..., N) bool mask, ascending."""
    num = mask.sum(-1, dtype=torch.int32)
    # a stable sort of "not kept" puts the kept indices first, in ascending order
    idx = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def tile_lists(
    mask: torch.Tensor, block_size: int, tile_size: int, first_q_block: int
) -> tuple[torch.Tensor, ...]:
    """Tile-level (kv_num, kv_idx, kv_bits, q_num, q_idx, q_bits) of a (Hq, NB, NB) causal block mask.

    A kept tile is "full" when every block it covers is kept, counting as kept the blocks above the
    diagonal (the kernels' causal test removes them), the rows without queries and the padding past NB
    (their rows and columns are masked anyway); any other kept tile is partial: −(t + 1). See the module
    docstring for the bits.
    """
    r = tile_size // block_size
    heads, nb, _ = mask.shape
    nt = -(-nb // r)
    device = mask.device
    padded = torch.zeros(heads, nt * r, nt * r, dtype=torch.bool, device=device)
    padded[:, :nb, :nb] = mask
    pos = torch.arange(nt * r, device=device)
    free = (
        (pos.view(1, -1) > pos.view(-1, 1))  # above the diagonal: causal masking handles it
        | (pos.view(-1, 1) < first_q_block)  # rows without queries
        | (pos.view(-1, 1) >= nb)
        | (pos.view(1, -1) >= nb)
    )
    sub = padded.view(heads, nt, r, nt, r)
    kept = sub.any(dim=(2, 4))
    full = (padded | free).view(heads, nt, r, nt, r).all(dim=(2, 4)) & kept
    partial = kept & ~full
    weight = (1 << torch.arange(r * r, device=device, dtype=torch.int32)).view(r, r)  # (qs, ks)
    bits = (sub.permute(0, 1, 3, 2, 4).to(torch.int32) * weight).sum(
        dim=(-2, -1), dtype=torch.int32
    )
    out = []
    for k_mask, p_mask, b in (
        (kept, partial, bits),
        (kept.transpose(1, 2), partial.transpose(1, 2), bits.transpose(1, 2)),
    ):
        num, idx = _sorted_lists(k_mask.contiguous())
        flag = torch.gather(p_mask, 2, idx.long())
        word = torch.gather(b, 2, idx.long())
        out += [num, torch.where(flag, -idx - 1, idx).contiguous(), word.contiguous()]
    return tuple(out)


def check_mask_length(block_mask: torch.Tensor, seq_len: int, block_size: int) -> None:
    """UserError if a sequence of seq_len tokens does not fit the block mask's grid."""
    nqb, nkb = block_mask.shape[-2:]
    capacity = min(nqb, nkb) * block_size
    if seq_len > capacity:
        raise UserError(
            f"sequence of {seq_len} tokens is longer than the block mask "
            f"({min(nqb, nkb)} blocks of {block_size} = {capacity} tokens)"
        )


def build_block_index(
    block_mask: torch.Tensor | None,
    head_keep: torch.Tensor | None,
    kv_groups: torch.Tensor,
    *,
    num_kv_heads: int,
    seq_len_q: int,
    seq_len_k: int,
    block_size: int,
    device: torch.device | None = None,
) -> BlockIndex:
    """Index lists for S = seq_len_q queries at the last positions of Sk = seq_len_k keys.

    block_mask (Hq, NQB, NKB) bool or None (every causal block kept); head_keep (Hq,) bool or None;
    kv_groups (Hq,) long.
    """
    num_heads = kv_groups.numel()
    device = device or kv_groups.device
    if num_heads and (int(kv_groups.min()) < 0 or int(kv_groups.max()) >= num_kv_heads):
        raise UserError(f"kv_groups name KV heads outside 0..{num_kv_heads - 1}")
    nb = -(-seq_len_k // block_size)
    first_q_block = (seq_len_k - seq_len_q) // block_size
    causal = torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
    if block_mask is None:
        mask = causal.expand(num_heads, nb, nb).clone()
    else:
        if block_mask.dim() != 3 or block_mask.shape[0] != num_heads:
            raise UserError(
                f"block mask of shape {tuple(block_mask.shape)} does not fit {num_heads} query heads "
                "(expected (heads, query blocks, key blocks))"
            )
        check_mask_length(block_mask, seq_len_k, block_size)
        mask = block_mask[:, :nb, :nb].to(device=device, dtype=torch.bool) & causal
    if head_keep is not None:
        if head_keep.shape != (num_heads,):
            raise UserError(
                f"head_keep has shape {tuple(head_keep.shape)}, expected ({num_heads},)"
            )
        mask = mask & head_keep.to(device=device, dtype=torch.bool).view(-1, 1, 1)
    mask[:, :first_q_block] = False  # rows above the first query hold no queries
    kv_num, kv_idx = _sorted_lists(mask)
    q_num, q_idx = _sorted_lists(mask.transpose(1, 2))

    keep = (
        torch.ones(num_heads, dtype=torch.bool, device=device)
        if head_keep is None
        else head_keep.to(device=device, dtype=torch.bool)
    )
    heads = torch.nonzero(keep).flatten().to(torch.int32)
    groups = kv_groups.to(device)
    members = [heads[groups[heads.long()] == g] for g in range(num_kv_heads)]
    width = max(1, max((int(m.numel()) for m in members), default=1))
    group_table = torch.full((num_kv_heads, width), -1, dtype=torch.int32, device=device)
    for g, m in enumerate(members):
        group_table[g, : m.numel()] = m

    # decode: union over the group's heads and the query rows of the key blocks any of them sees
    rows = mask[:, first_q_block:].any(dim=1)  # (Hq, NB)
    union = torch.zeros(num_kv_heads, nb, dtype=torch.int32, device=device)
    union = union.index_add_(0, groups, rows.to(torch.int32)) > 0
    dec_num, dec_idx = _sorted_lists(union)
    tile = prefill_tile(block_size) if block_size in (16, 32) else block_size
    tiles = (None,) * 6
    if tile != block_size:
        tiles = tile_lists(mask, block_size, tile, first_q_block)
    return BlockIndex(
        block_size=block_size,
        num_blocks=nb,
        first_q_block=first_q_block,
        mask=mask.contiguous(),
        kv_num=kv_num,
        kv_idx=kv_idx,
        q_num=q_num,
        q_idx=q_idx,
        heads=heads.contiguous(),
        group_table=group_table,
        dec_num=dec_num,
        dec_idx=dec_idx,
        dec_longest=int(dec_num.max()) if dec_num.numel() else 0,
        tile_size=tile,
        tkv_num=tiles[0],
        tkv_idx=tiles[1],
        tkv_bits=tiles[2],
        tq_num=tiles[3],
        tq_idx=tiles[4],
        tq_bits=tiles[5],
    )


def prefill_tensors(index: BlockIndex) -> tuple[torch.Tensor, ...]:
    """The eight index tensors the prefill kernels read, in `index_from_tensors` order:
    kv_num, kv_idx, q_num, q_idx (tile lists), heads, group_table, kv_bits, q_bits."""
    kv_num, kv_idx, kv_bits, q_num, q_idx, q_bits = index.tile_lists()
    return (kv_num, kv_idx, q_num, q_idx, index.heads, index.group_table, kv_bits, q_bits)


def index_from_tensors(
    tensors: tuple[torch.Tensor, ...] | list[torch.Tensor],
    block_size: int,
    first_q_block: int,
    tile_size: int = 0,
) -> BlockIndex:
    """Rebuild a prefill BlockIndex from `prefill_tensors` (custom ops take tensors, not dataclasses).

    Only the tile lists travel: its kv_num/kv_idx/q_num/q_idx are the tile lists too.
    """
    kv_num, kv_idx, q_num, q_idx, heads, group_table, kv_bits, q_bits = tensors
    tile = tile_size or block_size
    tiled = tile != block_size
    return BlockIndex(
        block_size=block_size,
        num_blocks=kv_num.shape[1] * (tile // block_size),
        first_q_block=first_q_block,
        kv_num=kv_num,
        kv_idx=kv_idx,
        q_num=q_num,
        q_idx=q_idx,
        heads=heads,
        group_table=group_table,
        tile_size=tile,
        tkv_num=kv_num if tiled else None,
        tkv_idx=kv_idx if tiled else None,
        tkv_bits=kv_bits if tiled else None,
        tq_num=q_num if tiled else None,
        tq_idx=q_idx if tiled else None,
        tq_bits=q_bits if tiled else None,
    )
