"""Triton block-sparse gravity attention: prefill forward and backward (dq, dk, dv, d mass_log).

    s_ij = M_h² / (‖q_i − k_j‖² + ε),  M_h = softplus(mass_log_h),  out_i = Σ_j softmax_j(s_ij) v_j

over the kept key blocks of each (head, query block) (lists from `block_index`), causal, queries at the
last S of Sk positions. q (B, Hq, S, D); k, v (B, Hkv, Sk, D); kv_groups (Hq,) maps query heads to KV
heads, so K/V are never repeated in memory. One program per (query block, kept head, batch); dropped heads
are not launched and their output stays zero. Tiles are one mask block square.

Numerics: q and k are centred by one vector per (batch, KV head) (the mean key) before
‖q‖² + ‖k‖² − 2 q·k, which is exact for the distance and keeps the cancellation small; d² is clamped at 0.
The score is bounded, 0 < s ≤ M²/ε, so the online-softmax running max starts at 0. Softmax runs in base 2
(exp2), all accumulation in fp32; 16-bit inputs feed tensor-core dots, fp32 inputs use IEEE dots.

Backward (FlashAttention-2 layout, log-sum-exp saved by the forward): with P the probabilities,
dS = P ∘ (dO Vᵀ − δ), δ_i = dO_i · O_i, and g = ∂L/∂d² = −dS · s² / M²:
    dq_i = 2 (Σ_j g_ij) q_i − 2 Σ_j g_ij k_j,   dk_j = 2 (Σ_i g_ij) k_j − 2 Σ_i g_ij q_i,   dv = Pᵀ dO,
    ∂L/∂M_h = Σ dS · 2 s / M.
The centring vector drops out of every gradient (a common shift), so it is treated as a constant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from .block_index import BlockIndex

LOG2E = 1.4426950408889634
EMPTY_LSE = 1.0e30  # log-sum-exp of a row that sees no key: every exp2(s − lse) is 0


@triton.jit
def _load_rows(ptr, row_ok, offs_d, D):
    """A (rows, BLOCK_D) tile, zero outside the valid rows and the head dimension."""
    return tl.load(ptr, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _gravity_fwd_kernel(
    Q, K, V, QN, KN, MASS_LOG, O, LSE, HEADS, KVG, KV_NUM, KV_IDX,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh, sknb, sknh,
    s_num, s_idx_h, s_idx_q,
    S, SK, D, Q_OFF, QB0, NQB_RUN, eps,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    qb = QB0 + NQB_RUN - 1 - tl.program_id(0)  # longest rows first: better load balance
    h = tl.load(HEADS + tl.program_id(1))
    b = tl.program_id(2).to(tl.int64)
    kvh = tl.load(KVG + h)
    LOW = Q.dtype.element_ty
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)  # absolute positions
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_m >= Q_OFF) & (offs_m < SK)
    rows = offs_m - Q_OFF
    qc = _load_rows(
        Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :], row_ok, offs_d, D
    )
    qn = tl.load(QN + b * slb + h * slh + rows, mask=row_ok, other=0.0)
    mass = _softplus(tl.load(MASS_LOG + h).to(tl.float32))
    mass2 = mass * mass * 1.4426950408889634  # base-2 score scale
    k_base = K + b * skb + kvh * skh
    kn_base = KN + b * sknb + kvh * sknh
    v_base = V + b * svb + kvh * svh

    m_i = tl.zeros([BLOCK], dtype=tl.float32)  # 0 is a valid start: every score is > 0
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    n_blocks = tl.load(KV_NUM + h * s_num + qb)
    for j in range(0, n_blocks):
        kb = tl.load(KV_IDX + h * s_idx_h + qb * s_idx_q + j)
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        col_ok = offs_n < SK
        kc = _load_rows(k_base + offs_n[:, None] * sks + offs_d[None, :], col_ok, offs_d, D)
        kn = tl.load(kn_base + offs_n, mask=col_ok, other=0.0)
        qk = tl.dot(qc, tl.trans(kc), input_precision=PRECISION)
        d2 = tl.maximum(qn[:, None] + kn[None, :] - 2.0 * qk, 0.0)
        s = mass2 / (d2 + eps)
        allowed = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * svs + offs_d[None, :],
            mask=col_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(LOW), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    lse = tl.where(seen, m_i + tl.log2(l_safe), 1.0e30)
    tl.store(LSE + b * slb + h * slh + rows, lse, mask=row_ok)


@triton.jit
def _gravity_bwd_dq_kernel(
    Q, K, V, QN, KN, MASS_LOG, DO, LSE, DELTA, DQ, DMASS, HEADS, KVG, KV_NUM, KV_IDX,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, sdqb, sdqh, sdqs,
    sknb, sknh, slb, slh, smb, smh, s_num, s_idx_h, s_idx_q,
    S, SK, D, Q_OFF, QB0, NQB_RUN, eps,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq of one (query block, head, batch), and its share of Σ dS·s for the mass gradient."""
    qb = QB0 + NQB_RUN - 1 - tl.program_id(0)
    h = tl.load(HEADS + tl.program_id(1))
    b = tl.program_id(2).to(tl.int64)
    kvh = tl.load(KVG + h)
    LOW = Q.dtype.element_ty
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    row_ok = (offs_m >= Q_OFF) & (offs_m < SK)
    rows = offs_m - Q_OFF
    qc = _load_rows(
        Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :], row_ok, offs_d, D
    )
    qf = qc.to(tl.float32)
    qn = tl.load(QN + b * slb + h * slh + rows, mask=row_ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdos + offs_d[None, :],
                 mask=row_ok[:, None] & d_ok, other=0.0)  # fmt: skip
    lse = tl.load(LSE + b * slb + h * slh + rows, mask=row_ok, other=1.0e30)
    delta = tl.load(DELTA + b * slb + h * slh + rows, mask=row_ok, other=0.0)
    mass = _softplus(tl.load(MASS_LOG + h).to(tl.float32))
    mass2 = mass * mass
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    kn_base = KN + b * sknb + kvh * sknh

    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    g_rows = tl.zeros([BLOCK], dtype=tl.float32)
    ds_s = tl.zeros([BLOCK], dtype=tl.float32)
    n_blocks = tl.load(KV_NUM + h * s_num + qb)
    for j in range(0, n_blocks):
        kb = tl.load(KV_IDX + h * s_idx_h + qb * s_idx_q + j)
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        col_ok = offs_n < SK
        kc = _load_rows(k_base + offs_n[:, None] * sks + offs_d[None, :], col_ok, offs_d, D)
        kn = tl.load(kn_base + offs_n, mask=col_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok, other=0.0)  # fmt: skip
        raw = qn[:, None] + kn[None, :] - 2.0 * tl.dot(qc, tl.trans(kc), input_precision=PRECISION)
        r = 1.0 / (tl.maximum(raw, 0.0) + eps)
        s = mass2 * r
        allowed = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :]
        p = tl.where(allowed, tl.exp2(s * 1.4426950408889634 - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        ds_s += tl.sum(ds * s, 1)
        g = tl.where(raw >= 0.0, -ds * s * r, 0.0)  # ∂L/∂d²; the clamp passes no gradient below 0
        g_rows += tl.sum(g, 1)
        dq += tl.dot(g.to(LOW), kc, input_precision=PRECISION)
    dq = 2.0 * (g_rows[:, None] * qf - dq)
    dq_ptr = DQ + b * sdqb + h * sdqh + rows[:, None] * sdqs + offs_d[None, :]
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    tl.store(DMASS + b * smb + h * smh + qb, tl.sum(tl.where(row_ok, ds_s, 0.0), 0))


@triton.jit
def _gravity_bwd_dkdv_kernel(
    Q, K, V, QN, KN, MASS_LOG, DO, LSE, DELTA, DK, DV, GROUPS, Q_NUM, Q_IDX,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, sdkb, sdkh, sdks,
    sdvb, sdvh, sdvs, sknb, sknh, slb, slh, s_num, s_idx_h, s_idx_k, s_grp,
    S, SK, D, Q_OFF, GROUP_WIDTH, eps,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv of one (key block, KV head, batch), summed over the kept query heads of the group."""
    kb = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    LOW = K.dtype.element_ty
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    col_ok = offs_n < SK
    kc = _load_rows(
        K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], col_ok, offs_d, D
    )
    kf = kc.to(tl.float32)
    kn = tl.load(KN + b * sknb + kvh * sknh + offs_n, mask=col_ok, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :],
                mask=col_ok[:, None] & d_ok, other=0.0)  # fmt: skip

    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    g_cols = tl.zeros([BLOCK], dtype=tl.float32)
    for gi in range(0, GROUP_WIDTH):
        h = tl.load(GROUPS + kvh * s_grp + gi)
        if h >= 0:
            mass = _softplus(tl.load(MASS_LOG + h).to(tl.float32))
            mass2 = mass * mass
            n_blocks = tl.load(Q_NUM + h * s_num + kb)
            for j in range(0, n_blocks):
                qb = tl.load(Q_IDX + h * s_idx_h + kb * s_idx_k + j)
                offs_m = qb * BLOCK + tl.arange(0, BLOCK)
                row_ok = (offs_m >= Q_OFF) & (offs_m < SK)
                rows = offs_m - Q_OFF
                q_ptr = Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :]
                qc = _load_rows(q_ptr, row_ok, offs_d, D)
                qn = tl.load(QN + b * slb + h * slh + rows, mask=row_ok, other=0.0)
                do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdos + offs_d[None, :],
                             mask=row_ok[:, None] & d_ok, other=0.0)  # fmt: skip
                lse = tl.load(LSE + b * slb + h * slh + rows, mask=row_ok, other=1.0e30)
                delta = tl.load(DELTA + b * slb + h * slh + rows, mask=row_ok, other=0.0)
                # transposed tiles (keys × queries) so the dk/dv updates are plain dots
                qk = tl.dot(kc, tl.trans(qc), input_precision=PRECISION)
                raw = kn[:, None] + qn[None, :] - 2.0 * qk
                r = 1.0 / (tl.maximum(raw, 0.0) + eps)
                s = mass2 * r
                allowed = (offs_n[:, None] <= offs_m[None, :]) & row_ok[None, :] & col_ok[:, None]
                p = tl.where(allowed, tl.exp2(s * 1.4426950408889634 - lse[None, :]), 0.0)
                dv += tl.dot(p.to(LOW), do, input_precision=PRECISION)
                dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds = p * (dp - delta[None, :])
                g = tl.where(raw >= 0.0, -ds * s * r, 0.0)
                g_cols += tl.sum(g, 1)
                dk += tl.dot(g.to(LOW), qc, input_precision=PRECISION)
    dk = 2.0 * (g_cols[:, None] * kf - dk)
    out_ok = col_ok[:, None] & d_ok
    dk_ptr = DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdks + offs_d[None, :]
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=out_ok)
    dv_ptr = DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvs + offs_d[None, :]
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=out_ok)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the exact path (tests, references): no TF32 rounding
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def center_inputs(
    q: torch.Tensor, k: torch.Tensor, kv_groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred q, k in their dtype and fp32 squared norms (B, H, S) of the rounded centred values.

    The centre is the mean key of each (batch, KV head), the reference's choice; done once here so the
    kernels' inner loops only load.
    """
    center = k.mean(dim=2, keepdim=True, dtype=torch.float32)  # (B, Hkv, 1, D)
    qc = (q.float() - center.index_select(1, kv_groups.long())).to(q.dtype)
    kc = (k.float() - center).to(k.dtype)
    qn = qc.float().square().sum(-1)
    kn = kc.float().square().sum(-1)
    return qc.contiguous(), kc.contiguous(), qn.contiguous(), kn.contiguous()


def _launch_shape(index: BlockIndex, s: int, sk: int) -> tuple[int, int, int]:
    q_off = sk - s
    qb0 = q_off // index.block_size
    return q_off, qb0, (sk - 1) // index.block_size - qb0 + 1


def gravity_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    kv_groups: torch.Tensor,
    index: BlockIndex,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: out (B, Hq, S, D) in q's dtype and base-2 log-sum-exp (B, Hq, S) fp32."""
    bsz, hq, s, d = q.shape
    sk = k.shape[2]
    n_heads = index.heads.numel()
    # only dropped heads are never written: they alone need zeros
    out = torch.empty_like(q) if n_heads == hq else torch.zeros_like(q)
    lse = torch.full((bsz, hq, s), EMPTY_LSE, device=q.device, dtype=torch.float32)
    if n_heads == 0 or s == 0:
        return out, lse
    qc, kc, qn, kn = center_inputs(q, k, kv_groups)
    v = v.contiguous()
    q_off, qb0, nqb_run = _launch_shape(index, s, sk)
    _gravity_fwd_kernel[(nqb_run, n_heads, bsz)](
        qc, kc, v, qn, kn, mass_log, out, lse, index.heads, kv_groups, index.kv_num, index.kv_idx,
        qc.stride(0), qc.stride(1), qc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), kn.stride(0), kn.stride(1),
        index.kv_num.stride(0), index.kv_idx.stride(0), index.kv_idx.stride(1),
        s, sk, d, q_off, qb0, nqb_run, float(eps),
        BLOCK=index.block_size, BLOCK_D=_block_d(d), PRECISION=_precision(q.dtype),
    )  # fmt: skip
    return out, lse


def gravity_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    kv_groups: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    index: BlockIndex,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv, d mass_log) with the shapes and dtypes of (q, k, v, mass_log)."""
    bsz, hq, s, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    n_heads = index.heads.numel()
    if n_heads == 0 or s == 0:
        return dq, dk, dv, torch.zeros_like(mass_log)
    qc, kc, qn, kn = center_inputs(q, k, kv_groups)
    v, dout = v.contiguous(), dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, Hq, S)
    q_off, qb0, nqb_run = _launch_shape(index, s, sk)
    nb = index.num_blocks
    dmass_part = torch.zeros(bsz, hq, nb, device=q.device, dtype=torch.float32)
    meta = dict(BLOCK=index.block_size, BLOCK_D=_block_d(d), PRECISION=_precision(q.dtype))
    _gravity_bwd_dq_kernel[(nqb_run, n_heads, bsz)](
        qc, kc, v, qn, kn, mass_log, dout, lse, delta, dq, dmass_part,
        index.heads, kv_groups, index.kv_num, index.kv_idx,
        qc.stride(0), qc.stride(1), qc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), kn.stride(0), kn.stride(1),
        lse.stride(0), lse.stride(1), dmass_part.stride(0), dmass_part.stride(1),
        index.kv_num.stride(0), index.kv_idx.stride(0), index.kv_idx.stride(1),
        s, sk, d, q_off, qb0, nqb_run, float(eps), **meta,
    )  # fmt: skip
    _gravity_bwd_dkdv_kernel[(nb, hkv, bsz)](
        qc, kc, v, qn, kn, mass_log, dout, lse, delta, dk, dv,
        index.group_table, index.q_num, index.q_idx,
        qc.stride(0), qc.stride(1), qc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        kn.stride(0), kn.stride(1), lse.stride(0), lse.stride(1),
        index.q_num.stride(0), index.q_idx.stride(0), index.q_idx.stride(1),
        index.group_table.stride(0),
        s, sk, d, q_off, index.group_table.shape[1], float(eps), **meta,
    )  # fmt: skip
    # ∂L/∂mass_log = Σ dS·s · 2/M · sigmoid(mass_log)
    mass = F.softplus(mass_log.detach().float())
    ds_s = dmass_part.sum(dim=(0, 2))
    dmass_log = ds_s * 2.0 / mass * torch.sigmoid(mass_log.detach().float())
    return dq, dk, dv, dmass_log.to(mass_log.dtype)
