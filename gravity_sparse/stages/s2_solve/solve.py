"""solve_field: keep/drop decisions for every head and block at a budget (pure: tensors in, tensors out).

Budget: K = round(density · L · H · NQB(NQB+1)/2) computed causal blocks, met exactly; with `head_drop`,
exactly L·H − round(head_drop · L · H) query heads are kept. Tensor shapes as in the shared formats:
head_keep (L, H) bool, block_mask (L, H, NQB, NQB) bool. The QUBO pieces are in `gravity_sparse.qubo`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from gravity_sparse.errors import UserError
from gravity_sparse.qubo import anneal, exact
from gravity_sparse.qubo.baselines import baseline_masks, important_heads
from gravity_sparse.qubo.formulation import (
    Terms,
    build_terms,
    causal_blocks_per_head,
    computed_blocks,
    head_components,
    join_state,
    objective,
    offdiag_blocks,
    violations,
)
from gravity_sparse.qubo.limits import check_solve_size
from gravity_sparse.qubo.structured_solve import (
    StructuredTerms,
    build_structured,
    solve_structured,
    structured_objective,
)
from gravity_sparse.stages.s2_solve.config import (
    ABSOLUTE_BLOCK_VALUES,
    DEFAULT_EPS,
    SolveConfig,
    resolve_eps,
)
from gravity_sparse.stages.s2_solve.field_io import validate_field
from gravity_sparse.stages.s2_solve.values import block_values, row_coupling


@dataclass
class SolveResult:
    head_keep: torch.Tensor  # (L, H) bool
    block_mask: torch.Tensor  # (L, H, NQB, NQB) bool
    baselines: dict[str, tuple[torch.Tensor, torch.Tensor]]
    report: dict[str, Any]
    subproblems: list[dict[str, Any]]  # Subproblem, its samples and energies (for the BQM files)
    meta: dict[str, str]


def budget(cfg: SolveConfig, num_layers: int, num_heads: int, nqb: int) -> tuple[int, int | None]:
    """(computed blocks K, kept heads or None) for the config; UserError if impossible."""
    per_head = causal_blocks_per_head(nqb)
    total = num_layers * num_heads * per_head
    target = round(cfg.density * total)
    heads = None
    if cfg.head_drop is not None:
        heads = num_layers * num_heads - round(cfg.head_drop * num_layers * num_heads)
    floor_heads = num_layers * num_heads if heads is None else heads
    floor = floor_heads * nqb
    if target <= floor:
        raise UserError(
            f"density {cfg.density} is at or below the diagonal-only minimum "
            f"{floor / total:.4f} ({floor_heads} heads × {nqb} diagonal blocks)"
        )
    if heads is not None and (heads < 1 or target > heads * per_head):
        raise UserError(
            f"density {cfg.density} does not fit in the {heads} heads left by head_drop"
        )
    return target, heads


def full_mask(nqb: int, heads: np.ndarray, blocks: np.ndarray) -> torch.Tensor:
    """(L, H, NQB, NQB) bool block mask from heads (L, H) and off-diagonal blocks (L, H, NB): the diagonal
    follows its head."""
    qb, kb = offdiag_blocks(nqb)
    mask = np.zeros((*heads.shape, nqb, nqb), dtype=bool)
    mask[..., qb, kb] = blocks & heads[..., None]
    idx = np.arange(nqb)
    mask[..., idx, idx] = heads[..., None]
    return torch.from_numpy(mask)


def _exact_checks(
    cfg: SolveConfig, terms: Terms, results: list[anneal.SubResult], finals: list[np.ndarray]
) -> list[dict[str, Any]]:
    checks = []
    num_layers = terms.value.shape[0]
    layers = set(
        np.linspace(0, num_layers - 1, min(cfg.exact_layers, num_layers)).round().astype(int)
    )
    for res, final in zip(results, finals, strict=True):
        sub = res.sub
        entry: dict[str, Any] = {"layer": sub.layer, "heads": sub.heads, "n": sub.num_variables}
        if sub.num_variables <= cfg.brute_force_max:
            _, best = exact.brute_force(sub)
            entry["brute_force"] = {"energy": best, "gap": exact.relative_gap(res.energy, best)}
        if sub.layer in layers:
            free = exact.milp_optimum(sub, time_limit=cfg.milp_time_limit)
            k = len(sub.heads)
            count = int(final[:k].sum() * terms.nqb + final[k + len(sub.kv) :].sum())
            fixed = exact.milp_optimum(
                sub, nqb=terms.nqb, fixed_blocks=count, time_limit=cfg.milp_time_limit
            )
            final_energy = float(sub.energy(final[None, :])[0])
            entry["milp"] = {
                "energy": free.get("energy"),
                "optimal": free["optimal"],
                "seconds": free["seconds"],
                "gap": exact.relative_gap(res.energy, free["energy"]) if "energy" in free else None,
            }
            entry["milp_same_budget"] = {
                "blocks": count,
                "energy": fixed.get("energy"),
                "optimal": fixed["optimal"],
                "seconds": fixed["seconds"],
                "gap": exact.relative_gap(final_energy, fixed["energy"])
                if "energy" in fixed
                else None,
            }
        if len(entry) > 3:
            checks.append(entry)
    return checks


def _solve_blocks(
    cfg: SolveConfig, terms: Terms, target: int, target_heads: int | None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    """The free-block QUBO: multipliers, annealing rounds, repair, exact checks."""
    num_layers, num_heads, nb = terms.value.shape
    nqb = terms.nqb
    components = [head_components(terms, layer) for layer in range(num_layers)]
    heads0 = np.ones((num_layers, num_heads), dtype=bool)
    lam = mu = None
    rounds = []
    for _ in range(cfg.bisection_rounds):
        new_lam, new_mu = anneal.find_multipliers(terms, target, target_heads, heads0)
        if lam is not None and np.isclose(new_lam, lam) and np.isclose(new_mu, mu):
            break
        lam, mu = new_lam, new_mu
        results = anneal.anneal_all(
            terms,
            components,
            lam,
            mu,
            seed=cfg.seed,
            num_reads=cfg.num_reads,
            num_sweeps=cfg.num_sweeps,
            beta_range=tuple(cfg.beta_range) if cfg.beta_range else None,
            polish=cfg.polish,
            threads=cfg.threads,
        )
        heads0, blocks0 = anneal.gather(terms, results)
        rounds.append({"lambda": lam, "mu": mu, "blocks": computed_blocks(nqb, heads0, blocks0)})
    heads, blocks, moved = anneal.repair(terms, heads0, blocks0, lam, target, target_heads)
    finals, bad = [], 0
    for res in results:
        sub = res.sub
        x = heads[sub.layer, sub.heads]
        y = np.array([x[terms.kv_groups[sub.layer, sub.heads] == g].any() for g in sub.kv])
        final = join_state(x, y, blocks[sub.layer, sub.heads])
        bad += violations(sub, nb, final, terms.kv_groups) + violations(
            sub, nb, res.state, terms.kv_groups
        )
        finals.append(final)
    if bad:
        raise RuntimeError(
            f"solve produced {bad} constraint violations (a bug: penalties too small)"
        )
    t_check = time.perf_counter()
    checks = _exact_checks(cfg, terms, results, finals)
    gaps = [
        c[k]["gap"]
        for c in checks
        for k in ("milp", "brute_force")
        if c.get(k, {}).get("gap") is not None
    ]
    sub_reports, subs = [], []
    for res, final in zip(results, finals, strict=True):
        sub = res.sub
        sub_reports.append(
            {
                "layer": sub.layer,
                "heads": sub.heads,
                "num_variables": sub.num_variables,
                "num_interactions": len(sub.quad),
                "energy_anneal": res.energy_anneal,
                "energy_polished": res.energy,
                "energy_final": float(sub.energy(final[None, :])[0]),
                "violations_anneal": res.violations_raw,
                "seconds": res.seconds,
                "beta_range": list(res.beta_range),
                "seed": res.seed,
            }
        )
        subs.append({"sub": sub, "anneal": res.state, "final": final, "lambda": lam, "mu": mu})
    info = {
        "lambda": lam,
        "mu": mu,
        "rounds": rounds,
        "repair": moved,
        "constraint_violations": bad,
        "check_seconds": time.perf_counter() - t_check,
        "max_gap": max(gaps) if gaps else None,
        "num_subproblems": len(results),
        "num_variables": int(sum(r.sub.num_variables for r in results)),
        "exact_checks": checks,
        "subproblems": sub_reports,
    }
    return heads, blocks, info, subs


def _solve_windows(
    cfg: SolveConfig,
    structured: StructuredTerms,
    block_field: np.ndarray,
    target: int,
    target_heads: int | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], list[dict[str, Any]]]:
    """The structured QUBO (one window structure per head): its masks, report entries and BQMs."""
    heads, blocks, info, results = solve_structured(
        structured,
        block_field,
        target,
        target_heads,
        seed=cfg.seed,
        num_reads=cfg.num_reads,
        num_sweeps=cfg.num_sweeps,
        threads=cfg.threads,
    )
    subs, sub_reports = [], []
    for r in results:
        p = r.problem
        final = p.state(r.final)
        subs.append(
            {
                "sub": p,
                "anneal": r.anneal,
                "final": final,
                "lambda": info["lambda"],
                "mu": info["mu"],
            }
        )
        sub_reports.append(
            {
                "layer": p.layer,
                "num_variables": p.num_variables,
                "energy_anneal": r.energy_anneal,
                "energy_polished": r.energy,
                "energy_exact": r.exact_energy,
                "violations_anneal": r.violations,
                "seconds": r.seconds,
            }
        )
    info.update(
        constraint_violations=0,
        check_seconds=0.0,
        num_subproblems=len(results),
        num_variables=int(sum(r.problem.num_variables for r in results)),
        subproblems=sub_reports,
    )
    return heads, blocks, info, subs


def solve_field(
    field: dict[str, torch.Tensor],
    field_meta: dict[str, str],
    cfg: SolveConfig,
    *,
    eps: float = DEFAULT_EPS,
) -> SolveResult:
    """Keep/drop decisions for every head and block at the configured budget (pure: no files).

    eps: the model's gravity ε (the default is GravityConfig's); `cfg.eps`, if set, must equal it.
    """
    eps = resolve_eps(cfg, eps)
    validate_field(field, field_meta, "field")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    num_layers, num_heads, nqb, _ = field["block_field"].shape
    check_solve_size(
        num_layers,
        num_heads,
        int(field_meta["seq_len"]),
        int(field_meta["block_size"]),
        cfg.max_block_variables,
    )
    block_field = field["block_field"].double().numpy()
    num_kv = int(field_meta["num_kv_heads"])
    target, target_heads = budget(cfg, num_layers, num_heads, nqb)
    imp_key = "importance_grad" if cfg.importance_source == "grad" else "importance"
    if imp_key not in field:
        raise UserError(f"field has no {imp_key} tensor (solve.importance_source)")
    terms_importance = field[imp_key].double().numpy()
    terms = build_terms(
        block_values(field, cfg.block_value),
        terms_importance,
        field["redundancy"].double().numpy(),
        field["mass"].double().numpy(),
        field["kv_groups"].numpy(),
        num_kv=num_kv,
        eps=eps,
        mass_scale=cfg.mass_scale,
        redundancy_weight=cfg.redundancy_weight,
        kv_cost=cfg.kv_cost,
        contiguity=cfg.contiguity,
        penalty_margin=cfg.penalty_margin,
        block_scale=cfg.block_scale,
        absolute=cfg.block_value in ABSOLUTE_BLOCK_VALUES,
        coupling=row_coupling(field, cfg.block_value, cfg.row_coupling),
    )
    if cfg.structure == "window":
        structured = build_structured(
            field["profile"].double().numpy(),
            block_field,
            terms,
            kind=cfg.structure_cost,
            block_scale=cfg.block_scale,
            sink=cfg.structure_sink,
            rows=cfg.structure_rows,
        )
        heads, blocks, info, subs = _solve_windows(
            cfg, structured, block_field, target, target_heads
        )
    else:
        structured = None
        heads, blocks, info, subs = _solve_blocks(cfg, terms, target, target_heads)
    solve_seconds = time.perf_counter() - t_start - info["check_seconds"]
    solve_cpu_seconds = time.process_time() - cpu_start  # all threads: the solve's cost unshared
    count = computed_blocks(nqb, heads, blocks)
    if count != target or (target_heads is not None and int(heads.sum()) != target_heads):
        raise RuntimeError(f"repair missed the budget: {count} blocks for {target}")

    total = num_layers * num_heads * causal_blocks_per_head(nqb)
    qubo_obj = objective(terms, heads, blocks)
    baseline_out, baseline_rep = {}, {}
    # with a head budget the baselines keep the same number of heads: the most important ones
    base_heads = None if target_heads is None else important_heads(terms_importance, target_heads)
    for name in cfg.baselines:
        bh, bb = baseline_masks(
            name,
            block_field,
            target,
            seed=cfg.seed,
            sink_blocks=cfg.sink_blocks,
            heads=base_heads,
        )
        baseline_out[name] = (torch.from_numpy(bh), full_mask(nqb, bh, bb))
        baseline_rep[name] = {
            "objective": float(objective(terms, bh, bb).sum()),
            "density": computed_blocks(nqb, bh, bb) / total,
            "heads_kept": int(bh.sum()),
        }
        if structured is not None:
            baseline_rep[name]["structured_objective"] = structured_objective(
                structured, bh, baseline_out[name][1].numpy()
            )
    if structured is not None:
        info["structured_objective"] = structured_objective(
            structured, heads, full_mask(nqb, heads, blocks).numpy()
        )
    rep = {
        "density_target": cfg.density,
        "density": count / total,
        "blocks_computed": count,
        "blocks_target": target,
        "blocks_total": total,
        "heads_kept": int(heads.sum()),
        "heads_dropped": int(heads.size - heads.sum()),
        "heads_target": target_heads,
        "structure": cfg.structure,
        "objective": float(qubo_obj.sum()),
        "objective_per_layer": qubo_obj.tolist(),
        "solve_seconds": solve_seconds,
        "solve_cpu_seconds": solve_cpu_seconds,
        **info,
        "baselines": baseline_rep,
        "config": {**asdict(cfg), "eps": eps},
        "load_average": list(os.getloadavg()),
    }
    meta = {
        "block_size": field_meta["block_size"],
        "max_length": field_meta["seq_len"],
        "heads_kept": str(int(heads.sum())),
    }
    return SolveResult(
        head_keep=torch.from_numpy(heads),
        block_mask=full_mask(nqb, heads, blocks),
        baselines=baseline_out,
        report=rep,
        subproblems=subs,
        meta=meta,
    )
