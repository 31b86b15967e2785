"""Row coupling (`solve.row_coupling`): the pair terms of −log(1 − Σp), their BQM and the solve with them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gravity_sparse.errors import UserError
from gravity_sparse.qubo import anneal, exact
from gravity_sparse.qubo import coupling as row
from gravity_sparse.qubo.formulation import (
    build_subproblem,
    build_terms,
    objective,
    offdiag_blocks,
)
from gravity_sparse.qubo.synthetic import synthetic_field
from gravity_sparse.stages.s2_solve.config import SolveConfig
from gravity_sparse.stages.s2_solve.solve import solve_field
from gravity_sparse.stages.s2_solve.values import row_coupling


def test_pairs_are_the_blocks_of_one_query_row():
    nqb = 6
    qb, _ = offdiag_blocks(nqb)
    a, b = row.row_pairs(nqb)
    want = {(i, j) for i, j in itertools.combinations(range(qb.size), 2) if qb[i] == qb[j]}
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == want
    assert a.size == nqb * (nqb - 1) * (nqb - 2) // 6


def test_pair_cost_is_the_exact_pairwise_term_of_the_row_cost():
    """−log(1 − p_a − p_b) = −log(1 − p_a) − log(1 − p_b) + γ_ab, and γ ≥ 0 (convexity)."""
    rng = np.random.default_rng(0)
    field = rng.random((2, 3, 5, 5)) * np.tril(np.ones((5, 5)))
    field /= field.sum(-1, keepdims=True)
    gamma = row.pair_cost(field)
    qb, kb = offdiag_blocks(5)
    a, b = row.row_pairs(5)
    p = field[..., qb, kb]
    pa, pb = p[..., a], p[..., b]
    np.testing.assert_allclose(
        -np.log(1 - pa - pb), -np.log(1 - pa) - np.log(1 - pb) + gamma, rtol=1e-12
    )
    assert (gamma >= 0).all() and (gamma > 0).any()


def test_marginals_and_energy_match_a_loop():
    rng = np.random.default_rng(1)
    nqb = 5
    a, b = row.row_pairs(nqb)
    gamma = rng.random((3, a.size))
    drop = (rng.random((3, nqb * (nqb - 1) // 2)) < 0.5).astype(float)
    marg = np.zeros_like(drop)
    energy = np.zeros(3)
    for p in range(a.size):
        marg[:, a[p]] += gamma[:, p] * drop[:, b[p]]
        marg[:, b[p]] += gamma[:, p] * drop[:, a[p]]
        energy += gamma[:, p] * drop[:, a[p]] * drop[:, b[p]]
    np.testing.assert_allclose(row.marginals(gamma, drop, nqb), marg, rtol=1e-12)
    np.testing.assert_allclose(row.energy(gamma, drop, nqb), energy, rtol=1e-12)


def _coupled_terms(seed: int, layers: int, heads: int, kv: int, nqb: int, weight: float = 1.0):
    field, meta = synthetic_field(layers, heads, kv, nqb, seed=seed)
    gamma = row_coupling(field, "mass", weight)
    return build_terms(
        field["block_field"].double().numpy(),
        field["importance"].double().numpy(),
        field["redundancy"].double().numpy(),
        field["mass"].double().numpy(),
        field["kv_groups"].numpy(),
        num_kv=int(meta["num_kv_heads"]),
        block_scale="flat",
        coupling=gamma,
    )


def test_objective_charges_dropping_blocks_of_one_row_together():
    """Two blocks of one row dropped together cost γ more than the two drops apart."""
    terms = _coupled_terms(2, 1, 2, 1, 5)
    nb = terms.value.shape[-1]
    a, b = row.row_pairs(terms.nqb)
    p = int(np.argmax(terms.coupling[0, 0]))
    heads = np.array([[True, False]])
    full = np.ones((1, 2, nb), dtype=bool)

    def obj(*dropped: int) -> float:
        z = full.copy()
        z[0, 0, list(dropped)] = False
        return float(objective(terms, heads, z)[0])

    base = obj()
    joint = obj(a[p], b[p]) - base
    apart = (obj(a[p]) - base) + (obj(b[p]) - base)
    assert joint - apart == pytest.approx(terms.coupling[0, 0, p], rel=1e-9)


def test_annealer_is_exact_with_coupling():
    terms = _coupled_terms(7, 2, 2, 1, 4)
    for layer in range(2):
        for lam in (0.3, 1.0, 3.0):
            lam *= float(terms.value.mean())
            sub = build_subproblem(terms, layer, [0, 1], lam)
            _, best = exact.brute_force(sub)
            res = anneal.anneal_subproblem(
                sub, terms, lam, seed=0, num_reads=4, num_sweeps=200, beta_range=None, polish=True
            )
            assert res.energy == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_solve_with_coupling_meets_the_budget_and_lowers_the_coupled_objective():
    """At the same budget, the coupled solve's masks have a lower coupled objective than the uncoupled
    solve's masks, and the masks differ: the coupling is seen by the solver."""
    field, meta = synthetic_field(4, 8, 2, 8, seed=3)
    plain = solve_field(field, meta, SolveConfig(density=0.3, block_value="mass", exact_layers=0))
    cfg = SolveConfig(density=0.3, block_value="mass", exact_layers=1, row_coupling=1.0)
    coupled = solve_field(field, meta, cfg)
    rep = coupled.report
    assert rep["blocks_computed"] == rep["blocks_target"] == plain.report["blocks_target"]
    assert rep["constraint_violations"] == 0
    terms = _coupled_terms(3, 4, 8, 2, 8)
    qb, kb = offdiag_blocks(8)

    def coupled_objective(result) -> float:
        heads = result.head_keep.numpy()
        blocks = result.block_mask.numpy()[..., qb, kb]
        return float(objective(terms, heads, blocks).sum())

    assert not np.array_equal(plain.block_mask.numpy(), coupled.block_mask.numpy())
    assert coupled_objective(coupled) < coupled_objective(plain)
    checks = rep["exact_checks"]
    assert checks and all(abs(c["milp_same_budget"]["gap"]) <= 1e-3 for c in checks)


def test_coupling_with_absolute_block_values_is_a_user_error():
    with pytest.raises(UserError, match="row_coupling needs row-share block values"):
        SolveConfig(block_value="grad", row_coupling=1.0)
    with pytest.raises(UserError, match="row_coupling must be non-negative"):
        SolveConfig(row_coupling=-1.0)
