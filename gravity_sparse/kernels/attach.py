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

from .api import Backend, gravity_attention, resolve_backend
from .block_index import BlockIndex, build_block_index
from .causal_cpu import cpu_gravity_kernel, reference_gravity_kernel
from .reference import is_plain_causal

DENSE_TILE = 64  # tile size for a model without block masks (every causal block kept)
_CACHE_SIZE = 8


class GravityKernel:
    """The `gravity_kernel` attribute of one attention layer; caches its block index lists."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._index: dict[tuple, BlockIndex] = {}

    def _block_index(
        self, module: nn.Module, block_size: int, seq_len_q: int, seq_len_k: int, device
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
        module: nn.Module,
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


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    # duck-typed (no import of the modeling file: the model depends on nothing here)
    if hasattr(model, "gravity_layers"):
        return list(model.gravity_layers())
    return [m for m in model.modules() if hasattr(m, "gravity_mass_log") and hasattr(m, "o_proj")]


def kernel_for(backend: str | Backend, device: torch.device | str):
    """The `gravity_kernel` hook that runs `backend` on `device`."""
    chosen = resolve_backend(backend, device)
    if chosen is Backend.REFERENCE:
        return reference_gravity_kernel
    if chosen is Backend.CPU:
        return cpu_gravity_kernel
    return GravityKernel(chosen.value)


def attach_kernel(model: nn.Module, backend: str | Backend = "auto") -> Backend:
    """Route every gravity attention layer of `model` through `backend` (resolved for the model's
    device by `resolve_backend`: auto is triton on CUDA, the CPU kernel on CPU); returns the backend used.

    This is how apply, heal, bench, export, sweep and pretrain choose a kernel.
    """
    device = next(model.parameters()).device
    chosen = resolve_backend(backend, device)  # fail early on an unusable backend
    layers = _attention_layers(model)
    if not layers:
        raise ValueError("attach_kernel: the model has no gravity attention layers")
    for attn in layers:
        attn.gravity_kernel = kernel_for(chosen, device)
    return chosen


def detach_kernel(model: nn.Module) -> nn.Module:
    """Undo `attach_kernel`: the layers go back to the model's own path (the block path; the reference
    for attention weights); returns the model."""
    for attn in _attention_layers(model):
        attn.__dict__.pop("gravity_kernel", None)
    return model


def model_kernel(device: torch.device | str):
    """The kernel a sparse model layer picks on its own on CUDA (`GravityAttention` asks for it when
    `gravity_sparse.kernels` is loaded): the resolver's auto choice."""
    return kernel_for(Backend.AUTO, device)
