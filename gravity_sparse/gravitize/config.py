"""Configuration of `gravity-sparse gravitize` (light: no torch, transformers or peft import)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError


@dataclass
class GravitizeConfig:
    source: str = field(default="", metadata={"help": "HF model directory or a .gguf file"})
    out: str = field(default="", metadata={"help": "output model directory (our format)"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer directory (default: the source's own)"}
    )
    calibration_text: str = field(default="calibration", metadata={"help": "corpus split or file"})
    eval_texts: str = field(
        default="heldout,docstrings",
        metadata={
            "help": "comma-separated held-out texts (splits, docstrings or files; loss only)"
        },
    )
    seq_len: int = 512
    num_sequences: int = 8
    heldback_sequences: int = 2
    steps: int = 300
    lr: float = 5e-3
    batch_size: int = 4
    target_d2: float = field(default=4.0, metadata={"help": "median ‖q−k‖² after the q/k rescale"})
    mass_init: float = field(
        default=0.5, metadata={"help": "initial gravity_mass_log (the card's)"}
    )
    eps: float = 0.1
    eval_max_tokens: int = 16384
    distill_steps: int = field(
        default=0,
        metadata={"help": "end-to-end LoRA distillation steps after the transfer (0: none)"},
    )
    distill_text: str = field(
        default="teacher,train",
        metadata={
            "help": "comma-separated texts to distil on: corpus splits, files, or teacher "
            "(conversations the original model samples), or repeats[:SPLIT] (windows that repeat "
            "spans of a split, so that copying from context carries over)"
        },
    )
    distill_teacher_tokens: int = field(
        default=65536, metadata={"help": "tokens of teacher text to sample for distillation"}
    )
    distill_seq_len: int = 256
    distill_batch_size: int = 4
    distill_lr: float = 5e-4
    distill_lora_r: int = 16
    distill_weight: float = field(
        default=0.5, metadata={"help": "KL share of the distillation loss"}
    )
    ship: str = field(
        default="full",
        metadata={
            "help": "full: every weight; delta: only the difference to the source (e.g. an installed GGUF)"
        },
    )
    start_from: str | None = field(
        default=None,
        metadata={
            "help": "a finished gravitize output to continue from: its fitted layers are kept (no "
            "transfer), and with ship=delta only the update over it is added to its delta files"
        },
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.num_sequences < 1 or self.heldback_sequences < 1:
            raise UserError(
                "gravitize needs seq_len ≥ 2, num_sequences ≥ 1, heldback_sequences ≥ 1"
            )
        if self.steps < 0 or self.lr <= 0 or self.target_d2 <= 0 or self.eps <= 0:
            raise UserError("gravitize needs steps ≥ 0 and positive lr, target_d2 and eps")
        if self.ship not in ("full", "delta"):
            raise UserError(f"gravitize ship={self.ship!r}: expected full or delta")
