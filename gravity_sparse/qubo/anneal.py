"""Solving the QUBO: multipliers by bisection, simulated annealing per subproblem, exact-budget repair.

The budget (computed causal blocks = K exactly, optionally kept heads = K_h exactly) is a linear price λ
per block (μ per head) in every layer's BQM. Finding λ needs count(λ) many times, and one full anneal of a
Gravity-2-sized field takes seconds, so the bisection evaluates a cheap conditional minimiser of the same
energy instead: blocks of a kept head at their exact optimum given the head (keep iff c_hb > λ, contiguity
ignored), heads by iterated conditional modes. Annealing then runs at the λ found; a second bisection
round restarts the conditional minimiser from the annealed heads (which is where it can be wrong) and
anneals again if λ moved. A repair then meets the budget exactly, moving the fewest, cheapest decisions.

Annealing: `neal.SimulatedAnnealingSampler` (dwave-samplers), one BQM per independent subproblem, threads
in parallel, each seeded from (seed, layer, component) so results do not depend on thread timing. The beta
range is set from the problem, not by neal's default: neal heats until the largest possible flip is
accepted half the time, and a head coupled to hundreds of blocks has a huge one, so most sweeps would be
spent with blocks at random. Here the hot end accepts a typical head flip (ΔE ≈ median head importance)
half the time and the cold end rejects a near-marginal block flip (10th percentile of |λ − c_hb|) with
probability 0.99. Optional polish: steepest descent (dwave-samplers) to a local minimum, then compound head
moves (`polish.head_moves`: a head flipped with its blocks) and steepest descent again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from dwave.samplers import SimulatedAnnealingSampler, SteepestDescentSolver

from gravity_sparse.qubo.formulation import (
    Subproblem,
    Terms,
    build_subproblem,
    canonical,
    computed_blocks,
    offdiag_blocks,
    split_state,
    violations,
)
from gravity_sparse.qubo.polish import head_moves


def _head_fields(terms: Terms, lam: float, mu: float, x: np.ndarray, h: int) -> np.ndarray:
    """Energy change (L,) of keeping head h rather than dropping it, its blocks at their best given λ."""
    blocks = np.minimum(terms.values_at(lam)[:, h], lam).sum(
        -1
    )  # kept blocks cost λ, dropped ones their value
    others_dropped = (terms.pair[:, h] * (1.0 - x)).sum(-1)
    same = terms.kv_groups == terms.kv_groups[:, h : h + 1]
    same[:, h] = False
    lonely = ~(x.astype(bool) & same).any(-1)
    return (
        -terms.importance[:, h]
        + blocks
        + lam * terms.nqb
        + mu
        - others_dropped
        + terms.kv_cost * lonely
    )


def relaxed_heads(
    terms: Terms, lam: float, mu: float, heads0: np.ndarray, max_sweeps: int = 20
) -> np.ndarray:
    """Iterated conditional modes over heads (vectorised over layers) from heads0 (L, H) → (L, H) bool."""
    x = heads0.astype(np.float64).copy()
    for _ in range(max_sweeps):
        changed = False
        for h in range(x.shape[1]):
            keep = (_head_fields(terms, lam, mu, x, h) < 0).astype(np.float64)
            changed |= bool((keep != x[:, h]).any())
            x[:, h] = keep
        if not changed:
            break
    return x.astype(bool)


def relaxed_count(terms: Terms, lam: float, heads: np.ndarray) -> int:
    return int((heads * (terms.nqb + (terms.values_at(lam) > lam).sum(-1))).sum())


def bisect_multipliers(
    minimise: Callable[[float, float], tuple[int, int]],
    target_blocks: int,
    target_heads: int | None,
    lam_range: tuple[float, float],
    mu_span: float,
    steps: int = 48,
) -> tuple[float, float]:
    """(λ, μ) at which `minimise(λ, μ) → (computed blocks, kept heads)` meets the targets: λ by bisection
    for the blocks, inside a bisection on μ ∈ [−2·mu_span, 2·mu_span] for the heads (μ = 0 without a head
    target). Both counts must fall as their price rises. The closest pair is returned if none is exact."""

    def solve_lam(mu: float) -> tuple[float, int]:
        lo, hi = lam_range
        best = (np.inf, 0.0, 0)
        for _ in range(steps):
            lam = 0.5 * (lo + hi)
            count, kept = minimise(lam, mu)
            if abs(count - target_blocks) < best[0]:
                best = (abs(count - target_blocks), lam, kept)
            if count == target_blocks:
                break
            lo, hi = (lam, hi) if count > target_blocks else (lo, lam)
        return best[1], best[2]

    if target_heads is None:
        return solve_lam(0.0)[0], 0.0
    lo, hi = -2.0 * mu_span, 2.0 * mu_span
    best = (np.inf, 0.0, 0.0)
    for _ in range(steps // 2):
        mu = 0.5 * (lo + hi)
        lam, kept = solve_lam(mu)
        if abs(kept - target_heads) < best[0]:
            best = (abs(kept - target_heads), lam, mu)
        if kept == target_heads:
            break
        lo, hi = (mu, hi) if kept > target_heads else (lo, mu)
    return best[1], best[2]


def find_multipliers(
    terms: Terms,
    target_blocks: int,
    target_heads: int | None,
    heads0: np.ndarray,
    steps: int = 48,
) -> tuple[float, float]:
    """(λ, μ) whose conditional minimiser computes ≈ target_blocks blocks (and keeps target_heads heads)."""
    most = terms.values_at(np.inf)  # every block priced as if its whole row were dropped

    def minimise(lam: float, mu: float) -> tuple[int, int]:
        heads = relaxed_heads(terms, lam, mu, heads0)
        return relaxed_count(terms, lam, heads), int(heads.sum())

    # block values may be negative (solve.block_value=grad): a budget above the blocks worth keeping
    # then needs a negative price
    lo = min(float(terms.value.min(initial=0.0)), 0.0) * 1.01 - 1e-12
    hi = float(most.max(initial=0.0)) * 1.01 + 1e-12
    span = float(terms.importance.max(initial=0.0) + terms.pair.sum(-1).max(initial=0.0))
    span += float(most.sum(-1).max(initial=0.0)) + 1e-9
    return bisect_multipliers(minimise, target_blocks, target_heads, (lo, hi), span, steps)


def default_beta_range(sub: Subproblem, terms: Terms, lam: float) -> tuple[float, float]:
    """(hot, cold) β from the problem's own energy scales (see the module docstring)."""
    imp = terms.importance[sub.layer, sub.heads]
    hot_de = float(np.median(imp)) if imp.size and np.median(imp) > 0 else 1.0
    gaps = np.abs(lam - terms.values_at(lam)[sub.layer, sub.heads]).reshape(-1)
    gaps = gaps[gaps > 1e-12]
    cold_de = float(np.quantile(gaps, 0.1)) if gaps.size else hot_de * 1e-3
    hot = np.log(2.0) / hot_de
    cold = max(np.log(100.0) / cold_de, hot * 10.0)
    return float(hot), float(cold)


