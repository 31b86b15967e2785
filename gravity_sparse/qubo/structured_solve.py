"""Solving the structured QUBO (`structured`): multipliers, annealing per layer, polish, exact budget.

The budget is priced as in the block QUBO (`anneal`): λ per computed block, μ per kept head, found by
bisection on a relaxation that prices each head alone (its cheapest option: dropped, or its best
structure at λ plus μ; pairs and KV heads ignored). Every layer's BQM is then annealed
(dwave-samplers), decoded, polished by exact moves of one or two heads and checked against the layer's
exact optimum. The repair meets the budget exactly: heads by their energy change, then whole structure
steps (narrower or wider window, sink on or off) by cost per block, and the last blocks, fewer than
any step, as a partial next diagonal chosen by measured mass.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from dwave.samplers import SimulatedAnnealingSampler

from gravity_sparse.errors import UserError
from gravity_sparse.qubo import structured as st
from gravity_sparse.qubo.anneal import bisect_multipliers, subproblem_seed
from gravity_sparse.qubo.coupling import offdiag_blocks
from gravity_sparse.qubo.formulation import Terms, scale_of_heads


@dataclass
class StructuredTerms:
    costs: np.ndarray  # (L, H, S) nats: cost of each structure, scaled by head
    blocks: np.ndarray  # (S,) computed blocks per structure
    widths: np.ndarray  # (S,)
    sinks: np.ndarray  # (S,) bool
    masks: np.ndarray  # (S, NB) bool
    terms: Terms  # importance, pairs, KV heads and their prices
    scale: np.ndarray  # (L, H) the head's scale S_h·w_h
    models: list[st.RowModel]  # per layer
    kind: str
    field: np.ndarray | None = None  # (L, H, NQB, NQB): rows priced on the measured field instead

    def mask_costs(self, layer: int, mask: np.ndarray) -> np.ndarray:
        """(H,) unscaled row cost of each head's block mask (NQB, NQB), as the structures are priced."""
        if self.field is not None:
            return st.field_mask_costs(self.field[layer], mask, self.kind)
        return st.mask_costs(self.models[layer], mask, self.kind)

    def option(self, layer: int, lam: float, mu: float) -> np.ndarray:
        return self.costs[layer] + lam * self.blocks[None, :] + mu


