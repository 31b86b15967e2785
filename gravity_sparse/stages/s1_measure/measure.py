"""measure: run calibration text through a gravity model and record the locality field of every head.

Writes `field.safetensors` (format in DESIGN §3 / the shared brief; tensors [L, H, ...]) and PNG plots
into a given folder, and returns a JSON-able summary. The numbers come from `gravity_sparse.stages.s1_measure.field`; this
module only drives the model:

1. field pass (no grad): every layer's attention is replaced by a chunked call of the reference
   (`attn.gravity_kernel`), which also reduces each chunk of probabilities into that layer's
   `LayerFieldAccumulator` — one chunk of one layer's attention exists at a time.
2. first-order importance (optional): one backward per batch, attention under activation checkpointing so
   that no layer keeps its probabilities for the backward; |Σ_tokens ∂loss/∂out_h · out_h| per sequence.
3. exact importance (optional): for a few sequences, the inputs of every decoder layer are captured once;
   then for layer l the layers l.. are rerun on copies of that input, copy 0 clean and copy c with one
   head's output zeroed, so one forward ablates a whole group of heads and the prefix is never recomputed.

Exact ablation is what the QUBO uses as `importance`: dropping a head zeroes its output, which is exactly
what was measured, while the first-order estimate linearises a change that is not small and misses
interactions through the later layers. The gradient estimate is the fallback when ablation is too
expensive (`importance="grad"`), and the metadata says which one `importance` holds.

Data-parallel under a launcher: each rank takes a contiguous share of the calibration batches (whole
batches, so every sequence is computed exactly as in one process) and of the ablation sequences; the
float64 sums of the field, the losses and both importances are added over the ranks before any mean is
taken, so the field equals the single-process one up to the order of float64 additions. Only the rank given
an `out_dir` writes files.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from tqdm.auto import tqdm

from gravity_sparse import dist
from gravity_sparse.errors import UserError
from gravity_sparse.model.chunked_loss import final_hidden
from gravity_sparse.model.modeling_gravity import gravity_scores
from gravity_sparse.stages.s1_measure.attention import (
    _Kernels,
    _my_batches,
    _quiet,
    _sequence_losses,
    chunked_attention,
)
from gravity_sparse.stages.s1_measure.config import MeasureConfig
from gravity_sparse.stages.s1_measure.field import LayerFieldAccumulator
from gravity_sparse.stages.s1_measure.importance import _ablation_importance, _grad_importance
from gravity_sparse.stages.s1_measure.summary import measure_summary, power_law_fits


def calibration_sequences(
    token_ids: torch.Tensor | Sequence[int], seq_len: int, max_sequences: int, max_positions: int
) -> torch.Tensor:
    """Cut token ids into non-overlapping sequences: (N, seq_len) long; bad input is a UserError."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise UserError("calibration text is empty")
    if seq_len > max_positions:
        raise UserError(
            f"measure.seq_len {seq_len} is above the model's max_position_embeddings {max_positions}"
        )
    count = ids.numel() // seq_len
    if count == 0:
        raise UserError(
            f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seq_len}"
        )
    if max_sequences:
        count = min(count, max_sequences)
    return ids[: count * seq_len].view(count, seq_len)


def _field_pass(model, sequences, cfg, kernels, accs) -> float:
    """Stream the calibration batches, filling the accumulators; returns the mean loss (nats/token)."""
    device = model.device
    loss_sum = 0.0
    for layer, attn in enumerate(kernels.layers):

        def kernel(module, q, k, v, mask, acc=accs[layer], attn=attn):
            def reduce(qc, kc, probs, q_start, out):
                scores = gravity_scores(
                    qc,
                    kc,
                    module.gravity_mass_log,
                    module.config.gravity_eps,
                    module.gravity_kv_groups,
                )
                acc.add(probs, scores, q_start, out, attn.o_proj.weight)

            return chunked_attention(module, q, k, v, mask, cfg.chunk_elements, reduce)

        kernels.set(layer, kernel)
    for batch in tqdm(_my_batches(sequences, cfg), desc="measure: field", disable=_quiet(cfg)):
        ids = batch.to(device)
        with torch.no_grad():
            losses = _sequence_losses(model, final_hidden(model, ids), ids)
        loss_sum += float(losses.sum())
    for acc in accs:
        acc.all_reduce()
    return dist.sum_float(loss_sum) / sequences.shape[0]


