"""The solve stage: field.safetensors → masks.safetensors, per-subproblem BQMs, solver report, plots.

`solve_field` is pure (tensors in, tensors and a report out); `write_solve_outputs` does the files;
`run_stage` chains `read_field`, `solve_field` and `write_solve_outputs` for the CLI.

Budget: K = round(density · L · H · NQB(NQB+1)/2) computed causal blocks, met exactly; with `head_drop`,
exactly L·H − round(head_drop · L · H) query heads are kept. Tensor shapes as in the shared formats:
head_keep (L, H) bool, block_mask (L, H, NQB, NQB) bool.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from gravity_sparse.errors import UserError
from gravity_sparse.masks import Masks, write_masks
from gravity_sparse.qubo import anneal, exact, report
from gravity_sparse.qubo.baselines import BASELINES, baseline_masks, important_heads
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
from gravity_sparse.qubo.limits import MAX_BLOCK_VARIABLES, check_solve_size
from gravity_sparse.qubo.profile import profile_field

REQUIRED_KEYS = ("block_field", "importance", "redundancy", "mass", "kv_groups")
META_KEYS = ("block_size", "seq_len", "num_layers", "num_heads", "num_kv_heads")


@dataclass
class SolveConfig:
    density: float = field(
        default=0.3, metadata={"help": "target density: computed causal blocks / all causal blocks"}
    )
    head_drop: float | None = field(
        default=None,
        metadata={"help": "fraction of query heads to drop exactly (None: the solver decides)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the annealer and the random baseline"})
    num_reads: int = field(default=1, metadata={"help": "annealing reads per subproblem"})
    num_sweeps: int = field(default=500, metadata={"help": "annealing sweeps per read"})
    beta_range: list[float] | None = field(
        default=None,
        metadata={"help": "[hot, cold] inverse temperatures (None: set from each subproblem)"},
    )
    polish: bool = field(default=True, metadata={"help": "steepest-descent polish after annealing"})
    threads: int = field(default=2, metadata={"help": "subproblems annealed in parallel"})
    bisection_rounds: int = field(
        default=2, metadata={"help": "bisection + anneal rounds to settle the block price λ"}
    )
    baselines: list[str] = field(
        default_factory=lambda: list(BASELINES),
        metadata={"help": f"baselines at the same budget: {', '.join(BASELINES)}"},
    )
    sink_blocks: int = field(default=1, metadata={"help": "sink key blocks of the window baseline"})
    exact_layers: int = field(
        default=1,
        metadata={"help": "layers whose subproblems are checked against the MILP optimum"},
    )
    milp_time_limit: float = field(default=60.0, metadata={"help": "seconds per MILP check"})
    brute_force_max: int = field(
        default=20, metadata={"help": "subproblems up to this many variables are brute-forced"}
    )
    block_value: str = field(
        default="profile",
        metadata={
            "help": "what a block is worth: profile (the head's distance profile integrated over "
            "the block, + sink) | kl (share of the row's drop cost −log(1−p)) | mass (block field)"
        },
    )
    block_scale: str = field(
        default="flat",
        metadata={
            "help": "block values scale with: importance (the head's) | flat (the model's mean)"
        },
    )
    importance_source: str = field(
        default="ablation", metadata={"help": "head importance: ablation | grad"}
    )
    eps: float = field(default=0.1, metadata={"help": "gravity ε of the model (score bound M²/ε)"})
    mass_scale: float = field(
        default=1.0,
        metadata={
            "help": "R_0 in the mass weight R/(R+R_0), R = M²/ε, as a multiple of the model's "
            "median R; 0 disables it"
        },
    )
    redundancy_weight: float = field(
        default=0.5, metadata={"help": "ρ: weight of the drop-both penalty of redundant head pairs"}
    )
    kv_cost: float = field(
        default=0.01, metadata={"help": "cost of a kept KV head, in mean block values"}
    )
    contiguity: float = field(
        default=0.0, metadata={"help": "reward for adjacent kept blocks, in mean block values"}
    )
    penalty_margin: float = field(
        default=1.0, metadata={"help": "constraint penalty margin, in mean block values"}
    )
    max_block_variables: int = field(
        default=MAX_BLOCK_VARIABLES,
        metadata={"help": "refuse a grid with more block variables than this (0 = no limit)"},
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise UserError(f"solve.density must be in (0, 1], got {self.density}")
        if self.head_drop is not None and not 0.0 <= self.head_drop < 1.0:
            raise UserError(f"solve.head_drop must be in [0, 1), got {self.head_drop}")
        for name in ("num_reads", "num_sweeps", "threads", "bisection_rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"solve.{name} must be at least 1, got {getattr(self, name)}")
        if self.beta_range is not None and (
            len(self.beta_range) != 2 or not 0 < self.beta_range[0] < self.beta_range[1]
        ):
            raise UserError(
                f"solve.beta_range must be [hot, cold] with 0 < hot < cold, got {self.beta_range}"
            )
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise UserError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
        if self.block_value not in ("profile", "kl", "mass"):
            raise UserError(
                f"solve.block_value must be profile, kl or mass, got {self.block_value!r}"
            )
        if self.block_scale not in ("importance", "flat"):
            raise UserError(
                f"solve.block_scale must be importance or flat, got {self.block_scale!r}"
            )
        if self.importance_source not in ("ablation", "grad"):
            raise UserError(
                f"solve.importance_source must be ablation or grad, got {self.importance_source!r}"
            )
        for name in ("eps", "penalty_margin"):
            if getattr(self, name) <= 0:
                raise UserError(f"solve.{name} must be positive, got {getattr(self, name)}")
        for name in ("mass_scale", "redundancy_weight", "kv_cost", "contiguity", "milp_time_limit"):
            if getattr(self, name) < 0:
                raise UserError(f"solve.{name} must be non-negative, got {getattr(self, name)}")
        if self.max_block_variables < 0:
            raise UserError(
                f"solve.max_block_variables must be >= 0, got {self.max_block_variables}"
            )
        if self.exact_layers < 0 or self.brute_force_max < 0 or self.sink_blocks < 0:
            raise UserError(
                "solve.exact_layers, brute_force_max and sink_blocks must be non-negative"
            )
        if self.brute_force_max > exact.BRUTE_FORCE_MAX:
            raise UserError(f"solve.brute_force_max is at most {exact.BRUTE_FORCE_MAX}")


@dataclass
class SolveResult:
    head_keep: torch.Tensor  # (L, H) bool
    block_mask: torch.Tensor  # (L, H, NQB, NQB) bool
    baselines: dict[str, tuple[torch.Tensor, torch.Tensor]]
    report: dict[str, Any]
    subproblems: list[dict[str, Any]]  # Subproblem, its samples and energies (for the BQM files)
    meta: dict[str, str]


def _validate_field(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in tensors]
    if missing:
        raise UserError(f"{where}: field is missing tensor(s) {', '.join(missing)}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{where}: field metadata is missing {', '.join(missing)}")
    try:
        dims = {k: int(meta[k]) for k in META_KEYS}
    except ValueError:
        raise UserError(f"{where}: field metadata {META_KEYS} must be integers") from None
    num_layers, num_heads = dims["num_layers"], dims["num_heads"]
    nqb = -(-dims["seq_len"] // max(dims["block_size"], 1))
    expected = {
        "block_field": (num_layers, num_heads, nqb, nqb),
        "importance": (num_layers, num_heads),
        "redundancy": (num_layers, num_heads, num_heads),
        "mass": (num_layers, num_heads),
        "kv_groups": (num_layers, num_heads),
    }
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise UserError(
                f"{where}: {key} has shape {tuple(tensors[key].shape)}, metadata implies {shape}"
            )
    groups = tensors["kv_groups"]
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= dims["num_kv_heads"]):
        raise UserError(f"{where}: kv_groups index a KV head outside 0..{dims['num_kv_heads'] - 1}")
    for key in ("block_field", "importance", "redundancy", "mass"):
        if not torch.isfinite(tensors[key]).all():
            raise UserError(f"{where}: {key} holds non-finite values")


def block_values(field: dict[str, torch.Tensor], kind: str) -> np.ndarray:
    """(L, H, NQB, NQB) row shares the QUBO's block terms use; each causal row sums to 1.

    mass: the block field itself (mean attention mass). kl: each block's share of its row's drop cost
    −log(1 − p_qb) averaged over the row's queries (measure's `block_cost`): a block that a few queries
    cannot do without (the previous block, for the first queries of a block) is worth more than its
    mean mass says.
    """
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


def read_field(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load and validate a field.safetensors; any problem is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"field file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot read field {path}: {str(err).splitlines()[0]}") from None
    _validate_field(tensors, meta, str(path))
    return tensors, meta


def check_field_matches_model(
    meta: dict[str, str], num_layers: int, num_heads: int, num_kv_heads: int
) -> None:
    """UserError if the field was measured on a model of another shape."""
    got = tuple(int(meta.get(k, -1)) for k in ("num_layers", "num_heads", "num_kv_heads"))
    want = (num_layers, num_heads, num_kv_heads)
    if got != want:
        raise UserError(
            f"field is for a model with (layers, heads, kv heads) = {got}, this model has {want}"
        )


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


def _full_mask(nqb: int, heads: np.ndarray, blocks: np.ndarray) -> torch.Tensor:
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


def solve_field(
    field: dict[str, torch.Tensor], field_meta: dict[str, str], cfg: SolveConfig
) -> SolveResult:
    """Keep/drop decisions for every head and block at the configured budget (pure: no files)."""
    _validate_field(field, field_meta, "field")
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
        eps=cfg.eps,
        mass_scale=cfg.mass_scale,
        redundancy_weight=cfg.redundancy_weight,
        kv_cost=cfg.kv_cost,
        contiguity=cfg.contiguity,
        penalty_margin=cfg.penalty_margin,
        block_scale=cfg.block_scale,
    )
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
    solve_seconds = time.perf_counter() - t_start
    solve_cpu_seconds = (
        time.process_time() - cpu_start
    )  # all threads: what the solve costs unshared

    nb = terms.value.shape[-1]
    finals, subs, bad = [], [], 0
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
    count = computed_blocks(nqb, heads, blocks)
    if count != target or (target_heads is not None and int(heads.sum()) != target_heads):
        raise RuntimeError(f"repair missed the budget: {count} blocks for {target}")

    t_check = time.perf_counter()
    checks = _exact_checks(cfg, terms, results, finals)
    check_seconds = time.perf_counter() - t_check

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
        baseline_out[name] = (torch.from_numpy(bh), _full_mask(nqb, bh, bb))
        baseline_rep[name] = {
            "objective": float(objective(terms, bh, bb).sum()),
            "density": computed_blocks(nqb, bh, bb) / total,
            "heads_kept": int(bh.sum()),
        }
    gaps = [
        c[k]["gap"]
        for c in checks
        for k in ("milp", "brute_force")
        if c.get(k, {}).get("gap") is not None
    ]
    sub_reports = []
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
    rep = {
        "density_target": cfg.density,
        "density": count / total,
        "blocks_computed": count,
        "blocks_target": target,
        "blocks_total": total,
        "heads_kept": int(heads.sum()),
        "heads_dropped": int(heads.size - heads.sum()),
        "heads_target": target_heads,
        "lambda": lam,
        "mu": mu,
        "rounds": rounds,
        "repair": moved,
        "constraint_violations": bad,
        "objective": float(qubo_obj.sum()),
        "objective_per_layer": qubo_obj.tolist(),
        "solve_seconds": solve_seconds,
        "solve_cpu_seconds": solve_cpu_seconds,
        "check_seconds": check_seconds,
        "max_gap": max(gaps) if gaps else None,
        "num_subproblems": len(results),
        "num_variables": int(sum(r.sub.num_variables for r in results)),
        "baselines": baseline_rep,
        "exact_checks": checks,
        "subproblems": sub_reports,
        "config": asdict(cfg),
        "load_average": list(os.getloadavg()),
    }
    meta = {
        "block_size": field_meta["block_size"],
        "max_length": field_meta["seq_len"],
        "heads_kept": str(int(heads.sum())),
    }
    return SolveResult(
        head_keep=torch.from_numpy(heads),
        block_mask=_full_mask(nqb, heads, blocks),
        baselines=baseline_out,
        report=rep,
        subproblems=subs,
        meta=meta,
    )


def _save_masks(
    path: Path, head_keep: torch.Tensor, block_mask: torch.Tensor, meta: dict[str, str], method: str
) -> None:
    masks = Masks(head_keep, block_mask, int(meta["block_size"]), int(meta["max_length"]), method)
    write_masks(masks, path)


def write_solve_outputs(result: SolveResult, out_dir: Path) -> None:
    """masks.safetensors, masks_<baseline>.safetensors, bqm/*.bqm + *.json, solver_report.json, PNGs."""
    out_dir = Path(out_dir)
    (out_dir / "bqm").mkdir(parents=True, exist_ok=True)
    _save_masks(
        out_dir / "masks.safetensors", result.head_keep, result.block_mask, result.meta, "qubo-sa"
    )
    for name, (hk, bm) in result.baselines.items():
        _save_masks(out_dir / f"masks_{name}.safetensors", hk, bm, result.meta, name)
    for i, item in enumerate(result.subproblems):
        sub = item["sub"]
        stem = f"layer_{sub.layer:02d}_c{i:03d}"
        with sub.bqm().to_file() as f:
            (out_dir / "bqm" / f"{stem}.bqm").write_bytes(f.read())
        samples = {
            name: {
                "state": item[name].astype(int).tolist(),
                "energy": float(sub.energy(item[name][None, :])[0]),
            }
            for name in ("anneal", "final")
        }
        record = {
            "bqm_file": f"{stem}.bqm",
            "layer": sub.layer,
            "heads": sub.heads,
            "kv_heads": sub.kv,
            "variables": "labels 0..n-1: query heads (heads order), KV heads (kv_heads order), then "
            "off-diagonal blocks head by head in numpy.tril_indices(NQB, -1) order",
            "lambda": item["lambda"],
            "mu": item["mu"],
            "samples": samples,
        }
        (out_dir / "bqm" / f"{stem}.json").write_text(json.dumps(record))
    (out_dir / "solver_report.json").write_text(json.dumps(result.report, indent=1))
    report.plot_heads(result.head_keep.numpy(), out_dir / "heads.png")
    report.plot_blocks(
        result.block_mask.numpy(),
        out_dir / "blocks.png",
        "QUBO: share of heads computing each block",
    )
    objectives = {"qubo": result.report["objective"]}
    objectives.update({k: v["objective"] for k, v in result.report["baselines"].items()})
    report.plot_objectives(objectives, out_dir / "objectives.png")


def run_stage(cfg: SolveConfig, field_path: Path, out_dir: Path) -> SolveResult:
    """Read the field, solve, write everything into out_dir (the caller makes it atomic)."""
    tensors, meta = read_field(field_path)
    result = solve_field(tensors, meta, cfg)
    write_solve_outputs(result, out_dir)
    return result