@dataclass
class SubResult:
    """What one subproblem's anneal produced; `state` is canonical (constraints hold)."""

    sub: Subproblem
    state: np.ndarray  # (n,) int8
    energy_anneal: float  # best read, as the annealer reported it
    energy: float  # after polish and canonicalisation
    violations_raw: int  # constraint violations in the annealer's best read
    seconds: float
    beta_range: tuple[float, float]
    seed: int


def subproblem_seed(seed: int, layer: int, component: int) -> int:
    return int(np.random.SeedSequence([seed, layer, component]).generate_state(1)[0]) & 0x7FFFFFFF


def _descend(bqm, sub: Subproblem, state: np.ndarray, seed: int) -> np.ndarray:
    """Steepest descent (dwave-samplers) from `state` to a single-flip local minimum."""
    polished = SteepestDescentSolver().sample(
        bqm, initial_states=(state[None, :], list(range(sub.num_variables))), seed=seed
    )
    porder = np.argsort(np.asarray(list(polished.variables)))
    return polished.record.sample[0, porder].astype(np.int8)


def anneal_subproblem(
    sub: Subproblem,
    terms: Terms,
    lam: float,
    *,
    seed: int,
    num_reads: int,
    num_sweeps: int,
    beta_range: tuple[float, float] | None,
    polish: bool,
) -> SubResult:
    start = time.perf_counter()
    nb = terms.value.shape[-1]
    bqm = sub.bqm()
    betas = tuple(beta_range) if beta_range else default_beta_range(sub, terms, lam)
    samples = SimulatedAnnealingSampler().sample(
        bqm, num_reads=num_reads, num_sweeps=num_sweeps, beta_range=betas, seed=seed
    )
    order = np.argsort(np.asarray(list(samples.variables)))
    best = int(np.argmin(samples.record.energy))
    state = samples.record.sample[best, order].astype(np.int8)
    energy_anneal = float(samples.record.energy[best])
    raw = violations(sub, nb, state, terms.kv_groups)
    if polish:
        state = _descend(bqm, sub, state, seed)
        # compound head moves (see polish.py), then the blocks settle again
        state, moves = head_moves(sub, terms, lam, state)
        if moves:
            state = _descend(bqm, sub, state, seed)
    state = canonical(sub, nb, state, terms.kv_groups)
    energy = float(sub.energy(state[None, :])[0])
    return SubResult(
        sub=sub,
        state=state,
        energy_anneal=energy_anneal,
        energy=energy,
        violations_raw=raw,
        seconds=time.perf_counter() - start,
        beta_range=(float(betas[0]), float(betas[1])),
        seed=seed,
    )


