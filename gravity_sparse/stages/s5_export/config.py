"""The export section of the pipeline config (light: no model or training code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gravity_sparse.errors import UserError


@dataclass
class ExportConfig:
    dir: str | None = field(
        default=None,
        metadata={
            "help": "also copy the pruned checkpoint here (refused if it exists, unless --overwrite)"
        },
    )
    parity_len: int = field(default=256, metadata={"help": "tokens per parity-check sequence"})
    parity_batch: int = field(default=2, metadata={"help": "sequences in the parity check"})
    parity_tolerance: float = field(
        default=1e-4, metadata={"help": "max |Δlogit| allowed between export and in-pipeline model"}
    )
    check_plain: bool = field(
        default=True,
        metadata={
            "help": "also load the export in plain transformers (no gravity_sparse) and compare"
        },
    )

    def __post_init__(self) -> None:
        if self.parity_len < 2 or self.parity_batch < 1 or self.parity_tolerance <= 0:
            raise UserError(
                "export.parity_len ≥ 2, parity_batch ≥ 1 and parity_tolerance > 0 please"
            )
