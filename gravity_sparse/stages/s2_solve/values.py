"""What the block QUBO's terms are made of: block values and row-coupling pair costs from a measured field."""

from __future__ import annotations

import numpy as np
import torch

from gravity_sparse.errors import UserError
from gravity_sparse.qubo import coupling
from gravity_sparse.qubo.formulation import offdiag_blocks
from gravity_sparse.qubo.profile import profile_field
from gravity_sparse.stages.s2_solve.config import ABSOLUTE_BLOCK_VALUES


def block_values(field: dict[str, torch.Tensor], kind: str) -> np.ndarray:
    """(L, H, NQB, NQB) what the QUBO's block terms use.

    Row shares (each causal row sums to 1, scaled by `build_terms`): mass, the block field itself (mean
    attention mass); kl, each block's share of its row's drop cost −log(1 − p_qb) averaged over the
    row's queries (measure's `block_cost`): a block that a few queries cannot do without (the previous
    block, for the first queries of a block) is worth more than its mean mass says; profile, the head's
    distance profile (see `profile_field`).
    Absolute, in nats: grad, −∂loss/∂β per block (measure's `block_grad`), the first-order loss change of
    dropping it, of either sign: a block the model is better without has a negative value; grad_abs,
    the mean over sequences of |∂loss_s/∂β| (`block_grad_abs`), the first-order saliency.
    """
    if kind in ABSOLUTE_BLOCK_VALUES:
        key = "block_grad" if kind == "grad" else "block_grad_abs"
        if key not in field:
            raise UserError(
                f"the field has no {key}: re-run measure with measure.block_grad=true (and "
                "measure.importance grad or both), or choose another solve.block_value"
            )
        values = field[key].double().numpy()
        return -values if kind == "grad" else values
    if kind == "mass":
        return field["block_field"].double().numpy()
    if kind == "profile":
        return profile_field(field["profile"], field["block_field"])
    if "block_cost" not in field:
        raise UserError(
            "the field has no block_cost (measured by an older version?): re-run measure, "
            "or set solve.block_value=mass"
        )
    cost = field["block_cost"].double().numpy()
    nqb = cost.shape[-1]
    cost = cost * np.tril(np.ones((nqb, nqb)))
    return cost / np.maximum(cost.sum(-1, keepdims=True), 1e-12)


def row_coupling(field: dict[str, torch.Tensor], kind: str, weight: float) -> np.ndarray | None:
    """(L, H, P) the row-coupling pair costs γ_ab (`qubo.coupling`) in the row-share units of
    `block_values(field, kind)`, times `weight`; None when weight is 0.

    γ comes from the measured mean masses (block_field); it is divided by the same row normaliser as the
    block values: the row's summed drop cost Σ −log(1 − p) for kl, its mass (≈ 1) for mass and profile.
    """
    if not weight:
        return None
    masses = field["block_field"].double().numpy()
    nqb = masses.shape[-1]
    lower = np.tril(np.ones((nqb, nqb)))
    if kind == "kl":
        rows = (field["block_cost"].double().numpy() * lower).sum(-1)
    else:
        rows = (masses * lower).sum(-1)
    qb, _ = offdiag_blocks(nqb)
    first, _ = coupling.row_pairs(nqb)
    norm = np.maximum(rows[..., qb[first]], 1e-12)
    return weight * coupling.pair_cost(masses) / norm
