"""measure's attention: the model's reference attention over chunks of queries (with an optional log-gate on
every block), the kernel swap on every layer, and the loss helpers the passes share."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gravity_sparse import dist
from gravity_sparse.model.chunked_loss import LOSS_CHUNK, nll_sums
from gravity_sparse.stages.s1_measure.config import MeasureConfig


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


def _my_batches(sequences: torch.Tensor, cfg: MeasureConfig) -> list[torch.Tensor]:
    """This rank's share of the calibration batches (all of them in one process)."""
    batches = sequences.split(cfg.batch_size)
    return [batches[i] for i in dist.share(len(batches))]


def _quiet(cfg: MeasureConfig) -> bool:
    return not cfg.progress or not dist.is_main()
