"""Configuration of `gravity-sparse eval passkey` (light: no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gravity_sparse.errors import UserError


@dataclass
class PasskeyConfig:
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
    out: str = field(default="runs/passkey", metadata={"help": "results folder (must not exist)"})

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 64:
            raise UserError("passkey lengths must be a non-empty list of at least 64 tokens each")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise UserError("passkey depths must be a non-empty list in [0, 1]")
        if self.trials < 1:
            raise UserError("passkey trials must be at least 1")
        if not self.dense and not self.masks:
            raise UserError("passkey has nothing to evaluate: dense=false and no masks")
