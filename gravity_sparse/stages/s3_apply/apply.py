"""apply: run the model with the solved masks and measure held-out quality, dense vs sparse, unhealed.

Reads `NN_solve/masks.safetensors` (the QUBO's masks) and every `masks_<baseline>.safetensors` beside it, and
evaluates each on the held-out text at the same sequence length: loss in nats/token and perplexity. The
sparse attention runs in the backend `apply.kernel` names, resolved by `kernels.resolve_backend` (auto:
the block path on CPU, Triton on CUDA); the file names do not matter, the stored method does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from gravity_sparse.errors import UserError
from gravity_sparse.kernels.attach import attach_kernel, detach_kernel
from gravity_sparse.model.data import encode_text, eval_loss, resolve_text
from gravity_sparse.model.masks import (
    Masks,
    attach_masks,
    detach_masks,
    read_masks,
    read_masks_method,
)
from gravity_sparse.qubo.registry import QUBO, masks_file_name, method_label
from gravity_sparse.stages.s3_apply.config import ApplyConfig


def masks_in(solve_dir: Path, baselines: bool = True) -> dict[str, Path]:
    """{"qubo": masks.safetensors, "<baseline>": ..., ...} of a solve folder, the QUBO's first.

    Each file is labelled by the method stored in its metadata (`qubo.registry.method_label`).
    """
    qubo = solve_dir / masks_file_name(QUBO)
    if not qubo.is_file():
        raise UserError(f"{solve_dir} has no {qubo.name}")
    files = [qubo] + (sorted(solve_dir.glob("masks_*.safetensors")) if baselines else [])
    found: dict[str, Path] = {}
    for path in files:
        label = method_label(read_masks_method(path))
        if label in found:
            raise UserError(f"{solve_dir}: {found[label].name} and {path.name} both hold {label!r}")
        found[label] = path
    return found


def sparse_loss(
    model: torch.nn.Module,
    masks: Masks | None,
    ids: torch.Tensor,
    cfg: ApplyConfig,
    data_parallel: bool = False,
) -> tuple[float, int]:
    """Held-out loss of the model with `masks` attached (None: dense); the model is left dense.

    `data_parallel`: every rank of a launcher calls this at once and scores its share of the windows.

    Dense and sparse run on the same backend (`apply.kernel`, resolved once): on CPU the block path,
    so neither materialises (B, H, S, S) probabilities, and the logits are never all alive at once
    (`data.eval_loss`).
    """
    if masks is not None:
        if cfg.seq_len > masks.max_length:
            raise UserError(
                f"apply.seq_len {cfg.seq_len} is longer than the masks' max_length {masks.max_length}"
            )
        attach_masks(model, masks, kernel=cfg.kernel)
    else:
        attach_kernel(model, cfg.kernel)
    try:
        return eval_loss(
            model, ids, cfg.seq_len, cfg.batch_size, cfg.max_tokens, data_parallel=data_parallel
        )
    finally:
        if masks is not None:
            detach_masks(model)
        else:
            detach_kernel(model)


def evaluate_masks(
    model: torch.nn.Module,
    tokenizer: Any,
    mask_files: dict[str, Path],
    cfg: ApplyConfig,
    data_parallel: bool = False,
) -> list[dict[str, Any]]:
    """One row per pattern (dense first): method, density, heads kept, loss, perplexity, tokens.

    The held-out text becomes ids through the model's own `tokenizer`; losses are nats per its token.
    `data_parallel`: every rank of a launcher calls this and scores its share of the windows.
    """
    ids = encode_text(tokenizer, resolve_text(cfg.eval_text))
    rows = []
    loss, n = sparse_loss(model, None, ids, cfg, data_parallel)
    heads = sum(a.num_heads for a in model.gravity_layers())
    rows.append(_row("dense", 1.0, heads, heads, loss, n))
    for name, path in mask_files.items():
        masks = read_masks(path)
        loss, n = sparse_loss(model, masks, ids, cfg, data_parallel)
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
