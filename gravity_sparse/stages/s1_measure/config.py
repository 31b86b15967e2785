"""The measure section of the pipeline config (light: no model code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gravity_sparse.errors import UserError

IMPORTANCE_METHODS = ("ablation", "grad", "both")


@dataclass
class MeasureConfig:
    seq_len: int = field(default=512, metadata={"help": "tokens per calibration sequence"})
    block_size: int = field(default=64, metadata={"help": "block size of the field grid"})
    num_sequences: int = field(
        default=32,
        metadata={"help": "calibration sequences to use at most (0 = all the text gives)"},
    )
    batch_size: int = field(default=4, metadata={"help": "sequences per forward in the field pass"})
    importance: str = field(
        default="both", metadata={"help": "head importance: ablation (exact) | grad | both"}
    )
    ablation_sequences: int = field(
        default=4, metadata={"help": "sequences used for exact ablation importance"}
    )
    ablation_group: int = field(
        default=0, metadata={"help": "heads ablated per forward (0 = all heads of a layer)"}
    )
    block_grad: bool = field(
        default=False,
        metadata={
            "help": "with grad importance, also the loss's gradient for a gate on every block "
            "(block_grad, block_grad_abs: solve.block_value grad / grad_abs); costs the grad pass more"
        },
    )
    chunk_elements: int = field(
        default=1 << 26,
        metadata={"help": "max elements of one attention-probability chunk (queries are chunked)"},
    )
    plots: bool = field(default=True, metadata={"help": "write PNG plots"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars on stderr"})

    def __post_init__(self) -> None:
        for name in ("seq_len", "block_size", "batch_size", "chunk_elements"):
            if getattr(self, name) < 1:
                raise UserError(f"measure.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_sequences", "ablation_sequences", "ablation_group"):
            if getattr(self, name) < 0:
                raise UserError(f"measure.{name} must be >= 0, got {getattr(self, name)}")
        if self.importance not in IMPORTANCE_METHODS:
            raise UserError(
                f"measure.importance must be one of {', '.join(IMPORTANCE_METHODS)}, "
                f"got {self.importance!r}"
            )
        if self.block_grad and self.importance == "ablation":
            raise UserError("measure.block_grad needs measure.importance grad or both")
        if self.importance != "grad" and self.ablation_sequences == 0:
            raise UserError("measure.importance needs ablation but measure.ablation_sequences is 0")
