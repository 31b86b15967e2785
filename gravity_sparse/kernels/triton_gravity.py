"""Triton block-sparse gravity attention: prefill forward and backward (dq, dk, dv, d mass_log).

    s_ij = M_h² / (‖q_i − k_j‖² + ε),  M_h = softplus(mass_log_h),  out_i = Σ_j softmax_j(s_ij) v_j

over the kept key blocks of each (head, query block) (lists from `block_index`), causal, queries at the
last S of Sk positions. q (B, Hq, S, D); k, v (B, Hkv, Sk, D); kv_groups (Hq,) maps query heads to KV
heads, so K/V are never repeated in memory. One program per (query tile, kept head, batch); dropped heads
are not launched and their output stays zero. A tile is the mask block from 64 rows up; mask blocks of 16
and 32 are gathered into 64-row tiles (`BlockIndex.tile_lists`), so every dot is a 64/128-row wgmma tile,
and the block mask is applied per element only on tiles that are not entirely kept (a 16-bit word per
listed tile). The inner loop walks the kept tiles in TILE_N-wide pieces (`launch.py` picks TILE_N,
num_warps and num_stages per configuration, and refuses configurations that cannot launch).

Numerics: d² = ‖q‖² + ‖k‖² − 2 q·k with the squared norms in fp32 from the unshifted inputs (exact for
16-bit inputs) and q·k a tensor-core dot of the unshifted inputs with fp32 accumulation, clamped at 0.
(Centring q and k by a common vector before the dot, the earlier scheme, rounds q − c back to 16 bits and
costs bf16 accuracy: d² errors of 0.05–0.5 at D = 128.) The score is bounded, 0 < s ≤ M²/ε, so the
online-softmax running max starts at 0. Softmax runs in base 2 (exp2), all accumulation in fp32; 16-bit
inputs feed tensor-core dots, fp32 inputs use IEEE dots.

Backward (FlashAttention-2 layout, log-sum-exp saved by the forward): with P the probabilities,
dS = P ∘ (dO Vᵀ − δ), δ_i = dO_i · O_i, and g = ∂L/∂d² = −dS · s² / M²:
    dq_i = 2 (Σ_j g_ij) q_i − 2 Σ_j g_ij k_j,   dk_j = 2 (Σ_i g_ij) k_j − 2 Σ_i g_ij q_i,   dv = Pᵀ dO,
    ∂L/∂M_h = Σ dS · 2 s / M.
g is rounded to the dot's 16-bit type once, and the same rounded g feeds Σg and the dot, so that
dq_i = 2 Σ_j g̃_ij (q_i − k_j) holds exactly: the two terms cancel when attention sits on near keys, and
an fp32 Σg beside a bf16 dot would leave their rounding difference as the error.

CPU tests (TRITON_INTERPRET=1): the interpreter's 16-bit dot is wrong (triton issue 11584) and its
fp32→bf16 cast truncates, so 16-bit inputs run with fp32 operands holding 16-bit values (EMULATE): every
rounding the GPU kernel does (inputs, p and g before their dots, outputs) is done explicitly, round to
nearest even, and the dots are exact products with fp32 sums, as on tensor cores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from .block_index import BlockIndex
from .launch import (
    LaunchConfig,
    block_d,
    check_supported,
    device_arch,
    prefill_launch,
    prefill_tile,
)

LOG2E = 1.4426950408889634
EMPTY_LSE = 1.0e30  # log-sum-exp of a row that sees no key: every exp2(s − lse) is 0

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _load_rows(ptr, row_ok, offs_d, D):
    """A (rows, BLOCK_D) tile, zero outside the valid rows and the head dimension."""
    return tl.load(ptr, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _tile_bits(word, q_loc, k_loc, MASK_BLOCK: tl.constexpr, R: tl.constexpr):
    """Bool tile of a partial hardware tile: is the mask block of (q_loc, k_loc) kept?

    q_loc, k_loc: broadcastable positions inside the tile; word: the tile's bits (block_index), bit
    (q_loc // MASK_BLOCK) · R + k_loc // MASK_BLOCK. Integer shifts only, no memory and no pointers.
    """
    shift = (q_loc // MASK_BLOCK) * R + k_loc // MASK_BLOCK
    return ((word >> shift) & 1) != 0


@triton.jit
def _to_low(x, LOW: tl.constexpr, EMULATE: tl.constexpr):
    """x rounded to the dot operand type LOW (in fp32 when EMULATE: the interpreter path)."""
    if EMULATE:
        if LOW == tl.bfloat16:  # round to nearest even by hand: the interpreter's cast truncates
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            y = b.to(tl.float32, bitcast=True)
        else:
            y = x.to(LOW).to(tl.float32)
    else:
        y = x.to(LOW)
    return y


@triton.jit
def _gravity_fwd_kernel(
    Q, K, V, QN, KN, MASS_LOG, O, LSE, HEADS, KVG, KV_NUM, KV_IDX, KV_BITS,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh, sknb, sknh,
    s_num, s_idx_h, s_idx_q,
    S, SK, Q_OFF, QB0, NQB_RUN, eps,
    BLOCK: tl.constexpr, MASK_BLOCK: tl.constexpr, TILE_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    SUB: tl.constexpr = BLOCK // TILE_N
    qb = QB0 + NQB_RUN - 1 - tl.program_id(0)  # longest rows first: better load balance
    h = tl.load(HEADS + tl.program_id(1))
    b = tl.program_id(2).to(tl.int64)
    kvh = tl.load(KVG + h)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)  # absolute positions
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (offs_m >= Q_OFF) & (offs_m < SK)
    rows = offs_m - Q_OFF
    q = _load_rows(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :], row_ok, offs_d, D)
    qn = tl.load(QN + b * slb + h * slh + rows, mask=row_ok, other=0.0)
    mass = _softplus(tl.load(MASS_LOG + h).to(tl.float32))
    mass2 = mass * mass * 1.4426950408889634  # base-2 score scale
    k_base = K + b * skb + kvh * skh
    kn_base = KN + b * sknb + kvh * sknh
    v_base = V + b * svb + kvh * svh
    idx_base = KV_IDX + h * s_idx_h + qb * s_idx_q
    bits_base = KV_BITS + h * s_idx_h + qb * s_idx_q  # same layout as the index list

    m_i = tl.zeros([BLOCK], dtype=tl.float32)  # 0 is a valid start: every score is > 0
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    n_steps = tl.load(KV_NUM + h * s_num + qb) * SUB
    for it in range(0, n_steps):
        e = tl.load(idx_base + it // SUB)  # a kept tile; −(t + 1) when only partly kept
        kb = tl.where(e < 0, -e - 1, e)
        offs_n = kb * BLOCK + (it % SUB) * TILE_N + tl.arange(0, TILE_N)
        col_ok = offs_n < SK
        k = _load_rows(k_base + offs_n[:, None] * sks + offs_d[None, :], col_ok, offs_d, D)
        kn = tl.load(kn_base + offs_n, mask=col_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        d2 = tl.maximum(qn[:, None] + kn[None, :] - 2.0 * qk, 0.0)
        s = mass2 / (d2 + eps)
        allowed = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :]
        if MASK_BLOCK < BLOCK:
            if e < 0:
                word = tl.load(bits_base + it // SUB)
                k_loc = (it % SUB) * TILE_N + tl.arange(0, TILE_N)
                q_loc = tl.arange(0, BLOCK)
                allowed = allowed & _tile_bits(
                    word, q_loc[:, None], k_loc[None, :], MASK_BLOCK, BLOCK // MASK_BLOCK
                )
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base + offs_n[:, None] * svs + offs_d[None, :], col_ok, offs_d, D)
        acc = acc * alpha[:, None] + tl.dot(_to_low(p, LOW, EMULATE), v, input_precision=PRECISION)
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
    Q, K, V, QN, KN, MASS_LOG, DO, LSE, DELTA, DQ, DMASS, HEADS, KVG, KV_NUM, KV_IDX, KV_BITS,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, sdqb, sdqh, sdqs,
    sknb, sknh, slb, slh, smb, smh, s_num, s_idx_h, s_idx_q,
    S, SK, Q_OFF, QB0, NQB_RUN, eps,
    BLOCK: tl.constexpr, MASK_BLOCK: tl.constexpr, TILE_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D: tl.constexpr,
    PRECISION: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """dq of one (query block, head, batch), and its share of Σ dS·s for the mass gradient."""
    SUB: tl.constexpr = BLOCK // TILE_N
    qb = QB0 + NQB_RUN - 1 - tl.program_id(0)
    h = tl.load(HEADS + tl.program_id(1))
    b = tl.program_id(2).to(tl.int64)
    kvh = tl.load(KVG + h)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    row_ok = (offs_m >= Q_OFF) & (offs_m < SK)
    rows = offs_m - Q_OFF
    q = _load_rows(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :], row_ok, offs_d, D)
    qn = tl.load(QN + b * slb + h * slh + rows, mask=row_ok, other=0.0)
    do = _load_rows(DO + b * sdob + h * sdoh + rows[:, None] * sdos + offs_d[None, :],
                    row_ok, offs_d, D)  # fmt: skip
    lse = tl.load(LSE + b * slb + h * slh + rows, mask=row_ok, other=1.0e30)
    delta = tl.load(DELTA + b * slb + h * slh + rows, mask=row_ok, other=0.0)
    mass = _softplus(tl.load(MASS_LOG + h).to(tl.float32))
    mass2 = mass * mass
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    kn_base = KN + b * sknb + kvh * sknh
    idx_base = KV_IDX + h * s_idx_h + qb * s_idx_q
    bits_base = KV_BITS + h * s_idx_h + qb * s_idx_q  # same layout as the index list

    dq = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    g_rows = tl.zeros([BLOCK], dtype=tl.float32)
    ds_s = tl.zeros([BLOCK], dtype=tl.float32)
    n_steps = tl.load(KV_NUM + h * s_num + qb) * SUB
    for it in range(0, n_steps):
        e = tl.load(idx_base + it // SUB)
        kb = tl.where(e < 0, -e - 1, e)
        offs_n = kb * BLOCK + (it % SUB) * TILE_N + tl.arange(0, TILE_N)
        col_ok = offs_n < SK
        k = _load_rows(k_base + offs_n[:, None] * sks + offs_d[None, :], col_ok, offs_d, D)
        kn = tl.load(kn_base + offs_n, mask=col_ok, other=0.0)
        v = _load_rows(v_base + offs_n[:, None] * svs + offs_d[None, :], col_ok, offs_d, D)
        raw = qn[:, None] + kn[None, :] - 2.0 * tl.dot(q, tl.trans(k), input_precision=PRECISION)
        r = 1.0 / (tl.maximum(raw, 0.0) + eps)
        s = mass2 * r
        allowed = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :]
        if MASK_BLOCK < BLOCK:
            if e < 0:
                word = tl.load(bits_base + it // SUB)
                k_loc = (it % SUB) * TILE_N + tl.arange(0, TILE_N)
                q_loc = tl.arange(0, BLOCK)
                allowed = allowed & _tile_bits(
                    word, q_loc[:, None], k_loc[None, :], MASK_BLOCK, BLOCK // MASK_BLOCK
                )
        p = tl.where(allowed, tl.exp2(s * 1.4426950408889634 - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        ds_s += tl.sum(ds * s, 1)
        # ∂L/∂d², rounded once: the same g in Σg and in the dot; the clamp passes no gradient below 0
        g = _to_low(tl.where(raw >= 0.0, -ds * s * r, 0.0), LOW, EMULATE)
        g_rows += tl.sum(g.to(tl.float32), 1)
        dq += tl.dot(g, k, input_precision=PRECISION)
    dq = 2.0 * (g_rows[:, None] * q.to(tl.float32) - dq)
    dq_ptr = DQ + b * sdqb + h * sdqh + rows[:, None] * sdqs + offs_d[None, :]
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    tl.store(DMASS + b * smb + h * smh + qb, tl.sum(tl.where(row_ok, ds_s, 0.0), 0))


@triton.jit
def _gravity_bwd_dkdv_kernel(
    Q, K, V, QN, KN, MASS_LOG, DO, LSE, DELTA, DK, DV, GROUPS, Q_NUM, Q_IDX, Q_BITS,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, sdkb, sdkh, sdks,
    sdvb, sdvh, sdvs, sknb, sknh, slb, slh, s_num, s_idx_h, s_idx_k, s_grp,
    S, SK, Q_OFF, GROUP_WIDTH, eps,
    BLOCK: tl.constexpr, MASK_BLOCK: tl.constexpr, TILE_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D: tl.constexpr, KEY_TILE: tl.constexpr,
    PRECISION: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """dk, dv of KEY_TILE keys of one (key tile, KV head, batch), summed over the kept query heads of
    the group (KEY_TILE divides the tile: sm_80 splits 128-key tiles in two to stay in registers).

    The inner loop walks the kept query tiles in TILE_N-row pieces.
    """
    SUB: tl.constexpr = BLOCK // TILE_N
    SUBK: tl.constexpr = BLOCK // KEY_TILE
    kb = tl.program_id(0) // SUBK
    k_off = (tl.program_id(0) % SUBK) * KEY_TILE
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = kb * BLOCK + k_off + tl.arange(0, KEY_TILE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    col_ok = offs_n < SK
    k = _load_rows(
        K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], col_ok, offs_d, D
    )
    kn = tl.load(KN + b * sknb + kvh * sknh + offs_n, mask=col_ok, other=0.0)
    v = _load_rows(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :],
                   col_ok, offs_d, D)  # fmt: skip

    dk = tl.zeros([KEY_TILE, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([KEY_TILE, BLOCK_D], dtype=tl.float32)
    g_cols = tl.zeros([KEY_TILE], dtype=tl.float32)
    for gi in range(0, GROUP_WIDTH):
        h = tl.load(GROUPS + kvh * s_grp + gi)
        if h >= 0:
            mass = _softplus(tl.load(MASS_LOG + h).to(tl.float32))
            mass2 = mass * mass
            idx_base = Q_IDX + h * s_idx_h + kb * s_idx_k
            bits_base = Q_BITS + h * s_idx_h + kb * s_idx_k
            n_steps = tl.load(Q_NUM + h * s_num + kb) * SUB
            for it in range(0, n_steps):
                e = tl.load(idx_base + it // SUB)
                qb = tl.where(e < 0, -e - 1, e)
                offs_m = qb * BLOCK + (it % SUB) * TILE_N + tl.arange(0, TILE_N)
                row_ok = (offs_m >= Q_OFF) & (offs_m < SK)
                rows = offs_m - Q_OFF
                q_ptr = Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :]
                q = _load_rows(q_ptr, row_ok, offs_d, D)
                qn = tl.load(QN + b * slb + h * slh + rows, mask=row_ok, other=0.0)
                do = _load_rows(DO + b * sdob + h * sdoh + rows[:, None] * sdos + offs_d[None, :],
                                row_ok, offs_d, D)  # fmt: skip
                lse = tl.load(LSE + b * slb + h * slh + rows, mask=row_ok, other=1.0e30)
                delta = tl.load(DELTA + b * slb + h * slh + rows, mask=row_ok, other=0.0)
                # transposed tiles (keys × queries) so the dk/dv updates are plain dots
                qk = tl.dot(k, tl.trans(q), input_precision=PRECISION)
                raw = kn[:, None] + qn[None, :] - 2.0 * qk
                r = 1.0 / (tl.maximum(raw, 0.0) + eps)
                s = mass2 * r
                allowed = (offs_n[:, None] <= offs_m[None, :]) & row_ok[None, :] & col_ok[:, None]
                if MASK_BLOCK < BLOCK:
                    if e < 0:
                        word = tl.load(bits_base + it // SUB)
                        k_loc = k_off + tl.arange(0, KEY_TILE)
                        if TILE_N <= MASK_BLOCK:  # the step sits in one query block: a key vector
                            q_loc = (it % SUB) * TILE_N
                            bits = _tile_bits(word, q_loc, k_loc, MASK_BLOCK, BLOCK // MASK_BLOCK)
                            allowed = allowed & bits[:, None]
                        else:
                            q_loc = (it % SUB) * TILE_N + tl.arange(0, TILE_N)
                            allowed = allowed & _tile_bits(
                                word,
                                q_loc[None, :],
                                k_loc[:, None],
                                MASK_BLOCK,
                                BLOCK // MASK_BLOCK,
                            )
                p = tl.where(allowed, tl.exp2(s * 1.4426950408889634 - lse[None, :]), 0.0)
                dv += tl.dot(_to_low(p, LOW, EMULATE), do, input_precision=PRECISION)
                dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds = p * (dp - delta[None, :])
                g = _to_low(tl.where(raw >= 0.0, -ds * s * r, 0.0), LOW, EMULATE)
                g_cols += tl.sum(g.to(tl.float32), 1)
                dk += tl.dot(g, q, input_precision=PRECISION)
    # k again from memory (L2): holding an fp32 copy through the loop costs registers
    k = _load_rows(
        K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :], col_ok, offs_d, D
    )
    dk = 2.0 * (g_cols[:, None] * k.to(tl.float32) - dk)
    out_ok = col_ok[:, None] & d_ok
    dk_ptr = DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdks + offs_d[None, :]
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=out_ok)
    dv_ptr = DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvs + offs_d[None, :]
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=out_ok)


# kernel name -> (jit function, element type of each pointer argument: "io" = the input dtype)
_I32 = "i32"
KERNELS = {
    "fwd": (
        _gravity_fwd_kernel,
        dict(Q="io", K="io", V="io", QN="fp32", KN="fp32", MASS_LOG="fp32", O="io", LSE="fp32",
             HEADS=_I32, KVG=_I32, KV_NUM=_I32, KV_IDX=_I32, KV_BITS=_I32),
    ),
    "dq": (
        _gravity_bwd_dq_kernel,
        dict(Q="io", K="io", V="io", QN="fp32", KN="fp32", MASS_LOG="fp32", DO="io", LSE="fp32",
             DELTA="fp32", DQ="io", DMASS="fp32", HEADS=_I32, KVG=_I32, KV_NUM=_I32, KV_IDX=_I32,
             KV_BITS=_I32),
    ),
    "dkdv": (
        _gravity_bwd_dkdv_kernel,
        dict(Q="io", K="io", V="io", QN="fp32", KN="fp32", MASS_LOG="fp32", DO="io", LSE="fp32",
             DELTA="fp32", DK="io", DV="io", GROUPS=_I32, Q_NUM=_I32, Q_IDX=_I32, Q_BITS=_I32),
    ),
}  # fmt: skip


def interpreting() -> bool:
    """True under Triton's CPU interpreter (the kernel tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the exact path (tests, references): no TF32 rounding
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_meta(
    kernel: str,
    dtype: torch.dtype,
    block: int,
    head_dim: int,
    emulate: bool = False,
    arch: int = 90,
) -> tuple[dict, LaunchConfig]:
    """Constexpr arguments and launch parameters of a prefill kernel: what the launcher passes and
    what the compile check compiles. emulate: the interpreter's fp32-operand path for 16-bit inputs;
    arch: the launch table (`launch.device_arch`)."""
    cfg = prefill_launch(kernel, dtype, block, head_dim, arch)
    constexprs = dict(
        BLOCK=prefill_tile(block),
        MASK_BLOCK=block,
        TILE_N=cfg.tile_n,
        BLOCK_D=block_d(head_dim),
        D=head_dim,
        PRECISION="ieee" if emulate else precision(dtype),
        LOW=_TL_DTYPES[dtype],
        EMULATE=emulate,
    )
    if kernel == "dkdv":
        constexprs["KEY_TILE"] = cfg.tile_m
    return constexprs, cfg


def _prepare(dtype: torch.dtype, block: int, head_dim: int, device: torch.device):
    """Checks and the emulation switch of one launch: (emulate, compute dtype of the kernel inputs)."""
    check_supported(dtype, block, head_dim, gpu=device.type == "cuda" and not interpreting())
    emulate = interpreting() and dtype != torch.float32
    return emulate, (torch.float32 if emulate else dtype)


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x‖² over the last dim in fp32, from the values as given (no shift): (B, H, S) contiguous."""
    return x.float().square().sum(-1).contiguous()


def _launch_shape(index: BlockIndex, s: int, sk: int) -> tuple[int, int, int]:
    """Query offset, first query tile and number of query tiles of a prefill launch."""
    q_off, tile = sk - s, index.tile
    qb0 = q_off // tile
    return q_off, qb0, (sk - 1) // tile - qb0 + 1


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
    dtype = q.dtype
    n_heads = index.heads.numel()
    emulate, work = _prepare(dtype, index.block_size, d, q.device)
    # only dropped heads are never written: they alone need zeros
    out = (torch.empty if n_heads == hq else torch.zeros)(q.shape, device=q.device, dtype=work)
    lse = torch.full((bsz, hq, s), EMPTY_LSE, device=q.device, dtype=torch.float32)
    if n_heads == 0 or s == 0:
        return out.to(dtype), lse
    q, k, v = (t.to(work).contiguous() for t in (q, k, v))
    qn, kn = squared_norms(q), squared_norms(k)
    q_off, qb0, nqb_run = _launch_shape(index, s, sk)
    meta, cfg = kernel_meta("fwd", dtype, index.block_size, d, emulate, device_arch(q.device))
    assert cfg.tile_m == index.tile, (cfg.tile_m, index.tile)
    kv_num, kv_idx, kv_bits, _, _, _ = index.tile_lists()
    _gravity_fwd_kernel[(nqb_run, n_heads, bsz)](
        q, k, v, qn, kn, mass_log, out, lse, index.heads, kv_groups, kv_num, kv_idx, kv_bits,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), kn.stride(0), kn.stride(1),
        kv_num.stride(0), kv_idx.stride(0), kv_idx.stride(1),
        s, sk, q_off, qb0, nqb_run, float(eps),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    )  # fmt: skip
    return out.to(dtype), lse


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
    dtype = q.dtype
    emulate, work = _prepare(dtype, index.block_size, d, q.device)
    dq = torch.zeros(q.shape, device=q.device, dtype=work)
    dk = torch.zeros(k.shape, device=q.device, dtype=work)
    dv = torch.zeros(v.shape, device=q.device, dtype=work)
    n_heads = index.heads.numel()
    if n_heads == 0 or s == 0:
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), torch.zeros_like(mass_log)
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, Hq, S)
    q, k, v, dout = (t.to(work).contiguous() for t in (q, k, v, dout))
    qn, kn = squared_norms(q), squared_norms(k)
    q_off, qb0, nqb_run = _launch_shape(index, s, sk)
    kv_num, kv_idx, kv_bits, q_num, q_idx, q_bits = index.tile_lists()
    nt = kv_num.shape[1]  # tiles (= blocks when the tile is the mask block)
    dmass_part = torch.zeros(bsz, hq, nt, device=q.device, dtype=torch.float32)
    meta, cfg = kernel_meta("dq", dtype, index.block_size, d, emulate, device_arch(q.device))
    _gravity_bwd_dq_kernel[(nqb_run, n_heads, bsz)](
        q, k, v, qn, kn, mass_log, dout, lse, delta, dq, dmass_part,
        index.heads, kv_groups, kv_num, kv_idx, kv_bits,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), kn.stride(0), kn.stride(1),
        lse.stride(0), lse.stride(1), dmass_part.stride(0), dmass_part.stride(1),
        kv_num.stride(0), kv_idx.stride(0), kv_idx.stride(1),
        s, sk, q_off, qb0, nqb_run, float(eps),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    )  # fmt: skip
    meta, cfg = kernel_meta("dkdv", dtype, index.block_size, d, emulate, device_arch(q.device))
    _gravity_bwd_dkdv_kernel[(nt * (index.tile // cfg.tile_m), hkv, bsz)](
        q, k, v, qn, kn, mass_log, dout, lse, delta, dk, dv,
        index.group_table, q_num, q_idx, q_bits,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        kn.stride(0), kn.stride(1), lse.stride(0), lse.stride(1),
        q_num.stride(0), q_idx.stride(0), q_idx.stride(1),
        index.group_table.stride(0),
        s, sk, q_off, index.group_table.shape[1], float(eps),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    )  # fmt: skip
    # ∂L/∂mass_log = Σ dS·s · 2/M · sigmoid(mass_log)
    mass = F.softplus(mass_log.detach().float())
    ds_s = dmass_part.sum(dim=(0, 2))
    dmass_log = ds_s * 2.0 / mass * torch.sigmoid(mass_log.detach().float())
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), dmass_log.to(mass_log.dtype)
