"""The flex backend: torch FlexAttention with a gravity `score_mod` and a BlockMask of the same block mask.

FlexAttention computes score = q·k (scale 1) and hands it to `score_mod`, which turns it into the gravity
score with squared norms precomputed in fp32 from the unshifted q and k (as the Triton kernel does;
centring q and k and rounding them back to bf16 costs accuracy):

    d² = max(‖q_i‖² + ‖k_j‖² − 2 score, 0),   s = M_h² / (d² + ε)

The BlockMask is built from the same index lists as the Triton kernel (kept off-diagonal blocks as "full"
blocks that skip mask_mod, diagonal blocks as partial ones), and `mask_mod` encodes the block mask as well
because eager FlexAttention ignores the block lists. q (B, Hq, S, D), k/v (B, Hkv, Sk, D) -> (B, Hq, S, D).
Eager mode materialises the scores (fine for tests); pass `compiled=True` for the fused kernel (GPU).
The compiled kernel gets `flex_kernel_options` (tiles that divide the mask block: torch's default sm_90
forward tile is 128 query rows, which a 64-row block mask rejects) and is compiled with dynamic shapes,
so a sweep over sequence lengths does not hit dynamo's recompile limit and fall back to eager (which
materialises B·H·S² scores).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .block_index import BlockIndex

_compiled_flex = None
_last_mask: tuple | None = None  # (index, S, Sk, BlockMask): repeated calls reuse the BlockMask


def _flex_fn(compiled: bool):
    global _compiled_flex
    if not compiled:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def flex_kernel_options(block_size: int, head_dim: int) -> dict:
    """FlexAttention tiles that divide the mask block (forward BLOCK_M/N, backward BLOCK_M1/N1/M2/N2).

    torch requires SPARSE_Q_BLOCK_SIZE % BLOCK_M == 0 and SPARSE_KV_BLOCK_SIZE % BLOCK_N == 0 (and the
    same for the backward tiles); its default sm_90 forward tile is 128 rows.
    """
    fwd = min(block_size, 128)
    small = min(block_size, 32 if head_dim > 64 else 64)
    opts = {
        "BLOCK_M": fwd,
        "BLOCK_N": min(block_size, 64 if head_dim > 64 else 128),
        "BLOCK_M1": small,
        "BLOCK_N1": min(block_size, 64),
        "BLOCK_M2": min(block_size, 64),
        "BLOCK_N2": small,
        "num_warps": 8 if fwd == 128 else 4,
        "num_stages": 2 if head_dim > 64 else 3,
    }
    return opts


def flex_block_mask(index: BlockIndex, seq_len_q: int, seq_len_k: int) -> BlockMask:
    """A FlexAttention BlockMask for the queries at the last seq_len_q of seq_len_k positions."""
    bs = index.block_size
    q_off = seq_len_k - seq_len_q
    mask = index.mask  # (Hq, NB, NB) bool, causal, dropped heads cleared

    def mask_mod(b, h, q_idx, kv_idx):
        q_abs = q_idx + q_off
        return (kv_idx <= q_abs) & mask[h, q_abs // bs, kv_idx // bs]

    if q_off % bs:
        # query tiles straddle mask rows: let FlexAttention derive its own lists from mask_mod
        return create_block_mask(
            mask_mod, None, mask.shape[0], seq_len_q, seq_len_k, device=mask.device, BLOCK_SIZE=bs
        )
    rows = mask[:, index.first_q_block :]  # (Hq, NQB_run, NB)
    nqb = rows.shape[1]
    qb = torch.arange(index.first_q_block, index.first_q_block + nqb, device=mask.device)
    kb = torch.arange(mask.shape[2], device=mask.device)
    diagonal = rows & (kb.view(1, 1, -1) == qb.view(1, -1, 1))
    full = rows & ~diagonal  # strictly below the diagonal: every position allowed, no mask_mod
    lists = []
    for part in (diagonal, full):
        num = part.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~part).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
        lists += [num[None].contiguous(), idx[None].contiguous()]  # (1, Hq, NQB, NB)
    return BlockMask.from_kv_blocks(
        lists[0],
        lists[1],
        lists[2],
        lists[3],
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(seq_len_q, seq_len_k),
    )


def flex_gravity_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    kv_groups: torch.Tensor,
    index: BlockIndex,
    *,
    eps: float = 0.1,
    block_mask: BlockMask | None = None,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Gravity attention through FlexAttention; `block_mask` may be a prebuilt `flex_block_mask`."""
    bsz, hq, s, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if compiled is None:
        compiled = q.is_cuda
    if not torch.is_grad_enabled():  # FlexAttention refuses inputs that require grad on CPU
        q, k, v, mass_log = q.detach(), k.detach(), v.detach(), mass_log.detach()
    groups = kv_groups.long()
    qc, kc = q, k
    standard = hq % hkv == 0 and torch.equal(
        groups, torch.arange(hq, device=q.device) // (hq // hkv)
    )
    if not standard:  # an irregular pruned grouping: FlexAttention's GQA cannot express it
        kc, v = kc.index_select(1, groups), v.index_select(1, groups)
    q_norm = qc.float().square().sum(-1)  # (B, Hq, S)
    k_norm = kc.float().square().sum(-1)  # (B, Hkv or Hq, Sk)
    head_kv = groups if standard else torch.arange(hq, device=q.device)
    mass2 = F.softplus(mass_log.float()).square()

    def score_mod(score, b, h, q_idx, kv_idx):
        d2 = (q_norm[b, h, q_idx] + k_norm[b, head_kv[h], kv_idx] - 2.0 * score).clamp_min(0.0)
        return mass2[h] / (d2 + eps)

    global _last_mask
    if block_mask is None:
        if _last_mask is not None and _last_mask[0] is index and _last_mask[1:3] == (s, sk):
            block_mask = _last_mask[3]
        else:
            block_mask = flex_block_mask(index, s, sk)
            _last_mask = (index, s, sk, block_mask)
    extra = {"kernel_options": flex_kernel_options(index.block_size, d)} if compiled else {}
    out = _flex_fn(compiled)(
        qc,
        kc,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=1.0,
        enable_gqa=standard,
        **extra,
    )
    keep = torch.zeros(hq, dtype=torch.bool, device=q.device)
    keep[index.heads.long()] = True
    return torch.where(
        keep.view(1, hq, 1, 1), out, torch.zeros((), dtype=out.dtype, device=out.device)
    )
