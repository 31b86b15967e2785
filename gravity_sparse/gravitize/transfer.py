"""Layer-wise attention transfer (LoLCATs-style, Zhang et al. 2024) from dot-product to gravity attention.

For one layer, the inputs are the ORIGINAL model's normalised hidden states entering that layer's attention
(with their RoPE cos/sin) and the target is the original attention output before `o_proj`. The gravity
layer's q/k projections (weights and biases) and its per-head masses are fitted by Adam on the mean squared
error, relative to the target's variance, so layers are independent and cheap. v and o are not touched:
the values the layer mixes stay the same, only where it looks changes.

Errors are reported as relative MSE = mean((out − target)²) / var(target): 0 is perfect, uniform
attention typically scores 1.5–2 on real models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb


@dataclass
class LayerBatch:
    """What one layer's fit sees: hidden (N, S, hidden), cos/sin (N, S, D), target (N, S, Hq·D)."""

    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    target: torch.Tensor

    def rows(self, idx: slice | torch.Tensor) -> LayerBatch:
        return LayerBatch(self.hidden[idx], self.cos[idx], self.sin[idx], self.target[idx])


def _qkv(attn: torch.nn.Module, batch: LayerBatch) -> tuple[torch.Tensor, ...]:
    b, s, _ = batch.hidden.shape
    d = attn.head_dim
    q = attn.q_proj(batch.hidden).view(b, s, attn.num_heads, d).transpose(1, 2)
    k = attn.k_proj(batch.hidden).view(b, s, attn.num_key_value_heads, d).transpose(1, 2)
    v = attn.v_proj(batch.hidden).view(b, s, attn.num_key_value_heads, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, batch.cos, batch.sin)
    return q, k, v


def gravity_output(attn: torch.nn.Module, batch: LayerBatch) -> torch.Tensor:
    """The gravity layer's attention output before o_proj: (N, S, Hq·D)."""
    q, k, v = _qkv(attn, batch)
    out, _ = attn.reference_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch.target.shape)


def relative_mse(out: torch.Tensor, target: torch.Tensor) -> float:
    return float(
        (out.float() - target.float()).pow(2).mean() / target.float().var().clamp_min(1e-12)
    )


@torch.no_grad()
def median_sq_distance(attn: torch.nn.Module, batch: LayerBatch) -> float:
    """Median ‖q_i − k_j‖² over causal pairs (KV heads expanded to query heads)."""
    q, k, _ = _qkv(attn, batch)
    k = k.index_select(1, attn.gravity_kv_groups)
    d2 = torch.cdist(q.float(), k.float()).pow(2)  # (N, Hq, S, S)
    s = d2.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return float(d2[..., causal].median())


def qk_scale_for(attn: torch.nn.Module, batch: LayerBatch, target_d2: float) -> float:
    """The factor on q and k that puts the median causal ‖q − k‖² at `target_d2`."""
    return math.sqrt(target_d2 / max(median_sq_distance(attn, batch), 1e-12))


def fit_layer(
    attn: torch.nn.Module,
    train: LayerBatch,
    heldout: LayerBatch,
    *,
    steps: int,
    lr: float,
    batch_size: int = 4,
    seed: int = 0,
    on_step=None,
) -> dict[str, float]:
    """Fit q/k projections and masses of one gravity layer to the original attention output.

    Returns the relative MSE on the held-back rows before and after, and the best step. The state with the
    lowest held-back error is kept (checked every `max(1, steps // 10)` steps and at the end).
    """
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.gravity_mass_log]
    params += [p for p in (attn.q_proj.bias, attn.k_proj.bias) if p is not None]
    frozen = {n: p.requires_grad for n, p in attn.named_parameters()}
    for p in attn.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    n = train.hidden.shape[0]
    check = max(1, steps // 10)

    def held() -> float:
        with torch.no_grad():
            return relative_mse(gravity_output(attn, heldout), heldout.target)

    before = best = held()
    best_state, best_step = [p.detach().clone() for p in params], 0
    try:
        for step in range(1, steps + 1):
            idx = torch.randperm(n, generator=gen)[:batch_size]
            rows = train.rows(idx)
            out = gravity_output(attn, rows)
            loss = (out - rows.target).pow(2).mean() / rows.target.var().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(step, float(loss))
            if step % check == 0 or step == steps:
                err = held()
                if err < best:
                    best, best_step = err, step
                    best_state = [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, kept in zip(params, best_state, strict=True):
                p.copy_(kept)
        for name, p in attn.named_parameters():
            p.requires_grad_(frozen[name])
    return {"rel_mse_before": before, "rel_mse_after": best, "best_step": best_step}
