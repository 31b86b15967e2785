"""measure's summary: power-law fits of the profiles and the JSON-able summary (one row per head)."""

from __future__ import annotations

from dataclasses import asdict

import torch

from gravity_sparse.stages.s1_measure.config import MeasureConfig
from gravity_sparse.stages.s1_measure.field import fit_power_law, head_locality


def power_law_fits(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Power-law fits of profiles [L, H, S] -> alpha, amp, r2, each [L, H]."""
    num_layers, heads = profile.shape[:2]
    out = torch.full((3, num_layers, heads), float("nan"))
    for layer in range(num_layers):
        for head in range(heads):
            fit = fit_power_law(profile[layer, head].numpy())
            out[:, layer, head] = torch.tensor([fit.alpha, fit.amp, fit.r2])
    return out[0], out[1], out[2]


def measure_summary(
    tensors: dict[str, torch.Tensor],
    cfg: MeasureConfig,
    loss: float,
    num_tokens: int,
    timings: dict[str, float],
    importance_method: str,
    plots: list,
) -> dict:
    """JSON-able summary: run numbers and one row per head."""
    locality = head_locality(tensors["block_field"])
    num_layers, heads = tensors["mass"].shape

    def num(x: torch.Tensor) -> float | None:
        value = float(x)
        return None if value != value else round(value, 6)  # NaN is not JSON

    rows = [
        {
            "layer": layer,
            "head": head,
            "kv_head": int(tensors["kv_groups"][layer, head]),
            **{
                key: num(tensors[key][layer, head])
                for key in ("mass", "alpha", "alpha_r2", "entropy", "importance", "importance_grad")
            },
            "locality": num(locality[layer, head]),
        }
        for layer in range(num_layers)
        for head in range(heads)
    ]
    order = sorted(rows, key=lambda r: r["locality"] or 0.0)
    return {
        "config": asdict(cfg),
        "num_sequences": num_tokens // cfg.seq_len,
        "num_tokens": num_tokens,
        "loss": round(loss, 6),
        "importance_method": importance_method,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "tokens_per_s": round(num_tokens / timings["field_s"], 1),
        "most_local": {"layer": order[-1]["layer"], "head": order[-1]["head"]},
        "least_local": {"layer": order[0]["layer"], "head": order[0]["head"]},
        "heads": rows,
        "plots": plots,
    }
