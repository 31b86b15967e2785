"""The bench section of the pipeline config (light: no model or training code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gravity_sparse.errors import UserError
from gravity_sparse.kernels.api import BACKEND_HELP, check_backend


@dataclass
class BenchConfig:
    prefill_lengths: list[int] = field(
        default_factory=lambda: [128, 256, 512], metadata={"help": "prefill lengths (tokens)"}
    )
    batch_size: int = field(default=1, metadata={"help": "sequences per forward"})
    decode_context: int | list[int] = field(
        default=256, metadata={"help": "prefilled tokens before decoding (one length or a list)"}
    )
    decode_tokens: int = field(default=32, metadata={"help": "tokens decoded one by one (timed)"})
    repeats: int = field(
        default=3, metadata={"help": "timed runs per measurement (median, with min and max)"}
    )
    warmup: int = field(default=1, metadata={"help": "untimed runs first"})
    kernel: str = field(
        default="auto",
        metadata={
            "help": "attention backend of both the dense and the sparse model: " + BACKEND_HELP
        },
    )
    extend: str = field(
        default="none", metadata={"help": "masks beyond max_length: none (error) | diagonal"}
    )
    synthetic: str | None = field(
        default=None,
        metadata={
            "help": "gravity2 | smol: random weights in Gravity-2's / gravity-smol's shape instead "
            "of model.path"
        },
    )
    synthetic_layers: int | None = field(
        default=None,
        metadata={"help": "layers of the synthetic model (default: the shape's, 36 or 30)"},
    )

    variants: list[str] = field(
        default_factory=lambda: ["export", "in-pipeline", "checkpoint"],
        metadata={
            "help": "what to time: export (pruned, as exported) | in-pipeline (masks attached) | "
            "checkpoint (the model as loaded, dense)"
        },
    )

    def decode_contexts(self) -> list[int]:
        return (
            [self.decode_context] if isinstance(self.decode_context, int) else self.decode_context
        )

    def __post_init__(self) -> None:
        if not self.prefill_lengths or min(self.prefill_lengths) < 1:
            raise UserError("bench.prefill_lengths must be a non-empty list of positive lengths")
        contexts = self.decode_context
        if isinstance(contexts, bool) or not (
            isinstance(contexts, int)
            or (isinstance(contexts, list) and contexts and all(type(c) is int for c in contexts))
        ):
            raise UserError(
                f"bench.decode_context must be a length or a list of them, not {contexts!r}"
            )
        if min(self.decode_contexts()) < 1:
            raise UserError("bench.decode_context must be at least 1")
        unknown = set(self.variants) - {"export", "in-pipeline", "checkpoint"}
        if unknown or not self.variants:
            raise UserError(
                f"bench.variants must be some of export, in-pipeline, checkpoint, not {self.variants}"
            )
        for name in ("batch_size", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"bench.{name} must be at least 1")
        if self.warmup < 0:
            raise UserError("bench.warmup must be ≥ 0")
        if self.extend not in ("none", "diagonal"):
            raise UserError(f"bench.extend must be none or diagonal, not {self.extend!r}")
        check_backend("bench.kernel", self.kernel)
        if self.synthetic not in (None, "gravity2", "smol"):
            raise UserError(
                f"bench.synthetic must be null, gravity2 or smol, not {self.synthetic!r}"
            )
