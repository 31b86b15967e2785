"""The gravity score and the dense reference attention: the specification every other path is tested against.

    score(i, j) = M_h² / (‖q_i − k_j‖² + ε),   M_h = softplus(gravity_mass_log[h]),   attn = softmax_j(score)

Self-contained (copied next to every checkpoint with modeling_gravity.py): imports only torch.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# without attention weights the reference walks the queries in chunks of at most this many scores, so a
# long sequence never holds a (B, H, S, S) tensor; every row's arithmetic is the same as unchunked
REFERENCE_CHUNK_ELEMENTS = 1 << 24


def gravity_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    mass_log: torch.Tensor,
    eps: float,
    kv_groups: torch.Tensor,
) -> torch.Tensor:
    """The score formula, for the reference and measure: raw M² / (‖q_i − k_j‖² + ε), no mask, fp32.

    q (B, Hq, S, D), k (B, Hkv, Sk, D), kv_groups (Hq,); centred by the mean key. -> (B, Hq, S, Sk).
    """
    kf = k.float().index_select(1, kv_groups.to(k.device))  # (B, Hq, Sk, D)
    center = kf.mean(dim=2, keepdim=True)
    return _centred_scores(q.float() - center, kf - center, mass_log, eps)


def _centred_scores(qc, kc, mass_log, eps) -> torch.Tensor:
    d2 = (
        qc.pow(2).sum(-1, keepdim=True)  # (B, Hq, S, 1)
        + kc.pow(2).sum(-1).unsqueeze(-2)  # (B, Hq, 1, Sk)
        - 2.0 * qc @ kc.transpose(-1, -2)  # (B, Hq, S, Sk)
    ).clamp_min(0.0)
    mass = F.softplus(mass_log.float()).view(1, -1, 1, 1)
    return mass.square() / (d2 + eps)


def gravity_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    *,
    eps: float = 0.1,
    block_mask: torch.Tensor | None = None,
    head_keep: torch.Tensor | None = None,
    block_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    kv_groups: torch.Tensor | None = None,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense gravity attention with an optional block mask and head mask: the specification.

    q (B, Hq, S, D); k, v (B, Hkv, Sk, D) with Sk ≥ S: the S queries are the last S positions of the Sk
    keys (prefill: Sk == S; cached decode: Sk = past + S). mass_log (Hq,). block_mask (Hq, NQB, NKB) bool,
    indexed by absolute positions (i // block_size, j // block_size); head_keep (Hq,) bool.
    attention_mask: (B, 1|Hq, S, Sk) bool (True = attend) or additive float, as transformers builds it;
    without it a plain causal mask applies. kv_groups (Hq,) long: KV head of each query head (default
    h // (Hq // Hkv)). Computed in fp32; returns out (B, Hq, S, D) in q's dtype and, if asked, the
    attention probabilities (B, Hq, S, Sk) fp32. Without weights, queries go in chunks of at most
    `REFERENCE_CHUNK_ELEMENTS` scores (the same arithmetic per row, no (B, Hq, S, Sk) tensor).
    """
    bsz, hq, s, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if sk < s:
        raise ValueError(f"gravity attention: {sk} keys for {s} queries")
    if kv_groups is None:
        if hkv == 0 or hq % hkv:
            raise ValueError(
                f"gravity attention: {hq} query heads do not split into {hkv} KV groups"
            )
        kv_groups = torch.arange(hq, device=q.device) // (hq // hkv)
    kv_groups = kv_groups.to(q.device)
    if block_mask is not None:
        if block_size is None:
            raise ValueError("gravity attention: a block mask needs its block size")
        nqb, nkb = block_mask.shape[-2:]
        if (sk - 1) // block_size >= min(nqb, nkb):
            raise ValueError(
                f"sequence of {sk} tokens is longer than the block mask "
                f"({min(nqb, nkb)} blocks of {block_size} = {min(nqb, nkb) * block_size} tokens)"
            )
    kf = k.float().index_select(1, kv_groups)  # (B, Hq, Sk, D)
    center = kf.mean(dim=2, keepdim=True)
    kc, vf = kf - center, v.float().index_select(1, kv_groups)
    rows = s if return_weights else max(1, REFERENCE_CHUNK_ELEMENTS // max(1, bsz * hq * sk))
    outs, weights = [], None
    for a in range(0, s, rows):
        b = min(a + rows, s)
        mask = None if attention_mask is None else attention_mask[..., a:b, :]
        probs = _reference_probs(
            q[:, :, a:b].float() - center, kc, mass_log, eps, sk - s + a, sk, mask,
            block_mask, block_size, head_keep,
        )  # fmt: skip
        outs.append((probs @ vf).to(q.dtype))
        if return_weights:
            weights = probs
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out, weights


def _reference_probs(
    qc, kc, mass_log, eps, first, sk, attention_mask, block_mask, block_size, head_keep
) -> torch.Tensor:
    """Masked probabilities (B, Hq, rows, Sk) of the queries at positions first … first + rows − 1."""
    rows, hq, device = qc.shape[2], qc.shape[1], qc.device
    scores = _centred_scores(qc, kc, mass_log, eps)
    q_pos = torch.arange(first, first + rows, device=device)
    k_pos = torch.arange(sk, device=device)
    if attention_mask is None:
        allowed = (k_pos[None, :] <= q_pos[:, None]).view(1, 1, rows, sk)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., -sk:]
    else:
        allowed = attention_mask[..., -sk:] > torch.finfo(attention_mask.dtype).min / 2
    if block_mask is not None:
        qb, kb = q_pos // block_size, k_pos // block_size
        blocks = block_mask.to(device)[:, qb][:, :, kb]  # (Hq, rows, Sk)
        allowed = allowed & blocks.unsqueeze(0)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = (
        torch.softmax(scores, dim=-1) * allowed
    )  # a row with nothing allowed yields zeros, not NaN
    if head_keep is not None:
        probs = probs * head_keep.to(device, torch.float32).view(1, hq, 1, 1)
    return probs
