"""The solve section of the pipeline config (light: the QUBO numerics are not imported)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gravity_sparse.errors import UserError
from gravity_sparse.qubo.limits import MAX_BLOCK_VARIABLES
from gravity_sparse.qubo.registry import (
    BASELINES,
    BRUTE_FORCE_MAX,
    STRUCTURE_COSTS,
    STRUCTURE_ROWS,
    STRUCTURE_SINKS,
)

DEFAULT_EPS = 0.1  # GravityConfig's gravity_eps default (a model without the key has this ε)
# what a block is worth: row shares of a measured field, or measured loss changes in nats (absolute)
ABSOLUTE_BLOCK_VALUES = ("grad", "grad_abs")
BLOCK_VALUES = ("profile", "kl", "mass", *ABSOLUTE_BLOCK_VALUES)
STRUCTURES = ("blocks", "window")  # what the QUBO chooses inside a kept head


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
            "the block, + sink) | kl (share of the row's drop cost −log(1−p)) | mass (block field) | "
            "grad (measured first-order loss change of dropping the block, nats, either sign) | "
            "grad_abs (its mean magnitude per sequence); both need measure.block_grad"
        },
    )
    block_scale: str = field(
        default="flat",
        metadata={
            "help": "block values scale with: importance (the head's) | flat (the model's mean) | "
            "sqrt (their geometric mean)"
        },
    )
    row_coupling: float = field(
        default=0.0,
        metadata={
            "help": "weight of the pairwise row coupling γ(1−z_a)(1−z_b), γ = log(1 + p_a p_b/(1 − "
            "p_a − p_b)): dropping blocks of one query row together costs more than apart "
            "(−log(1 − Σp) is convex); 1 = the exact pairwise term, 0 = off; not with grad values"
        },
    )
    structure: str = field(
        default="blocks",
        metadata={
            "help": "what the QUBO chooses inside a kept head: blocks (every off-diagonal block "
            "free) | window (one structure per head: a window of w nearest key blocks, with or "
            "without the sink column, priced by the exact row cost, see structure_rows; block_value and row_coupling "
            "then only set the unit of kv_cost and penalty_margin)"
        },
    )
    structure_cost: str = field(
        default="kl",
        metadata={
            "help": "row cost of a structure (structure=window), per query with kept attention share "
            "k: kl (−log k) | mass (1 − k) | sq ((1 − k)², second order in the output change)"
        },
    )
    structure_sink: str = field(
        default="always",
        metadata={
            "help": "structure=window: every kept head keeps the sink column (always) or the QUBO "
            "decides per head (choose)"
        },
    )
    structure_rows: str = field(
        default="profile",
        metadata={
            "help": "structure=window: a structure's row cost per query from the head's distance "
            "profile (profile) or per query block from the measured block field (field)"
        },
    )
    importance_source: str = field(
        default="ablation", metadata={"help": "head importance: ablation | grad"}
    )
    eps: float | None = field(
        default=None,
        metadata={
            "help": "gravity ε (score bound M²/ε): always the model's; null takes it from the model, "
            "another value is an error"
        },
    )
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
        if self.block_value not in BLOCK_VALUES:
            raise UserError(
                f"solve.block_value must be one of {', '.join(BLOCK_VALUES)}, got {self.block_value!r}"
            )
        if self.block_scale not in ("importance", "flat", "sqrt"):
            raise UserError(
                f"solve.block_scale must be importance, flat or sqrt, got {self.block_scale!r}"
            )
        if self.structure not in STRUCTURES:
            raise UserError(
                f"solve.structure must be one of {', '.join(STRUCTURES)}, got {self.structure!r}"
            )
        if self.structure_cost not in STRUCTURE_COSTS:
            raise UserError(
                f"solve.structure_cost must be one of {', '.join(STRUCTURE_COSTS)}, got "
                f"{self.structure_cost!r}"
            )
        if self.structure_rows not in STRUCTURE_ROWS:
            raise UserError(
                f"solve.structure_rows must be one of {', '.join(STRUCTURE_ROWS)}, got "
                f"{self.structure_rows!r}"
            )
        if self.structure_sink not in STRUCTURE_SINKS:
            raise UserError(
                f"solve.structure_sink must be one of {', '.join(STRUCTURE_SINKS)}, got "
                f"{self.structure_sink!r}"
            )
        if self.importance_source not in ("ablation", "grad"):
            raise UserError(
                f"solve.importance_source must be ablation or grad, got {self.importance_source!r}"
            )
        for name in ("eps", "penalty_margin"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"solve.{name} must be positive, got {value}")
        if self.row_coupling and self.block_value in ABSOLUTE_BLOCK_VALUES:
            raise UserError(
                f"solve.row_coupling needs row-share block values (profile, kl, mass), not "
                f"{self.block_value}"
            )
        for name in (
            "mass_scale",
            "redundancy_weight",
            "kv_cost",
            "contiguity",
            "milp_time_limit",
            "row_coupling",
        ):
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
        if self.brute_force_max > BRUTE_FORCE_MAX:
            raise UserError(f"solve.brute_force_max is at most {BRUTE_FORCE_MAX}")


def resolve_eps(cfg: SolveConfig, model_eps: float) -> float:
    """The ε the QUBO uses: the model's. `solve.eps` may be left null or restate it; anything else is an
    error (it used to be replaced silently)."""
    if cfg.eps is not None and not math.isclose(cfg.eps, model_eps, rel_tol=1e-9, abs_tol=0.0):
        raise UserError(
            f"solve.eps {cfg.eps} differs from the model's gravity_eps {model_eps}: ε is the model's, "
            "leave solve.eps unset"
        )
    return float(model_eps)
