"""The heal section of the pipeline config (light: no model or training code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gravity_sparse.errors import UserError
from gravity_sparse.kernels.api import BACKEND_HELP, check_backend


@dataclass
class HealConfig:
    text: str = field(default="heal", metadata={"help": "corpus split or text file to heal on"})
    eval_text: str = field(default="heldout", metadata={"help": "held-out text, evaluated only"})
    token_budget: int = field(
        default=400_000,
        metadata={
            "help": "training tokens over all processes (steps = budget / (batch · seq_len))"
        },
    )
    seq_len: int = field(default=512, metadata={"help": "training window, ≤ the masks' max_length"})
    batch_size: int = field(
        default=8,
        metadata={"help": "sequences per step over all processes (split evenly over the ranks)"},
    )
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (LoRA and masses)"})
    warmup_fraction: float = field(default=0.05, metadata={"help": "linear warm-up share of steps"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA scale numerator"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    distill: float = field(
        default=0.5,
        metadata={
            "help": "weight of self-distillation from the dense model (KL to its next-token "
            "distribution); 0 = plain next-token loss, 1 = distillation only"
        },
    )
    train_masses: bool = field(default=True, metadata={"help": "train gravity_mass_log too"})
    val_fraction: float = field(
        default=0.15, metadata={"help": "share of the heal text held back for early stopping"}
    )
    eval_every: int = field(default=10, metadata={"help": "validate every N steps"})
    patience: int = field(default=3, metadata={"help": "stop after N validations without gain"})
    eval_max_tokens: int | None = field(
        default=None, metadata={"help": "limit the held-out evaluation to N tokens (null = all)"}
    )
    eval_batch_size: int = field(default=4, metadata={"help": "windows per evaluation pass"})
    kernel: str = field(
        default="auto", metadata={"help": "attention backend while healing: " + BACKEND_HELP}
    )
    dense_reference: bool = field(
        default=False,
        metadata={
            "help": "also heal the dense model (every block kept) the same way and compare with it: "
            "the fair reference where the dense model is itself weak at heal.seq_len"
        },
    )

    def __post_init__(self) -> None:
        if self.token_budget <= 0:
            raise UserError(f"heal.token_budget must be positive, got {self.token_budget}")
        if self.token_budget < self.batch_size * self.seq_len:
            raise UserError(
                f"heal.token_budget {self.token_budget} is less than one step "
                f"({self.batch_size} × {self.seq_len} tokens)"
            )
        if not 0.0 < self.val_fraction < 0.5:
            raise UserError("heal.val_fraction must be in (0, 0.5)")
        if not 0.0 <= self.distill <= 1.0:
            raise UserError(f"heal.distill must be in [0, 1], got {self.distill}")
        if self.lora_r < 1 or self.eval_every < 1 or self.patience < 1:
            raise UserError("heal.lora_r, heal.eval_every and heal.patience must be positive")
        check_backend("heal.kernel", self.kernel)

    @property
    def max_steps(self) -> int:
        return max(1, self.token_budget // (self.batch_size * self.seq_len))
