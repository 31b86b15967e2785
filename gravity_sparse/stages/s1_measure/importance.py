"""Head importance (first-order gradient, and exact ablation) and the per-block loss gradients."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from gravity_sparse import dist
from gravity_sparse.model.chunked_loss import checkpointed_layers, final_hidden
from gravity_sparse.stages.s1_measure.attention import (
    _my_batches,
    _quiet,
    _sequence_losses,
    chunked_attention,
)


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
