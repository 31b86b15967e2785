"""Compound head moves: never raise the energy, and fix the frozen head decision of a Gravity-2 layer."""

from __future__ import annotations

import numpy as np
import pytest

from gravity_sparse.qubo import anneal, exact
from gravity_sparse.qubo.formulation import build_subproblem, build_terms, split_state, violations
from gravity_sparse.qubo.polish import head_moves
from gravity_sparse.qubo.synthetic import synthetic_field
from gravity_sparse.stages.s2_solve.config import SolveConfig
from gravity_sparse.stages.s2_solve.solve import budget
from gravity_sparse.stages.s2_solve.values import block_values


def _terms(field, meta, cfg: SolveConfig):
    return build_terms(
        block_values(field, cfg.block_value),
        field["importance"].double().numpy(),
        field["redundancy"].double().numpy(),
        field["mass"].double().numpy(),
        field["kv_groups"].numpy(),
        num_kv=int(meta["num_kv_heads"]),
        eps=0.1,  # the synthetic field's model ε (GravityConfig default)
        mass_scale=cfg.mass_scale,
        redundancy_weight=cfg.redundancy_weight,
        kv_cost=cfg.kv_cost,
        contiguity=cfg.contiguity,
        penalty_margin=cfg.penalty_margin,
        block_scale=cfg.block_scale,
    )


@pytest.mark.parametrize("contiguity", [0.0, 0.5])
def test_head_moves_never_raise_the_energy(contiguity):
    field, meta = synthetic_field(2, 2, 1, 4, seed=7)
    terms = _terms(field, meta, SolveConfig(contiguity=contiguity))
    nb = terms.value.shape[-1]
    rng = np.random.default_rng(0)
    for layer in range(2):
        for lam in (0.2, 1.0, 3.0):
            lam *= float(terms.value.mean())
            sub = build_subproblem(terms, layer, [0, 1], lam)
            for _ in range(20):
                start = rng.integers(0, 2, sub.num_variables).astype(np.int8)
                state, _ = head_moves(sub, terms, lam, start)
                assert violations(sub, nb, state, terms.kv_groups) == 0
                assert sub.energy(state[None])[0] <= sub.energy(start[None])[0] + 1e-15


def test_polish_reaches_the_milp_optimum_on_a_gravity2_layer():
    """Layer 0 of the Gravity-2-shaped synthetic field (seed 0): annealing plus single flips froze head
    13 dropped, 2.8 % above the MILP optimum; the compound moves keep it and land on the optimum."""
    cfg = SolveConfig()
    field, meta = synthetic_field(36, 16, 2, 32, seed=0)
    terms = _terms(field, meta, cfg)
    target, _ = budget(cfg, 36, 16, 32)
    lam, mu = anneal.find_multipliers(terms, target, None, np.ones((36, 16), dtype=bool))
    sub = build_subproblem(terms, 0, list(range(16)), lam, mu)
    res = anneal.anneal_subproblem(
        sub, terms, lam, seed=0, num_reads=1, num_sweeps=500, beta_range=None, polish=True
    )
    best = exact.milp_optimum(sub)
    assert best["optimal"]
    assert exact.relative_gap(res.energy, best["energy"]) <= 5e-5
    assert split_state(sub, terms.value.shape[-1], res.state)[0][13]
