"""Exact optima to measure the annealer's gap: brute force (n ≤ 20) and a MILP (HiGHS) for whole layers.

MILP: the QUBO  min offset + Σ a_i v_i + Σ_k q_k v_i v_j  over v ∈ {0,1}^n  is linearised with one
continuous w_k ∈ [0, 1] per product (Glover/McCormick): w_k ≤ v_i, w_k ≤ v_j and w_k ≥ v_i + v_j − 1.
With binary v these force w_k = v_i v_j, so the MILP optimum is the QUBO optimum. An optional equality
fixes the number of computed blocks of the subproblem (heads·NQB + Σ head–block products), which gives the
optimum at the same budget the annealer's repaired answer spends.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from gravity_sparse.errors import UserError
from gravity_sparse.qubo.formulation import Subproblem
from gravity_sparse.qubo.registry import BRUTE_FORCE_MAX


def brute_force(sub: Subproblem) -> tuple[np.ndarray, float]:
    """Minimum-energy state (n,) int8 and its energy by enumerating all 2^n states (n ≤ 20)."""
    n = sub.num_variables
    if n > BRUTE_FORCE_MAX:
        raise UserError(f"brute force is limited to {BRUTE_FORCE_MAX} variables, got {n}")
    best_state, best_energy = np.zeros(n, dtype=np.int8), np.inf
    chunk = 1 << min(n, 16)
    codes = np.arange(1 << n, dtype=np.int64)
    for start in range(0, 1 << n, chunk):
        part = codes[start : start + chunk]
        states = ((part[:, None] >> np.arange(n)) & 1).astype(np.int8)
        energies = sub.energy(states)
        i = int(np.argmin(energies))
        if energies[i] < best_energy:
            best_energy, best_state = float(energies[i]), states[i].copy()
    return best_state, best_energy


def milp_optimum(
    sub: Subproblem,
    *,
    nqb: int | None = None,
    fixed_blocks: int | None = None,
    time_limit: float = 60.0,
) -> dict[str, float | bool | list[int]]:
    """Optimum of the subproblem's QUBO by HiGHS; with fixed_blocks (and nqb), at that block count.

    Returns energy, state, the solver's status, MIP gap and seconds.
    """
    start = time.perf_counter()
    n, m = sub.num_variables, len(sub.quad)
    cost = np.concatenate([sub.linear, sub.quad])
    # HiGHS tolerances are absolute; block values can be ~1e-5 nats, so solve in units of the largest one
    cost = cost / max(float(np.abs(cost).max(initial=0.0)), 1e-300)
    k = np.arange(m)
    wi, vi, vj = n + k, sub.rows, sub.cols
    one = np.ones(m)
    # w − v_i ≤ 0, w − v_j ≤ 0, v_i + v_j − w ≤ 1
    r = np.concatenate([k, k, m + k, m + k, 2 * m + k, 2 * m + k, 2 * m + k])
    c = np.concatenate([wi, vi, wi, vj, vi, vj, wi])
    v = np.concatenate([one, -one, one, -one, one, one, -one])
    a = sp.csr_array((v, (r, c)), shape=(3 * m, n + m))
    upper = np.concatenate([np.zeros(2 * m), np.ones(m)])
    constraints = [LinearConstraint(a, -np.inf, upper)]
    if fixed_blocks is not None:
        if nqb is None:
            raise ValueError("fixed_blocks needs nqb")
        k_heads = len(sub.heads)
        row = np.zeros(n + m)
        row[:k_heads] = nqb
        head_block = (sub.rows < k_heads) & (sub.cols >= k_heads + len(sub.kv))
        row[n + np.flatnonzero(head_block)] = 1.0
        constraints.append(LinearConstraint(row[None, :], fixed_blocks, fixed_blocks))
    integrality = np.concatenate([np.ones(n), np.zeros(m)])
    res = milp(
        cost,
        constraints=constraints,
        integrality=integrality,
        bounds=Bounds(0.0, 1.0),
        options={"time_limit": time_limit, "mip_rel_gap": 1e-9, "disp": False},
    )
    if res.x is None:
        return {
            "status": str(res.message),
            "optimal": False,
            "seconds": time.perf_counter() - start,
        }
    state = np.round(res.x[:n]).astype(np.int8)
    return {
        "energy": float(sub.energy(state[None, :])[0]),
        "state": state.tolist(),
        "optimal": bool(res.status == 0),
        "status": str(res.message),
        "mip_gap": float(getattr(res, "mip_gap", 0.0) or 0.0),
        "seconds": time.perf_counter() - start,
    }


def relative_gap(energy: float, optimum: float) -> float:
    """(E − E*) / |E*| (0 when both are 0)."""
    if optimum == 0.0:
        return 0.0 if energy == 0.0 else float("inf")
    return (energy - optimum) / abs(optimum)


def all_states(n: int) -> np.ndarray:
    """(2^n, n) every binary state, for tests on tiny instances."""
    return np.array(list(itertools.product((0, 1), repeat=n)), dtype=np.int8)
