"""The pretraining config (`pipelines/pretrain-tiny.yaml`; light)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gravity_sparse.errors import UserError


@dataclass
class PretrainConfig:
    num_layers: int = field(default=4, metadata={"help": "decoder layers"})
    hidden_size: int = field(default=256, metadata={"help": "model width"})
    num_heads: int = field(default=8, metadata={"help": "query heads per layer"})
    num_kv_heads: int = field(default=2, metadata={"help": "KV heads per layer (GQA)"})
    intermediate_size: int = field(default=688, metadata={"help": "MLP width"})
    seq_len: int = field(default=512, metadata={"help": "training context (tokens = bytes)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary base"})
    gravity_eps: float = field(default=0.1, metadata={"help": "softening ε of the gravity score"})
    mass_init: float = field(
        default=3.0, metadata={"help": "initial gravity_mass_log (raw; M = softplus ≈ 3.05)"}
    )
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr (cosine)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    mass_lr: float = field(default=1e-2, metadata={"help": "peak learning rate of the masses"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay of matrices"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    seed: int = field(default=0, metadata={"help": "initialisation and batch seed"})
    eval_interval: int = field(default=250, metadata={"help": "steps between held-out evaluations"})
    eval_tokens: int = field(
        default=8192, metadata={"help": "held-out tokens per interim evaluation"}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "sequences per evaluation batch"})
    log_interval: int = field(default=10, metadata={"help": "steps between loss log lines"})
    checkpoint_interval: int = field(default=100, metadata={"help": "steps between resume states"})
    time_budget_minutes: float = field(
        default=0.0, metadata={"help": "stop early and finish with the current weights (0: off)"}
    )
    num_threads: int = field(
        default=1, metadata={"help": "torch CPU threads (1 degrades least on a shared machine)"}
    )
    sample_prompt: str = field(default="The ", metadata={"help": "prompt of the final sample"})
    sample_tokens: int = field(default=300, metadata={"help": "bytes generated for the sample"})
    out_dir: str = field(default="runs/pretrain-tiny", metadata={"help": "output folder (CLI)"})

    def __post_init__(self) -> None:
        positive = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
        positive += ("seq_len", "batch_size", "steps", "eval_interval", "eval_tokens")
        positive += ("eval_batch_size", "log_interval", "checkpoint_interval", "num_threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"pretrain: {name} must be at least 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"pretrain: {self.num_heads} query heads do not split into {self.num_kv_heads} KV heads"
            )
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"pretrain: hidden_size {self.hidden_size} is not a multiple of {self.num_heads} heads"
            )
        if not (self.lr > 0 and self.mass_lr >= 0 and 0 <= self.min_lr_ratio <= 1):
            raise UserError("pretrain: need lr > 0, mass_lr >= 0 and 0 <= min_lr_ratio <= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise UserError(f"pretrain: warmup_steps must be in [0, steps={self.steps}]")
        if self.gravity_eps <= 0:
            raise UserError("pretrain: gravity_eps must be positive")
