"""Triton gravity-attention decode: a few query tokens against a long KV cache, block-sparse, split-KV.

q (B, Hq, T, D) are the last T of Sk positions; k, v (B, Hkv, Sk, D). One program per
(split, KV head, batch) packs every kept query head of the KV head × the T tokens into one row tile
(R = G·T rows), so each K/V tile is read once per group, not once per query head. It walks the union
of the group's kept key blocks (`BlockIndex.dec_idx`), cut into contiguous chunks across programs
(split-KV) so that a long cache fills the GPU even at batch 1; each row still applies its own head's
block-mask row and the causal limit. A second small kernel merges the splits (normalised partial
outputs + base-2 log-sum-exps) and scatters the rows to (B, Hq, T, D).

Numerics as in `triton_gravity`: ‖q‖² and ‖k‖² in fp32 from the unshifted inputs (‖k‖² in the kernel, from
the K tile it loads anyway: no second pass over the cache), q·k a tensor-core dot. Per-call host work is a
few allocations: no synchronisation, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_index import BlockIndex
from .launch import LaunchConfig, block_d, decode_launch, decode_rows, device_arch, merge_launch
from .triton_gravity import _TL_DTYPES, _prepare, _to_low, precision

MIN_BLOCKS_PER_SPLIT = 4


@triton.jit
def _rows_of_group(GROUPS, kvh, s_grp, T, GROUP_WIDTH, Q_OFF, ROWS: tl.constexpr):
    """Row r of a group tile is (slot r // T, token r % T): its head (or -1), token and position."""
    r = tl.arange(0, ROWS)
    g = r // T
    t = r % T
    h = tl.load(GROUPS + kvh * s_grp + g, mask=g < GROUP_WIDTH, other=-1)
    return r, h, t, Q_OFF + t


@triton.jit
def _gravity_decode_kernel(
    Q, K, V, MASS_LOG, MASK, GROUPS, DEC_NUM, DEC_IDX, O_PART, L_PART,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
    smh, smq, s_grp, s_dec, sob, soh, sos, sor, slb, slh, sls,
    T, SK, Q_OFF, GROUP_WIDTH, PER_SPLIT, eps,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, TILE_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    SUB: tl.constexpr = BLOCK // TILE_N
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r, h, t, pos = _rows_of_group(GROUPS, kvh, s_grp, T, GROUP_WIDTH, Q_OFF, ROWS)
    row_ok = h >= 0
    h_safe = tl.where(row_ok, h, 0)
    qb = pos // BLOCK
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    q = tl.load(Q + b * sqb + h_safe[:, None] * sqh + t[:, None] * sqs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok, other=0.0)  # fmt: skip
    qf = q.to(tl.float32)
    qn = tl.sum(qf * qf, 1)
    x = tl.load(MASS_LOG + h_safe, mask=row_ok, other=0.0).to(tl.float32)
    mass = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))  # softplus
    mass2 = mass * mass * 1.4426950408889634  # base-2 score scale
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    mask_base = MASK + h_safe * smh + qb * smq

    m_i = tl.zeros([ROWS], dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    start = split * PER_SPLIT
    end = tl.minimum(start + PER_SPLIT, tl.load(DEC_NUM + kvh))
    for it in range(start * SUB, end * SUB):
        kb = tl.load(DEC_IDX + kvh * s_dec + it // SUB)
        offs_n = kb * BLOCK + (it % SUB) * TILE_N + tl.arange(0, TILE_N)
        col_ok = offs_n < SK
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok, other=0.0)  # fmt: skip
        kf = k.to(tl.float32)
        kn = tl.sum(kf * kf, 1)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok, other=0.0)  # fmt: skip
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        d2 = tl.maximum(qn[:, None] + kn[None, :] - 2.0 * qk, 0.0)
        s = mass2[:, None] / (d2 + eps)
        row_sees = tl.load(mask_base + kb, mask=row_ok, other=0) != 0  # the row's head keeps kb
        allowed = row_sees[:, None] & (offs_n[None, :] <= pos[:, None]) & col_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(_to_low(p, LOW, EMULATE), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o_ptr = O_PART + b * sob + kvh * soh + split * sos + r[:, None] * sor + offs_d[None, :]
    tl.store(o_ptr, acc / l_safe[:, None], mask=d_ok)
    # an empty split gets a finite, very negative weight: it vanishes in the merge without NaNs
    lse = tl.where(seen, m_i + tl.log2(l_safe), -1.0e30)
    tl.store(L_PART + b * slb + kvh * slh + split * sls + r, lse)


@triton.jit
def _gravity_decode_merge_kernel(
    O_PART, L_PART, OUT, GROUPS,
    sob, soh, sos, sor, slb, slh, sls, s_outb, s_outh, s_outs, s_grp,
    T, GROUP_WIDTH, NUM_SPLITS,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, D_CHUNK: tl.constexpr,
):  # fmt: skip
    """Weighted sum of the splits of one (KV head, batch), written to each row's (head, token)."""
    kvh = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    r, h, t, _ = _rows_of_group(GROUPS, kvh, s_grp, T, GROUP_WIDTH, 0, ROWS)
    offs_d = tl.program_id(2) * D_CHUNK + tl.arange(0, D_CHUNK)  # one chunk of the head dim
    d_ok = offs_d[None, :] < D
    m = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    w_sum = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D_CHUNK], dtype=tl.float32)
    for sp in range(0, NUM_SPLITS):
        lse = tl.load(L_PART + b * slb + kvh * slh + sp * sls + r)
        o = tl.load(O_PART + b * sob + kvh * soh + sp * sos + r[:, None] * sor + offs_d[None, :],
                    mask=d_ok, other=0.0)  # fmt: skip
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        w_sum = w_sum * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    out = acc / w_sum[:, None]
    row_ok = h >= 0
    out_ptr = OUT + b * s_outb + tl.where(row_ok, h, 0)[:, None] * s_outh
    out_ptr += t[:, None] * s_outs + offs_d[None, :]
    tl.store(out_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok)


