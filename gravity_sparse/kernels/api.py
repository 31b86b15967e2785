"""`gravity_attention`: input checks and backend dispatch (the package docstring has the contract)."""

from __future__ import annotations

import os
from enum import StrEnum

import torch

from ..errors import UserError
from .block_index import BlockIndex, build_block_index, check_mask_length, default_kv_groups
from .reference import reference_attention


class Backend(StrEnum):
    """The attention backends. `resolve_backend` turns AUTO into a concrete one for a device."""

    AUTO = "auto"  # TRITON on CUDA, CPU on CPU
    REFERENCE = "reference"  # dense PyTorch with the masks applied: the specification
    CPU = "cpu"  # the block path: only kept blocks, hand-written backward (kernels/causal_cpu.py)
    TRITON = "triton"  # block-sparse Triton kernels (prefill forward/backward, decode)
    FLEX = "flex"  # torch FlexAttention with a gravity score_mod


BACKENDS = tuple(b.value for b in Backend)
DECODE_MAX_QUERIES = 16  # up to this many queries against a longer cache take the decode kernel


BACKEND_HELP = "auto (triton on CUDA, the CPU kernel on CPU) | cpu | reference | triton | flex"


def check_backend(key: str, value: str) -> None:
    """A config value names a backend, or a one-line error naming the key."""
    if value not in BACKENDS:
        raise UserError(f"{key} must be one of {', '.join(BACKENDS)}, not {value!r}")


def resolve_backend(backend: str | Backend, device: torch.device | str) -> Backend:
    """The one place that picks the attention backend: auto is triton on CUDA, the CPU kernel on CPU.

    Every caller (apply, heal, bench, export, sweep, pretrain, the model's own CUDA probe) goes through
    here, so "auto" means the same everywhere. An unknown name or an unusable one is a one-line error.
    """
    try:
        chosen = Backend(backend)
    except ValueError:
        raise UserError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        ) from None
    device = torch.device(device)
    if chosen is Backend.AUTO:
        return Backend.TRITON if device.type == "cuda" else Backend.CPU
    if (
        chosen is Backend.TRITON
        and device.type != "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        raise UserError(
            "the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 for tests); "
            "use backend 'cpu' or 'reference' on CPU"
        )
    return chosen


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    block_mask: torch.Tensor | None,
    head_keep: torch.Tensor | None,
    block_size: int,
    kv_groups: torch.Tensor | None,
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UserError(
            f"gravity attention wants 4-d q, k, v (batch, heads, seq, dim); got {q.dim()}, {k.dim()}, "
            f"{v.dim()} dimensions"
        )
    bsz, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[3] != d:
        raise UserError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)} "
            "(expected (batch, kv heads, keys, head dim))"
        )
    if k.shape[2] < s:
        raise UserError(f"{k.shape[2]} keys for {s} queries: the queries must be the last keys")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raise UserError(
            f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if mass_log.shape != (hq,):
        raise UserError(f"mass_log has shape {tuple(mass_log.shape)}, expected ({hq},)")
    if block_size <= 0:
        raise UserError(f"block size must be positive, got {block_size}")
    if kv_groups is not None:
        if kv_groups.shape != (hq,):
            raise UserError(f"kv_groups has shape {tuple(kv_groups.shape)}, expected ({hq},)")
    if head_keep is not None and head_keep.shape != (hq,):
        raise UserError(f"head_keep has shape {tuple(head_keep.shape)}, expected ({hq},)")
    if block_mask is not None:
        if block_mask.dim() != 3 or block_mask.shape[0] != hq:
            raise UserError(
                f"block mask of shape {tuple(block_mask.shape)} does not fit {hq} query heads "
                "(expected (heads, query blocks, key blocks))"
            )
        check_mask_length(block_mask, k.shape[2], block_size)


def gravity_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    *,
    eps: float = 0.1,
    block_mask: torch.Tensor | None = None,
    head_keep: torch.Tensor | None = None,
    block_size: int = 64,
    backend: str = "auto",
    kv_groups: torch.Tensor | None = None,
    block_index: BlockIndex | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Block-sparse gravity attention; see the module docstring. Returns (B, Hq, S, D) in q's dtype.

    block_index: prebuilt index lists (`build_block_index`) to skip rebuilding them on every call (the
    block_mask/head_keep arguments are then only used by the reference and for validation).
    num_splits: force the decode kernel's split-KV factor (tests); None picks one for the device.
    """
    _check_inputs(q, k, v, mass_log, block_mask, head_keep, block_size, kv_groups)
    backend = resolve_backend(backend, q.device)
    if backend is Backend.CPU:
        from .causal_cpu import cpu_attention

        return cpu_attention(
            q, k, v, mass_log, eps=eps, block_mask=block_mask, head_keep=head_keep,
            block_size=block_size, kv_groups=kv_groups,
        )  # fmt: skip
    if backend is Backend.REFERENCE:
        return reference_attention(
            q, k, v, mass_log, eps=eps, block_mask=block_mask, head_keep=head_keep,
            block_size=block_size, kv_groups=kv_groups,
        )  # fmt: skip
    hq, hkv = q.shape[1], k.shape[1]
    s, sk = q.shape[2], k.shape[2]
    if kv_groups is None:
        kv_groups = default_kv_groups(hq, hkv, q.device)
    index = block_index or build_block_index(
        block_mask, head_keep, kv_groups, num_kv_heads=hkv, seq_len_q=s, seq_len_k=sk,
        block_size=block_size, device=q.device,
    )  # fmt: skip
    expected = (block_size, -(-sk // block_size), (sk - s) // block_size)
    if (index.block_size, index.num_blocks, index.first_q_block) != expected:
        raise UserError(
            f"block index built for (block {index.block_size}, {index.num_blocks} blocks, first query "
            f"block {index.first_q_block}) used for (block, blocks, first query block) = {expected}"
        )
    groups = kv_groups.to(device=q.device, dtype=torch.int32).contiguous()
    if backend is Backend.FLEX:
        from .flex import flex_gravity_attention

        return flex_gravity_attention(q, k, v, mass_log, groups, index, eps=eps)
    from .ops import triton_decode, triton_prefill

    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, mass_log)
    )  # fmt: skip
    if not needs_grad and s < sk and s <= DECODE_MAX_QUERIES:
        return triton_decode(q, k, v, mass_log, groups, index, eps, num_splits)
    return triton_prefill(q, k, v, mass_log, groups, index, eps)
