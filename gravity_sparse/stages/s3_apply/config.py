"""The apply section of the pipeline config (light: no model or training code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gravity_sparse.errors import UserError
from gravity_sparse.kernels.api import BACKEND_HELP, check_backend


@dataclass
class ApplyConfig:
    eval_text: str = field(
        default="heldout",
        metadata={"help": "corpus split (heldout, ...) or a text file to evaluate on"},
    )
    seq_len: int = field(
        default=512, metadata={"help": "evaluation window, ≤ the masks' max_length"}
    )
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    max_tokens: int | None = field(
        default=None, metadata={"help": "evaluate only the first N tokens (null = all)"}
    )
    baselines: bool = field(default=True, metadata={"help": "also evaluate every baseline's masks"})
    kernel: str = field(default="auto", metadata={"help": BACKEND_HELP})

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.batch_size < 1:
            raise UserError("apply.seq_len and apply.batch_size must be positive")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError("apply.max_tokens must be positive or null")
        check_backend("apply.kernel", self.kernel)