def choose_splits(index: BlockIndex, batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Split-KV factor: enough programs to fill the GPU, at least MIN_BLOCKS_PER_SPLIT blocks each."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 1
    wanted = -(-2 * sms // max(batch * num_kv_heads, 1))
    return max(1, min(wanted, -(-index.dec_longest // MIN_BLOCKS_PER_SPLIT)))


KERNELS = {
    "decode": (
        _gravity_decode_kernel,
        dict(Q="io", K="io", V="io", MASS_LOG="fp32", MASK="i8", GROUPS="i32", DEC_NUM="i32",
             DEC_IDX="i32", O_PART="fp32", L_PART="fp32"),
    ),
    "merge": (
        _gravity_decode_merge_kernel,
        dict(O_PART="fp32", L_PART="fp32", OUT="io", GROUPS="i32"),
    ),
}  # fmt: skip


def kernel_meta(
    dtype: torch.dtype, block: int, head_dim: int, rows: int, emulate: bool = False, arch: int = 90
) -> tuple[dict, LaunchConfig]:
    """Constexprs and launch parameters of the decode kernel (launcher and compile check)."""
    cfg = decode_launch(dtype, block, head_dim, rows, arch)
    constexprs = dict(
        ROWS=rows,
        BLOCK=block,
        TILE_N=cfg.tile_n,
        BLOCK_D=block_d(head_dim),
        D=head_dim,
        PRECISION="ieee" if emulate else precision(dtype),
        LOW=_TL_DTYPES[dtype],
        EMULATE=emulate,
    )
    return constexprs, cfg


def merge_meta(head_dim: int, rows: int) -> tuple[dict, LaunchConfig]:
    """Constexprs and launch parameters of the merge kernel."""
    chunk = min(block_d(head_dim), 64)
    meta = dict(ROWS=rows, BLOCK_D=block_d(head_dim), D=head_dim, D_CHUNK=chunk)
    return meta, merge_launch(chunk, rows)


def gravity_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    kv_groups: torch.Tensor,
    index: BlockIndex,
    eps: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode forward (no autograd): out (B, Hq, T, D) in q's dtype; dropped heads output zero.

    kv_groups is not read: the group table of the index already maps KV heads to their query heads.
    """
    bsz, hq, t, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dtype = q.dtype
    emulate, work = _prepare(dtype, index.block_size, d, q.device)
    q, k, v = (x.to(work).contiguous() for x in (q, k, v))
    out = torch.zeros_like(q)
    if index.heads.numel() == 0 or index.dec_longest == 0:
        return out.to(dtype)
    table = index.group_table
    width = table.shape[1]
    rows = decode_rows(width, t)
    splits = min(num_splits or choose_splits(index, bsz, hkv, q.device), index.dec_longest)
    per_split = -(-index.dec_longest // splits)
    mask = index.mask.view(torch.int8)  # same bytes as the bool mask, no copy
    o_part = torch.empty(bsz, hkv, splits, rows, d, device=q.device, dtype=torch.float32)
    l_part = torch.empty(bsz, hkv, splits, rows, device=q.device, dtype=torch.float32)
    meta, cfg = kernel_meta(dtype, index.block_size, d, rows, emulate, device_arch(q.device))
    _gravity_decode_kernel[(splits, hkv, bsz)](
        q, k, v, mass_log, mask, table, index.dec_num, index.dec_idx, o_part, l_part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), mask.stride(1), table.stride(0), index.dec_idx.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        l_part.stride(0), l_part.stride(1), l_part.stride(2),
        t, sk, sk - t, width, per_split, float(eps),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    )  # fmt: skip
    meta, cfg = merge_meta(d, rows)
    _gravity_decode_merge_kernel[(hkv, bsz, meta["BLOCK_D"] // meta["D_CHUNK"])](
        o_part, l_part, out, table,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        l_part.stride(0), l_part.stride(1), l_part.stride(2),
        out.stride(0), out.stride(1), out.stride(2), table.stride(0),
        t, width, splits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    )  # fmt: skip
    return out.to(dtype)
