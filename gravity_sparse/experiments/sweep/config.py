"""The sweep section of the pipeline config (light)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gravity_sparse.errors import UserError
from gravity_sparse.qubo.registry import METHODS


@dataclass
class SweepConfig:
    densities: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.35, 0.5], metadata={"help": "target densities"}
    )
    head_drops: list[float] = field(
        default_factory=lambda: [0.0, 0.25], metadata={"help": "fractions of query heads dropped"}
    )
    methods: list[str] = field(
        default_factory=lambda: ["qubo", "greedy", "window", "random"],
        metadata={"help": f"qubo and baselines ({', '.join(METHODS)})"},
    )
    heal: bool = field(default=True, metadata={"help": "also heal every pattern and evaluate it"})
    heal_token_budget: int = field(
        default=65536, metadata={"help": "training tokens per heal in the sweep"}
    )
    eval_max_tokens: int = field(
        default=16384, metadata={"help": "held-out tokens evaluated at most"}
    )
    recall_trials: int = field(
        default=0,
        metadata={"help": "recall trials per cell for every pattern, unhealed and healed (0: off)"},
    )
    recall_lengths: list[int] = field(
        default_factory=lambda: [2048], metadata={"help": "recall context lengths (≤ mask length)"}
    )
    recall_depths: list[float] = field(
        default_factory=lambda: [0.1, 0.5, 0.9], metadata={"help": "recall segment depths"}
    )
    recall_choices: int = field(default=4, metadata={"help": "recall contexts per trial"})
    recall_segment: int = field(default=32, metadata={"help": "recall tokens per segment"})

    def __post_init__(self) -> None:
        if not self.densities or not all(0.0 < d <= 1.0 for d in self.densities):
            raise UserError("sweep.densities must be a non-empty list in (0, 1]")
        if not self.head_drops or not all(0.0 <= h < 1.0 for h in self.head_drops):
            raise UserError("sweep.head_drops must be a non-empty list in [0, 1)")
        if not self.methods or set(self.methods) - set(METHODS):
            raise UserError(f"sweep.methods must be chosen from {', '.join(METHODS)}")
        if self.heal_token_budget <= 0 or self.eval_max_tokens <= 0:
            raise UserError("sweep.heal_token_budget and sweep.eval_max_tokens must be positive")
        if self.recall_trials < 0 or self.recall_choices < 2 or self.recall_segment < 2:
            raise UserError(
                "sweep.recall_trials must be ≥ 0, recall_choices and recall_segment ≥ 2"
            )
        if not self.recall_lengths or not all(0.0 <= d <= 1.0 for d in self.recall_depths):
            raise UserError("sweep.recall_lengths must be non-empty and recall_depths in [0, 1]")
