"""Block-sparse gravity attention: one entry point, three backends (DESIGN §5).

    gravity_attention(q (B, Hq, S, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, D), mass_log (Hq,)) -> (B, Hq, S, D)

causal, the S queries at the last S of Sk positions, s_ij = M_h² / (‖q_i − k_j‖² + ε) with
M_h = softplus(mass_log_h), restricted to the kept blocks of `block_mask` (Hq, NQB, NKB) (block i // B,
j // B) and to the kept heads of `head_keep` (Hq,) (a dropped head outputs zero).

Backends (`Backend`): "reference" (dense PyTorch, the spec, everywhere), "cpu" (the model's block path:
only kept blocks, dropped heads skipped, prefill and decode, a hand-written backward), "triton" (block-sparse Triton kernels: prefill forward/backward, decode for a few
queries without gradients), "flex" (torch FlexAttention), and "auto": triton on CUDA, the CPU kernel on CPU.
`resolve_backend` is the one place that decides; `attach_kernel(model, backend)` routes a
GravityForCausalLM through it (apply, heal, bench, export, sweep and pretrain all call it).
"""

from __future__ import annotations

from .api import BACKENDS, DECODE_MAX_QUERIES, Backend, gravity_attention, resolve_backend
from .attach import GravityKernel, attach_kernel, detach_kernel, kernel_for, model_kernel
from .block_index import BlockIndex, build_block_index
from .reference import reference_attention

__all__ = [
    "BACKENDS",
    "Backend",
    "DECODE_MAX_QUERIES",
    "BlockIndex",
    "GravityKernel",
    "attach_kernel",
    "build_block_index",
    "detach_kernel",
    "kernel_for",
    "model_kernel",
    "gravity_attention",
    "reference_attention",
    "resolve_backend",
]