def anneal_all(
    terms: Terms,
    components: list[list[list[int]]],
    lam: float,
    mu: float,
    *,
    seed: int,
    num_reads: int,
    num_sweeps: int,
    beta_range: tuple[float, float] | None,
    polish: bool,
    threads: int,
) -> list[SubResult]:
    """Anneal every (layer, component) subproblem; results in a fixed (layer, component) order."""
    jobs = [
        (layer, ci, heads)
        for layer, comps in enumerate(components)
        for ci, heads in enumerate(comps)
    ]

    def run(job: tuple[int, int, list[int]]) -> SubResult:
        layer, ci, heads = job
        sub = build_subproblem(terms, layer, heads, lam, mu)
        return anneal_subproblem(
            sub,
            terms,
            lam,
            seed=subproblem_seed(seed, layer, ci),
            num_reads=num_reads,
            num_sweeps=num_sweeps,
            beta_range=beta_range,
            polish=polish,
        )

    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        return list(pool.map(run, jobs))


def gather(terms: Terms, results: list[SubResult]) -> tuple[np.ndarray, np.ndarray]:
    """Subproblem states → heads (L, H) bool, blocks (L, H, NB) bool."""
    num_layers, num_heads, nb = terms.value.shape
    heads = np.zeros((num_layers, num_heads), dtype=bool)
    blocks = np.zeros((num_layers, num_heads, nb), dtype=bool)
    for res in results:
        x, _, z = split_state(res.sub, nb, res.state)
        heads[res.sub.layer, res.sub.heads] = x
        blocks[res.sub.layer, res.sub.heads] = z
    return heads, blocks


def _block_marginals(terms: Terms, blocks: np.ndarray) -> np.ndarray:
    """Objective change (L, H, NB) of flipping each off-diagonal block of a kept head."""
    value = terms.coupled_marginals(blocks).copy()
    if terms.contiguity:
        qb, kb = offdiag_blocks(terms.nqb)
        z = blocks.astype(np.float64)
        neighbours = np.zeros_like(z)
        nxt = np.flatnonzero(kb + 1 < qb)
        neighbours[..., nxt] += z[..., nxt + 1]
        neighbours[..., nxt + 1] += z[..., nxt]
        neighbours[..., kb == qb - 1] += 1.0  # the diagonal of a kept head
        value += terms.contiguity * neighbours
    return value


def repair(
    terms: Terms,
    heads: np.ndarray,
    blocks: np.ndarray,
    lam: float,
    target_blocks: int,
    target_heads: int | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Meet the budget exactly: heads first (if targeted), then blocks by their objective marginals.

    Heads are moved one at a time by their conditional field at λ (smallest loss first); blocks in one
    batch, the cheapest kept ones dropped or the most valuable dropped ones (in kept heads) added. Returns
    the new masks and how many decisions moved.
    """
    x = heads.astype(bool).copy()
    z = blocks.astype(bool) & x[..., None]
    moved = {"heads_added": 0, "heads_dropped": 0, "blocks_added": 0, "blocks_dropped": 0}
    num_heads = x.shape[1]

    def head_scores() -> np.ndarray:
        xf = x.astype(np.float64)
        return np.stack([_head_fields(terms, lam, 0.0, xf, h) for h in range(num_heads)], axis=1)

    def flip_head(keep: bool) -> None:
        scores = head_scores()
        cand = ~x if keep else x
        masked = np.where(cand, scores if keep else -scores, np.inf)
        idx = np.unravel_index(int(np.argmin(masked)), x.shape)
        x[idx] = keep
        z[idx] = (terms.values_at(lam)[idx] > lam) if keep else False
        moved["heads_added" if keep else "heads_dropped"] += 1

    if target_heads is not None:
        while int(x.sum()) > target_heads:
            flip_head(False)
        while int(x.sum()) < target_heads:
            flip_head(True)
    for _ in range(x.size + 1):
        count = computed_blocks(terms.nqb, x, z)
        if count == target_blocks:
            break
        marg = _block_marginals(terms, z)
        if count > target_blocks:
            cand = z & x[..., None]
            need = count - target_blocks
            if cand.sum() >= need:
                order = np.argsort(np.where(cand, marg, np.inf), axis=None, kind="stable")[:need]
                z.reshape(-1)[order] = False
                moved["blocks_dropped"] += need
            else:
                flip_head(False)
        else:
            cand = ~z & x[..., None]
            need = target_blocks - count
            if cand.sum() >= need:
                order = np.argsort(np.where(cand, -marg, np.inf), axis=None, kind="stable")[:need]
                z.reshape(-1)[order] = True
                moved["blocks_added"] += need
            else:
                flip_head(True)
    return x, z & x[..., None], moved
