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
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from gravity_sparse import dist
from gravity_sparse.errors import UserError
from gravity_sparse.model.chunked_loss import (
    LOSS_CHUNK,
    checkpointed_layers,
    final_hidden,
    nll_sums,
)
from gravity_sparse.model.modeling_gravity import gravity_scores
from gravity_sparse.stages.s1_measure.config import MeasureConfig
from gravity_sparse.stages.s1_measure.field import LayerFieldAccumulator
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


def chunked_attention(
    module: torch.nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    chunk_elements: int,
    on_chunk: Callable[..., None] | None = None,
    block_bias: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """The model's attention (the reference) over chunks of queries: (B, Hq, S, D).

    A chunk of C queries needs only the first q_start + C keys (causal), so each chunk's probabilities
    are (B, Hq, C, ≤Sk) with B·Hq·C·Sk ≤ chunk_elements. on_chunk(q, k, probs, q_start, out) sees each.
    block_bias (Hq, NQB, NKB) or (B, Hq, NQB, NKB), with block_size: a log-gate β on each block. The
    probabilities of its pairs are multiplied by e^β and each row renormalised (the same as adding β to
    their scores before the softmax), so that the gradient of β is the loss's sensitivity to each block;
    zero changes nothing.
    """
    bsz, heads, s, _ = q.shape
    offset = k.shape[2] - s  # cached keys before the first query (0 in a calibration prefill)
    rows = max(1, chunk_elements // (bsz * heads * k.shape[2]))
    outs = []
    for start in range(0, s, rows):
        stop = min(s, start + rows)
        keys = offset + stop
        mask = None if attention_mask is None else attention_mask[..., start:stop, :keys]
        if block_bias is not None:  # gate the reference's probabilities and renormalise each row
            _, probs = module.reference_attention(
                q[:, :, start:stop], k[:, :, :keys], v[:, :, :keys], mask, return_weights=True
            )
            gate = _block_gate(block_bias, block_size, offset + start, offset + stop, keys)
            gated = probs * gate
            gated = gated / gated.sum(-1, keepdim=True).clamp_min(torch.finfo(gated.dtype).tiny)
            values = v[:, :, :keys].float().index_select(1, module.gravity_kv_groups.to(v.device))
            outs.append((gated @ values).to(q.dtype))
            continue
        out, probs = module.reference_attention(
            q[:, :, start:stop],
            k[:, :, :keys],
            v[:, :, :keys],
            mask,
            return_weights=on_chunk is not None,
        )
        if on_chunk is not None:
            on_chunk(q[:, :, start:stop], k[:, :, :keys], probs, offset + start, out)
        outs.append(out)
    return torch.cat(outs, dim=2)


def _block_gate(block_bias: torch.Tensor, block_size: int | None, first: int, last: int, keys: int):
    """exp(block bias) of every (query, key) pair, (1|B, Hq, last − first, keys), queries first..last−1;
    block_bias (Hq, NQB, NKB) for every sequence or (B, Hq, NQB, NKB) one for each."""
    if block_size is None:
        raise ValueError("a block bias needs its block size")
    bias = block_bias if block_bias.dim() == 4 else block_bias.unsqueeze(0)
    qb = torch.arange(first, last, device=block_bias.device) // block_size
    kb = torch.arange(keys, device=block_bias.device) // block_size
    return bias[:, :, qb][:, :, :, kb].exp()


class _Kernels:
    """Temporarily replaces `gravity_kernel` on every attention layer, restoring the old one on exit."""

    def __init__(self, model: torch.nn.Module):
        self.layers = model.gravity_layers()
        self.saved = [getattr(a, "gravity_kernel", None) for a in self.layers]

    def set(self, layer: int, kernel: Callable | None) -> None:
        self.layers[layer].gravity_kernel = kernel

    def __enter__(self) -> _Kernels:
        return self

    def __exit__(self, *exc) -> None:
        for attn, kernel in zip(self.layers, self.saved, strict=True):
            if kernel is None:
                attn.__dict__.pop("gravity_kernel", None)
            else:
                attn.gravity_kernel = kernel


def _sequence_losses(
    model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = LOSS_CHUNK
) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence from final hidden states (B, S, E): (B,) fp32,
    without (B, S, V) logits (`chunked_loss`)."""
    targets = ids[:, 1:].expand(hidden.shape[0], -1)
    return nll_sums(model, hidden[:, :-1], targets, chunk) / (hidden.shape[1] - 1)


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


def _my_batches(sequences: torch.Tensor, cfg: MeasureConfig) -> list[torch.Tensor]:
    """This rank's share of the calibration batches (all of them in one process)."""
    batches = sequences.split(cfg.batch_size)
    return [batches[i] for i in dist.share(len(batches))]


def _quiet(cfg: MeasureConfig) -> bool:
    return not cfg.progress or not dist.is_main()


def _grad_importance(
    model, sequences, cfg, kernels
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """First-order head importance [L, H] and, with `cfg.block_grad`, block sensitivities
    [L, H, NQB, NQB] (None without), one backward a batch.

    importance: mean over sequences of |Σ_tokens ∂loss/∂out_h · out_h| (the loss change, to first order,
    of scaling head h's output down). block_grad: mean over sequences of ∂loss/∂β_hb, β_hb a log-gate on
    every score of block b of head h (`chunked_attention`'s block_bias); dropping the block sets the gate
    to 0, which changes the loss by ≈ −∂loss/∂β_hb (positive: the block helps; negative: the model is
    better without it). A query row's blocks sum to zero (a gate shared by a whole row cancels in the
    softmax). block_grad_abs: mean over sequences of |∂loss_s/∂β_hb|, each sequence's own gradient — how
    much the loss depends on the block at all (a trained model sits near a stationary point, where the
    signed mean cancels to noise while single sequences still depend on the block).
    """
    num_layers, heads = len(kernels.layers), kernels.layers[0].num_heads
    nqb = -(-cfg.seq_len // cfg.block_size)
    total = torch.zeros(num_layers, heads, dtype=torch.float64)
    block_total = block_abs = None
    if cfg.block_grad:
        block_total = torch.zeros(num_layers, heads, nqb, nqb, dtype=torch.float64)
        block_abs = torch.zeros_like(block_total)
    device = model.device
    outs: list[torch.Tensor] = []
    recording = True

    def kernel(module, q, k, v, mask, bias):
        def attend(q, k, v, bias):
            return chunked_attention(
                module,
                q,
                k,
                v,
                mask,
                cfg.chunk_elements,
                block_bias=bias,
                block_size=cfg.block_size,
            )

        if bias is None and not q.requires_grad:
            # nothing upstream needs a gradient (frozen embeddings): this is a leaf
            out = attend(q, k, v, None).detach().requires_grad_()
        else:  # recomputed in the backward: no layer keeps its probabilities
            out = checkpoint(attend, q, k, v, bias, use_reentrant=False)
        if recording:  # not in the backward's recompute of a layer: that copy would keep its graph
            outs.append(out)
        return out

    for batch in tqdm(_my_batches(sequences, cfg), desc="measure: grad", disable=_quiet(cfg)):
        ids = batch.to(device)
        # a gate per sequence: each sequence's own gradient (for the mean of |.| over sequences)
        biases = [
            torch.zeros(ids.shape[0], heads, nqb, nqb, device=device, requires_grad=True)
            for _ in range(num_layers if cfg.block_grad else 0)
        ]
        for layer in range(num_layers):
            kernels.set(layer, partial(kernel, bias=biases[layer] if biases else None))
        outs.clear()
        recording = True
        with torch.enable_grad(), checkpointed_layers(model):
            losses = _sequence_losses(model, final_hidden(model, ids), ids)
            targets = list(outs)
            recording = False
            # per-sequence mean losses are independent, so one backward of their sum gives each one's
            grads = torch.autograd.grad(losses.sum(), targets + biases)
        for layer, (out, grad) in enumerate(zip(targets, grads[:num_layers], strict=True)):
            per_seq = (grad.float() * out.detach().float()).sum(dim=(2, 3))  # (B, H)
            total[layer] += per_seq.abs().double().sum(0).cpu()
        if biases:
            per_seq_blocks = torch.stack(grads[num_layers:]).double().cpu()  # (L, B, H, NQB, NQB)
            block_total += per_seq_blocks.sum(1)
            block_abs += per_seq_blocks.abs().sum(1)
    count = sequences.shape[0]
    importance = (dist.all_reduce_sum(total) / count).float()
    if not cfg.block_grad:
        return importance, None, None
    block_grad = (dist.all_reduce_sum(block_total) / count).float()
    return importance, block_grad, (dist.all_reduce_sum(block_abs) / count).float()


def _capture_layer_inputs(model, ids, kernels, cfg) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments every decoder layer receives for one batch `ids`."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {key: val for key, val in kwargs.items() if key != "hidden_states"}
        captured.append((hidden, rest))

    def kernel(module, q, k, v, mask):
        return chunked_attention(module, q, k, v, mask, cfg.chunk_elements)

    for layer in range(len(kernels.layers)):
        kernels.set(layer, kernel)
    hooks = [
        layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _ablation_importance(model, sequences, cfg, kernels, only=None) -> torch.Tensor:
    """Exact importance [L, H]: loss increase (nats/token) when one head's output is zeroed.

    `only`: ablate the heads of these layers alone (the rest stay NaN), e.g. to check a faster
    importance against ablation on a sample (benchmarks/importance_check.py)."""
    layers = list(model.model.layers)
    num_layers, heads = len(layers), kernels.layers[0].num_heads
    ablate = range(num_layers) if only is None else sorted(set(only))
    group = cfg.ablation_group or heads
    used = sequences[: cfg.ablation_sequences]
    mine = used[dist.share(len(used)).start : dist.share(len(used)).stop]
    total = torch.zeros(num_layers, heads, dtype=torch.float64)
    steps = len(mine) * len(ablate) * (-(-heads // group))
    bar = tqdm(total=steps, desc="measure: ablation", disable=_quiet(cfg))
    for seq in mine:
        ids = seq.view(1, -1).to(model.device)
        inputs = _capture_layer_inputs(model, ids, kernels, cfg)
        for layer in ablate:
            for first in range(0, heads, group):
                ablated = list(range(first, min(heads, first + group)))
                # copy 0 keeps every head: the baseline shares the batch and hence the arithmetic
                keep = torch.ones(len(ablated) + 1, heads, device=model.device)
                for copy, head in enumerate(ablated, start=1):
                    keep[copy, head] = 0.0

                def kernel(module, q, k, v, mask, keep=keep):
                    out = chunked_attention(module, q, k, v, mask, cfg.chunk_elements)
                    return out * keep.to(out.dtype).view(*keep.shape, 1, 1)

                kernels.set(layer, kernel)
                hidden, _ = inputs[layer]
                hidden = hidden.expand(keep.shape[0], -1, -1)
                with torch.no_grad():
                    for j in range(layer, num_layers):
                        hidden = layers[j](hidden, **inputs[j][1])
                    hidden = model.model.norm(hidden)
                    losses = _sequence_losses(model, hidden, ids).double().cpu()
                total[layer, ablated] += losses[1:] - losses[0]
                bar.update()
        del inputs
    bar.close()
    total = dist.all_reduce_sum(total) / len(used)
    if only is not None:
        total[[i for i in range(num_layers) if i not in set(ablate)]] = float("nan")
    return total.float()


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
