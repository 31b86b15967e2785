"""Next-token losses without the (B, S, V) logits: the lm_head and cross entropy over chunks of positions.

At Gravity-2's vocabulary (151,936) one 4k-token sequence has 1.2 GB of bf16 logits, 2.5 GB in fp32 and as
much again inside the cross entropy; these helpers keep one chunk of positions alive at a time (under
gradients each chunk is checkpointed, its logits recomputed in the backward). Same numbers as the full-logit
loss up to float summation order (tests/stages/s1_measure/test_losses.py). `data.eval_loss` uses them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

LOSS_CHUNK = 512  # positions per lm_head + cross-entropy chunk


def final_hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's normed last hidden states (B, S, E): the lm_head's input, without the logits."""
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def nll_sums(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK
) -> torch.Tensor:
    """Σ over positions of the cross entropy of lm_head(hidden) (B, N, E) against targets (B, N): (B,) fp32."""

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(h).float()
        return F.cross_entropy(logits.transpose(1, 2), t, reduction="none").sum(-1)

    total = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[1], chunk):
        h, t = hidden[:, start : start + chunk], targets[:, start : start + chunk]
        total = total + (
            checkpoint(part, h, t, use_reentrant=False) if h.requires_grad else part(h, t)
        )
    return total


@contextmanager
def checkpointed_layers(model: torch.nn.Module) -> Iterator[None]:
    """Run every decoder layer under activation checkpointing (non-reentrant) inside the block.

    The backward then keeps only each layer's input (S × hidden) and recomputes the layer, instead of
    every layer's MLP activations: at Gravity-2's shape and 4k tokens ≈ 0.6 GiB per layer otherwise,
    over 20 GiB for 36 layers.
    """
    layers = list(model.model.layers)
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward, if any
    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = forward
