"""The reference backend: the dense PyTorch specification, `modeling_gravity.gravity_attention_reference`.

A thin wrapper (one code path for the math): q (B, Hq, S, D), k/v (B, Hkv, Sk, D) -> (B, Hq, S, D),
fp32 math, autograd through plain torch ops. Every other backend is tested against it.
"""

from __future__ import annotations

import torch

from ..model.modeling_gravity import gravity_attention_reference


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    *,
    eps: float = 0.1,
    block_mask: torch.Tensor | None = None,
    head_keep: torch.Tensor | None = None,
    block_size: int | None = None,
    kv_groups: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense gravity attention with the block and head masks applied; see the module docstring."""
    out, _ = gravity_attention_reference(
        q,
        k,
        v,
        mass_log,
        eps=eps,
        block_mask=block_mask,
        head_keep=head_keep,
        block_size=block_size if block_mask is not None else None,
        attention_mask=attention_mask,
        kv_groups=kv_groups,
    )
    return out


def is_plain_causal(attention_mask: torch.Tensor, seq_len_q: int, seq_len_k: int) -> bool:
    """True if a transformers mask (B, 1|H, S, Sk') allows exactly the causal prefix of every query."""
    mask = attention_mask[..., -seq_len_k:]
    if mask.shape[-2] != seq_len_q or mask.shape[-1] != seq_len_k:
        return False
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    q_pos = torch.arange(seq_len_k - seq_len_q, seq_len_k, device=mask.device)
    causal = torch.arange(seq_len_k, device=mask.device).view(1, -1) <= q_pos.view(-1, 1)
    return bool((allowed == causal).all())
