"""apply: run the model with the solved masks and measure held-out quality, dense vs sparse, unhealed.

Reads `NN_solve/masks.safetensors` (the QUBO's masks) and every `masks_<baseline>.safetensors` beside it, and
evaluates each on the held-out text at the same sequence length: loss in nats/token and perplexity. The
sparse attention is the chunked CPU kernel on CPU and the Triton kernel on CUDA (`masks.attach_masks`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .chunked_loss import eval_loss_chunked
from .data import resolve_text, to_ids
from .errors import UserError
from .kernels.causal_cpu import set_training_kernel
from .masks import Masks, attach_masks, detach_masks, read_masks


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
    kernel: str = field(default="auto", metadata={"help": "auto | cpu | reference | triton | flex"})

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.batch_size < 1:
            raise UserError("apply.seq_len and apply.batch_size must be positive")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError("apply.max_tokens must be positive or null")
        if self.kernel not in ("auto", "cpu", "reference", "triton", "flex"):
            raise UserError(
                f"apply.kernel must be auto, cpu, reference, triton or flex, not {self.kernel!r}"
            )


def masks_in(solve_dir: Path, baselines: bool = True) -> dict[str, Path]:
    """{"qubo": masks.safetensors, "<baseline>": masks_<baseline>.safetensors, ...} of a solve folder."""
    found = {"qubo": solve_dir / "masks.safetensors"}
    if not found["qubo"].is_file():
        raise UserError(f"{solve_dir} has no masks.safetensors")
    if baselines:
        for p in sorted(solve_dir.glob("masks_*.safetensors")):
            found[p.stem.removeprefix("masks_")] = p
    return found


def sparse_loss(
    model: torch.nn.Module, masks: Masks | None, ids: torch.Tensor, cfg: ApplyConfig
) -> tuple[float, int]:
    """Held-out loss of the model with `masks` attached (None: dense); the model is left dense."""
    # dense on CPU: the chunked CPU kernel too, not the reference's (B, H, S, S) tensors
    dense_cpu = masks is None and (
        cfg.kernel == "cpu"
        or (cfg.kernel == "auto" and next(model.parameters()).device.type != "cuda")
    )
    if masks is not None:
        if cfg.seq_len > masks.max_length:
            raise UserError(
                f"apply.seq_len {cfg.seq_len} is longer than the masks' max_length {masks.max_length}"
            )
        attach_masks(model, masks, kernel=cfg.kernel)
    elif dense_cpu:
        set_training_kernel(model, True)
    try:
        return eval_loss_chunked(model, ids, cfg.seq_len, cfg.batch_size, cfg.max_tokens)
    finally:
        if masks is not None:
            detach_masks(model)
        elif dense_cpu:
            set_training_kernel(model, False)


def evaluate_masks(
    model: torch.nn.Module, mask_files: dict[str, Path], cfg: ApplyConfig
) -> list[dict[str, Any]]:
    """One row per pattern (dense first): method, density, heads kept, loss, perplexity, tokens."""
    ids = to_ids(resolve_text(cfg.eval_text))
    rows = []
    loss, n = sparse_loss(model, None, ids, cfg)
    heads = sum(a.num_heads for a in model.gravity_layers())
    rows.append(_row("dense", 1.0, heads, heads, loss, n))
    for name, path in mask_files.items():
        masks = read_masks(path)
        loss, n = sparse_loss(model, masks, ids, cfg)
        rows.append(_row(name, masks.density(), masks.heads_kept(), heads, loss, n))
    return rows


def _row(method: str, density: float, kept: int, heads: int, loss: float, n: int) -> dict[str, Any]:
    return {
        "method": method,
        "density": round(density, 6),
        "heads_kept": kept,
        "heads_total": heads,
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": n,
    }


def results_markdown(rows: list[dict[str, Any]], title: str) -> str:
    dense = rows[0]["loss"]
    lines = [
        f"### {title}",
        "",
        "| method | density | heads kept | loss (nats/token) | perplexity | Δ vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = 100.0 * (r["loss"] - dense) / dense
        lines.append(
            f"| {r['method']} | {r['density']:.3f} | {r['heads_kept']}/{r['heads_total']} | "
            f"{r['loss']:.4f} | {r['perplexity']:.3f} | {delta:+.2f}% |"
        )
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], out_dir: Path, title: str) -> None:
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(rows, title))
