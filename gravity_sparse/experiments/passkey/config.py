"""Configuration of `gravity-sparse eval passkey` and `eval recall` (light: no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gravity_sparse.errors import UserError

TASKS = ("passkey", "recall")


@dataclass
class PasskeyConfig:
    task: str = field(
        default="passkey",
        metadata={
            "help": "passkey (greedy key retrieval) or recall (which context holds a segment)"
        },
    )
    model: str | None = field(default=None, metadata={"help": "model directory (default: tiny)"})
    masks: list[str] = field(
        default_factory=list,
        metadata={"help": "mask files (masks.safetensors) to evaluate besides the dense model"},
    )
    dense: bool = field(default=True, metadata={"help": "also evaluate the dense model"})
    lengths: list[int] = field(
        default_factory=lambda: [1024, 2048], metadata={"help": "prompt lengths in tokens"}
    )
    depths: list[float] = field(
        default_factory=lambda: [0.1, 0.5, 0.9],
        metadata={"help": "where the key sits, as a fraction of the filler"},
    )
    trials: int = field(default=50, metadata={"help": "trials (keys) per length and depth"})
    seed: int = 0
    choices: int = field(
        default=4, metadata={"help": "recall: contexts per trial (chance 1/choices)"}
    )
    segment: int = field(default=32, metadata={"help": "recall: tokens per segment"})
    out: str | None = field(
        default=None, metadata={"help": "results folder, must not exist (default runs/<task>)"}
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"eval task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.choices < 2 or self.segment < 2:
            raise UserError("recall choices and segment must be at least 2")
        self.out = self.out or f"runs/{self.task}"
        if not self.lengths or min(self.lengths) < 64:
            raise UserError("passkey lengths must be a non-empty list of at least 64 tokens each")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise UserError("passkey depths must be a non-empty list in [0, 1]")
        if self.trials < 1:
            raise UserError("passkey trials must be at least 1")
        if self.task == "recall" and min(self.lengths) <= (len(self.depths) + 1) * self.segment:
            raise UserError(
                f"recall length {min(self.lengths)} leaves no room for filler around "
                f"{len(self.depths)} segments of {self.segment} tokens"
            )
        if not self.dense and not self.masks:
            raise UserError("passkey has nothing to evaluate: dense=false and no masks")
