"""The "cpu" backend: the model's block path, which computes only kept blocks, with a hand-written backward.

The implementation lives in the modeling files (`model/gravity_block_attention.py`, copied next to every
checkpoint, so that an export loaded by plain transformers runs the same code): key blocks are gathered per
(KV head, query block), dropped heads are not computed, a model without masks keeps every causal block.
It handles prefill, chunked prefill, cached decode (reading only the kept blocks) and padded batches
(causal ∩ key padding); any other attention mask goes to the reference. Tested against the reference in
tests/kernels/test_causal_cpu.py and tests/model/test_block_attention.py.
"""

from __future__ import annotations

import torch

from ..model.gravity_block_attention import block_attention, block_sparse_attention

_MEMO: dict = {}  # tables and plans of the last mask the functional entry saw


def cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    *,
    eps: float = 0.1,
    block_mask: torch.Tensor | None = None,
    head_keep: torch.Tensor | None = None,
    block_size: int | None = None,
    kv_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """The "cpu" backend of `gravity_attention`: causal, dense or block-sparse, forward and backward.

    Dropped heads are not computed (their output is zero, their parameters get no gradient); only kept
    blocks are computed. A sequence longer than the mask is the reference's readable error.
    """
    return block_sparse_attention(
        q, k, v, mass_log, eps=eps, block_mask=block_mask, head_keep=head_keep,
        block_size=block_size, kv_groups=kv_groups, memo=_MEMO,
    )  # fmt: skip


def cpu_gravity_kernel(
    module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask
) -> torch.Tensor:
    """`gravity_kernel` hook of a GravityAttention on CPU: the block path with the layer's masses, ε,
    GQA groups and sparsity; a mask that is neither causal nor causal ∩ padding goes to the reference."""
    out = block_attention(module, q, k, v, attention_mask)
    if out is None:
        return module.reference_attention(q, k, v, attention_mask)[0]
    return out


cpu_gravity_kernel.block_path = True  # it also reads a GravityBlockCache's store


def reference_gravity_kernel(
    module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask
) -> torch.Tensor:
    """`gravity_kernel` hook of the "reference" backend: the dense specification."""
    return module.reference_attention(q, k, v, attention_mask)[0]
