"""Route a GravityForCausalLM's attention through `gravity_attention` (prefill and cached decode).

`attach_kernel(model)` sets `attn.gravity_kernel` on every GravityAttention; the registered transformers
attention function "gravity" then calls it with q (B, Hq, S, D), k/v (B, Hkv, Sk, D) (the queries are the
last S of the Sk cached positions) and transformers' attention mask. The layer's own buffers supply the
sparsity: `gravity_block_mask`, `gravity_head_keep`, `gravity_kv_groups`, `gravity_mass_log` and
`config.gravity_block_size`. A mask that is not plain causal (padding) goes to the reference with that
mask, since the kernels assume a causal, unpadded batch. Attention dropout is not applied by the kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_gravity import GravityAttention
from .api import gravity_attention, resolve_backend
from .block_index import BlockIndex, build_block_index

DENSE_TILE = 64  # tile size for a model without block masks (every causal block kept)
_CACHE_SIZE = 8


def is_plain_causal(attention_mask: torch.Tensor, seq_len_q: int, seq_len_k: int) -> bool:
    """True if a transformers mask (B, 1|H, S, Sk') allows exactly the causal prefix of every query."""
    mask = attention_mask[..., -seq_len_k:]
    if mask.shape[-2] != seq_len_q or mask.shape[-1] != seq_len_k:
        return False
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    q_pos = torch.arange(seq_len_k - seq_len_q, seq_len_k, device=mask.device)
    causal = torch.arange(seq_len_k, device=mask.device).view(1, -1) <= q_pos.view(-1, 1)
    return bool((allowed == causal).all())


class GravityKernel:
    """The `gravity_kernel` attribute of one attention layer; caches its block index lists."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._index: dict[tuple, BlockIndex] = {}

    def _block_index(
        self, module: GravityAttention, block_size: int, seq_len_q: int, seq_len_k: int, device
    ) -> BlockIndex:
        block_mask, head_keep = module.gravity_block_mask, module.gravity_head_keep
        # the lists depend on the mask contents and the block extent, not on the exact lengths
        key = (
            -(-seq_len_k // block_size),
            (seq_len_k - seq_len_q) // block_size,
            str(device),
            *(
                (t.data_ptr(), t._version) if t is not None else None
                for t in (block_mask, head_keep)
            ),
        )
        index = self._index.get(key)
        if index is None:
            if len(self._index) >= _CACHE_SIZE:
                self._index.clear()
            index = build_block_index(
                block_mask,
                head_keep,
                module.gravity_kv_groups,
                num_kv_heads=module.num_key_value_heads,
                seq_len_q=seq_len_q,
                seq_len_k=seq_len_k,
                block_size=block_size,
                device=device,
            )
            self._index[key] = index
        return index

    def __call__(
        self,
        module: GravityAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        s, sk = q.shape[2], k.shape[2]
        eps = module.config.gravity_eps
        block_size = module.config.gravity_block_size
        block_mask = module.gravity_block_mask if block_size is not None else None
        head_keep = module.gravity_head_keep
        if attention_mask is not None and not is_plain_causal(attention_mask, s, sk):
            return module.reference_attention(q, k, v, attention_mask)[0]
        block_size = block_size or DENSE_TILE
        backend = resolve_backend(self.backend, q.device)
        index = (
            None
            if backend == "reference"
            else self._block_index(module, block_size, s, sk, q.device)
        )
        return gravity_attention(
            q, k, v, module.gravity_mass_log, eps=eps, block_mask=block_mask, head_keep=head_keep,
            block_size=block_size, backend=backend, kv_groups=module.gravity_kv_groups,
            block_index=index,
        )  # fmt: skip


def attach_kernel(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every GravityAttention of `model` run through `gravity_attention`; returns the model."""
    resolve_backend(backend, next(model.parameters()).device)  # fail early on an unusable backend
    layers = [m for m in model.modules() if isinstance(m, GravityAttention)]
    if not layers:
        raise ValueError("attach_kernel: the model has no GravityAttention layers")
    for attn in layers:
        attn.gravity_kernel = GravityKernel(backend)
    return model


def detach_kernel(model: nn.Module) -> nn.Module:
    """Undo `attach_kernel`: the layers go back to the reference attention; returns the model."""
    for attn in model.modules():
        if isinstance(attn, GravityAttention) and "gravity_kernel" in attn.__dict__:
            del attn.gravity_kernel
    return model