def build_structured(
    profile: np.ndarray,
    block_field: np.ndarray,
    terms: Terms,
    *,
    kind: str,
    block_scale: str,
    sink: str = "always",
    rows: str = "profile",
) -> StructuredTerms:
    """profile (L, H, T), block_field (L, H, NQB, NQB); the head scale as in `build_terms`; sink as in
    `structured.structures`; rows: each query priced from the distance profile (`profile`) or each
    query block from the measured block field (`field`)."""
    num_layers, _, nqb, _ = block_field.shape
    block = -(-profile.shape[-1] // nqb)
    widths, sinks = st.structures(nqb, sink)
    head_scale = scale_of_heads(terms.importance, block_scale)
    models = [st.row_model(profile[i], block_field[i, :, :, 0], block) for i in range(num_layers)]
    if rows == "field":
        raw = np.stack([st.field_structure_costs(f, widths, sinks, kind) for f in block_field])
    else:
        raw = np.stack([st.structure_costs(m, widths, sinks, kind) for m in models])
    scale = head_scale * terms.weight
    return StructuredTerms(
        costs=scale[..., None] * raw,
        blocks=st.structure_blocks(nqb, widths, sinks),
        widths=widths,
        sinks=sinks,
        masks=st.structure_masks(nqb, widths, sinks),
        terms=terms,
        scale=scale,
        models=models,
        kind=kind,
        field=block_field if rows == "field" else None,
    )


def structured_objective(s: StructuredTerms, heads: np.ndarray, mask: np.ndarray) -> float:
    """The structured QUBO's objective (nats) of any masks: heads (L, H) bool, mask (L, H, NQB, NQB):
    dropped heads' importance, kept heads' row cost (`StructuredTerms.mask_costs`), pairs, KV heads."""
    t = s.terms
    drop = ~heads.astype(bool)
    total = float((t.importance * drop).sum())
    for layer in range(len(s.models)):
        cost = s.scale[layer] * s.mask_costs(layer, mask[layer])
        total += float(cost[~drop[layer]].sum())
        total += float(np.triu(t.pair[layer], 1)[np.ix_(drop[layer], drop[layer])].sum())
        total += t.kv_cost * len(set(t.kv_groups[layer][~drop[layer]].tolist()))
    return total


def layer_problem(s: StructuredTerms, layer: int, lam: float, mu: float) -> st.LayerProblem:
    t = s.terms
    groups = t.kv_groups[layer]
    kv = sorted(set(groups.tolist()))
    option = s.option(layer, lam, mu)
    imp = t.importance[layer]
    pair = t.pair[layer]
    margin = t.kv_penalty - t.kv_cost
    onehot = margin + imp + pair.sum(1) + t.kv_penalty + t.kv_cost + np.abs(option).max(1)
    return st.LayerProblem(
        layer=layer,
        heads=list(range(len(imp))),
        kv=kv,
        option=option,
        importance=imp,
        pair=pair,
        groups=np.array([kv.index(g) for g in groups.tolist()]),
        kv_cost=t.kv_cost,
        kv_penalty=t.kv_penalty,
        onehot=onehot,
    )


def relaxed(s: StructuredTerms, lam: float, mu: float) -> np.ndarray:
    """(L, H) choice of each head alone: −1 (dropped) or its cheapest structure at (λ, μ)."""
    option = s.costs + lam * s.blocks + mu
    best = option.argmin(-1)
    keep = option.min(-1) < s.terms.importance
    return np.where(keep, best, -1)


def count(s: StructuredTerms, choice: np.ndarray) -> int:
    return int(np.where(choice >= 0, s.blocks[np.maximum(choice, 0)], 0).sum())


@dataclass
class LayerResult:
    problem: st.LayerProblem
    anneal: np.ndarray  # the annealer's best state
    choice: np.ndarray  # after decoding and polish
    final: np.ndarray  # after the budget repair (set by `solve_structured`)
    energy_anneal: float
    energy: float
    violations: int
    exact_energy: float | None
    seconds: float


def anneal_layer(
    problem: st.LayerProblem, *, seed: int, num_reads: int, num_sweeps: int
) -> LayerResult:
    start = time.perf_counter()
    bqm = problem.bqm()
    samples = SimulatedAnnealingSampler().sample(
        bqm, num_reads=num_reads, num_sweeps=num_sweeps, seed=seed
    )
    order = np.argsort(np.asarray(list(samples.variables)))
    best = int(np.argmin(samples.record.energy))
    state = samples.record.sample[best, order].astype(np.int8)
    choice, bad = problem.decode(state)
    choice = st.polish(problem, choice)
    exact = st.exact_layer(problem)
    return LayerResult(
        problem=problem,
        anneal=state,
        choice=choice,
        final=choice,
        energy_anneal=float(samples.record.energy[best]),
        energy=problem.choice_energy(choice),
        violations=bad,
        exact_energy=None if exact is None else exact[1],
        seconds=time.perf_counter() - start,
    )


def _moves(s: StructuredTerms, choice: np.ndarray, lam: float, target_heads: int) -> int:
    """Drop or add heads, one at a time by the smallest energy change at λ, to `target_heads`."""
    moved = 0
    while (kept := int((choice >= 0).sum())) != target_heads:
        add = kept < target_heads
        best = (np.inf, 0, 0, 0)
        for layer in range(choice.shape[0]):
            problem = layer_problem(s, layer, lam, 0.0)
            base = problem.choice_energy(choice[layer])
            for h in np.flatnonzero((choice[layer] < 0) == add).tolist():
                trial = choice[layer].copy()
                trial[h] = int(problem.option[h].argmin()) if add else -1
                delta = problem.choice_energy(trial) - base
                if delta < best[0]:
                    best = (delta, layer, h, trial[h])
        choice[best[1], best[2]] = best[3]
        moved += 1
    return moved


def repair(
    s: StructuredTerms,
    choice: np.ndarray,
    block_field: np.ndarray,
    lam: float,
    target: int,
    target_heads: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Meet the budget exactly → (choice (L, H), heads (L, H), blocks (L, H, NB), moves)."""
    choice = choice.copy()
    moved = {"heads": 0, "structure_steps": 0, "partial_blocks": 0}
    if target_heads is not None:
        moved["heads"] = _moves(s, choice, lam, target_heads)
    kept = choice >= 0
    for _ in range(choice.size * len(s.blocks)):
        total = count(s, choice)
        if total == target:
            break
        cur_cost = np.take_along_axis(s.costs, np.maximum(choice, 0)[..., None], -1)
        cur_blocks = s.blocks[np.maximum(choice, 0)][..., None]
        dblocks = s.blocks[None, None, :] - cur_blocks  # (L, H, S)
        dcost = s.costs - cur_cost
        if total > target:  # narrow: the least cost added per block removed
            ok = kept[..., None] & (dblocks < 0)
            score = np.where(ok, dcost / np.where(ok, -dblocks, 1), np.inf)
        else:  # widen within the gap: the most cost saved per block added
            ok = kept[..., None] & (dblocks > 0) & (dblocks <= target - total)
            score = np.where(ok, dcost / np.where(ok, dblocks, 1), np.inf)
        if not np.isfinite(score).any():
            if total > target and target_heads is None:  # every kept head at its narrowest
                moved["heads"] += _moves(s, choice, lam, int(kept.sum()) - 1)
                kept = choice >= 0
                continue
            break
        layer, head, option = np.unravel_index(int(np.argmin(score)), score.shape)
        choice[layer, head] = option
        moved["structure_steps"] += 1
    heads = choice >= 0
    blocks = s.masks[np.maximum(choice, 0)] & heads[..., None]
    rest = target - count(s, choice)
    if rest:
        # fewer blocks left than any step: the next diagonal of kept heads, by measured mass
        nqb = block_field.shape[-1]
        qb, kb = offdiag_blocks(nqb)
        width = s.widths[np.maximum(choice, 0)][..., None]
        frontier = heads[..., None] & ((qb - kb)[None, None, :] == width + 1) & ~blocks
        if rest < 0 or frontier.sum() < rest:
            raise RuntimeError(f"structured repair missed the budget by {rest} blocks")
        value = np.where(frontier, block_field[..., qb, kb], -np.inf)
        top = np.argsort(-value, axis=None, kind="stable")[:rest]
        blocks.reshape(-1)[top] = True
        moved["partial_blocks"] = rest
    return choice, heads, blocks, moved


def solve_structured(
    s: StructuredTerms,
    block_field: np.ndarray,
    target: int,
    target_heads: int | None,
    *,
    seed: int,
    num_reads: int,
    num_sweeps: int,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], list[LayerResult]]:
    """Heads (L, H), blocks (L, H, NB) at the budget, a report and the per-layer results."""
    span = float(s.terms.importance.max(initial=0.0) + s.terms.pair.sum(-1).max(initial=0.0))
    hi = float(s.costs.max(initial=0.0)) * 1.01 + 1e-12
    span += float(s.costs.max(initial=0.0)) + hi * float(s.blocks.max()) + 1e-9

    def minimise(lam: float, mu: float) -> tuple[int, int]:
        choice = relaxed(s, lam, mu)
        return count(s, choice), int((choice >= 0).sum())

    narrowest = int(s.blocks.min())
    if target_heads is not None and target < target_heads * narrowest:
        sink = bool(s.sinks[int(np.argmin(s.blocks))])
        raise UserError(
            f"a budget of {target} blocks is below the {target_heads * narrowest} that {target_heads} "
            f"kept heads need at their narrowest structure ({narrowest} blocks each: the diagonal"
            f"{' and the sink column' if sink else ''}); raise the density or head_drop"
            f"{', or set solve.structure_sink=choose' if sink else ''}"
        )
    lam, mu = bisect_multipliers(minimise, target, target_heads, (0.0, hi), span)
    num_layers = s.costs.shape[0]

    def run(layer: int) -> LayerResult:
        return anneal_layer(
            layer_problem(s, layer, lam, mu),
            seed=subproblem_seed(seed, layer, 0),
            num_reads=num_reads,
            num_sweeps=num_sweeps,
        )

    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        results = list(pool.map(run, range(num_layers)))
    choice = np.stack([r.choice for r in results])
    choice, heads, blocks, moved = repair(s, choice, block_field, lam, target, target_heads)
    for r in results:
        r.final = choice[r.problem.layer]
    gaps = [
        (r.energy - r.exact_energy) / max(abs(r.exact_energy), 1e-12)
        for r in results
        if r.exact_energy is not None
    ]
    final = np.maximum(choice, 0)
    report = {
        "lambda": lam,
        "mu": mu,
        "repair": moved,
        "max_gap": max(gaps) if gaps else None,
        "violations_anneal": int(sum(r.violations for r in results)),
        "structures": {
            "width_blocks": np.where(heads, s.widths[final], -1).tolist(),
            "sink": (heads & s.sinks[final]).tolist(),
        },
    }
    return heads, blocks, report, results