def run_measure(
    model: torch.nn.Module,
    token_ids: torch.Tensor | Sequence[int],
    cfg: MeasureConfig,
    out_dir: Path | None,
) -> dict:
    """Measure the field of `model` on `token_ids` (1-D) and write field.safetensors + plots to out_dir.

    Under a launcher every rank calls this at once and does its share; `out_dir` None writes nothing
    (the ranks other than 0).
    """
    config = model.config
    attns = model.gravity_layers()
    head_counts = {(a.num_heads, a.num_key_value_heads) for a in attns}
    if len(head_counts) != 1:
        raise UserError(
            "measure needs the same number of heads in every layer (not a pruned model)"
        )
    sequences = calibration_sequences(
        token_ids, cfg.seq_len, cfg.num_sequences, int(config.max_position_embeddings)
    )
    num_layers, (heads, kv_heads) = len(attns), head_counts.pop()
    device = model.device
    was_training = model.training
    model.eval()
    timings = {}
    try:
        with _Kernels(model) as kernels:
            accs = [
                LayerFieldAccumulator(heads, cfg.seq_len, cfg.block_size, device) for _ in attns
            ]
            start = time.perf_counter()
            loss = _field_pass(model, sequences, cfg, kernels, accs)
            timings["field_s"] = time.perf_counter() - start
            grad_imp = torch.full((num_layers, heads), float("nan"))
            block_grad = block_grad_abs = None
            if cfg.importance in ("grad", "both"):
                start = time.perf_counter()
                grad_imp, block_grad, block_grad_abs = _grad_importance(
                    model, sequences, cfg, kernels
                )
                timings["grad_s"] = time.perf_counter() - start
            if cfg.importance in ("ablation", "both"):
                start = time.perf_counter()
                importance = _ablation_importance(model, sequences, cfg, kernels)
                timings["ablation_s"] = time.perf_counter() - start
            else:
                importance = grad_imp.clone()
    finally:
        model.train(was_training)

    results = [acc.result() for acc in accs]
    tensors = {key: torch.stack([r[key] for r in results]).cpu() for key in results[0]}
    mass_log = torch.stack([a.gravity_mass_log.detach().float().cpu() for a in attns])
    alpha, alpha_amp, alpha_r2 = power_law_fits(tensors["profile"])
    tensors.update(
        importance=importance,
        importance_grad=grad_imp,
        mass=F.softplus(mass_log),
        mass_log=mass_log,
        alpha=alpha,
        alpha_amp=alpha_amp,
        alpha_r2=alpha_r2,
        kv_groups=torch.stack([a.gravity_kv_groups.cpu() for a in attns]).long(),
    )
    if block_grad is not None:
        tensors.update(block_grad=block_grad, block_grad_abs=block_grad_abs)
    importance_method = "grad" if cfg.importance == "grad" else "ablation"
    num_tokens = sequences.numel()
    metadata = {
        "block_size": str(cfg.block_size),
        "seq_len": str(cfg.seq_len),
        "num_layers": str(num_layers),
        "num_heads": str(heads),
        "num_kv_heads": str(kv_heads),
        "num_tokens": str(num_tokens),
        "importance_method": importance_method,
    }
    plots = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(out_dir / "field.safetensors"), metadata)
        if cfg.plots:
            from gravity_sparse.stages.s1_measure.plots import plot_field

            plots = plot_field(tensors, out_dir)
    return measure_summary(tensors, cfg, loss, num_tokens, timings, importance_method, plots)
