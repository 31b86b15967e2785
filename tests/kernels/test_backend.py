"""One resolver picks the attention backend for every caller; "auto" means one thing."""

import pytest
import torch
from tiny_models import random_masks, tiny_model

from gravity_sparse.errors import UserError
from gravity_sparse.kernels import (
    Backend,
    attach_kernel,
    detach_kernel,
    gravity_attention,
    resolve_backend,
)
from gravity_sparse.kernels.causal_cpu import cpu_gravity_kernel, reference_gravity_kernel
from gravity_sparse.model.masks import Masks, attach_masks, dense_masks


def test_auto_is_triton_on_cuda_and_the_cpu_kernel_on_cpu():
    assert resolve_backend("auto", "cuda") is Backend.TRITON
    assert resolve_backend("auto", "cpu") is Backend.CPU
    assert resolve_backend("reference", "cpu") is Backend.REFERENCE
    with pytest.raises(UserError, match="unknown attention backend 'fast'"):
        resolve_backend("fast", "cpu")


def test_triton_on_cpu_is_refused_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="needs a CUDA device"):
        resolve_backend("triton", "cpu")


def test_attach_masks_uses_the_resolver():
    model = attach_masks(tiny_model(), random_masks())  # auto on CPU
    assert all(a.gravity_kernel is cpu_gravity_kernel for a in model.gravity_layers())
    attach_masks(model, random_masks(), kernel="reference")
    assert all(a.gravity_kernel is reference_gravity_kernel for a in model.gravity_layers())
    assert attach_kernel(model, "auto") is Backend.CPU


def test_function_entry_auto_is_the_cpu_kernel_and_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 40, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    mass_log = torch.linspace(-0.5, 1.0, 4)
    masks = random_masks(L=1, H=4, nb=3, block=16, drop=((0, 2),))
    args = dict(block_mask=masks.block_mask[0], block_size=16, head_keep=masks.head_keep[0])
    auto = gravity_attention(q, k, v, mass_log, **args)
    cpu = gravity_attention(q, k, v, mass_log, backend="cpu", **args)
    ref = gravity_attention(q, k, v, mass_log, backend="reference", **args)
    assert torch.equal(auto, cpu)
    torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-5)


def test_bench_runs_dense_and_sparse_through_the_same_backend():
    from gravity_sparse.stages.s6_bench.bench import bench_models
    from gravity_sparse.stages.s6_bench.config import BenchConfig

    model = tiny_model()
    masks = random_masks()
    dense, sparse, backend = bench_models(model, masks, BenchConfig(), masks.max_length)
    assert backend is Backend.CPU
    for m in (dense, sparse):
        assert all(a.gravity_kernel is cpu_gravity_kernel for a in m.gravity_layers())
    # dense = every block of every head kept, through the same code path
    for a in dense.gravity_layers():
        assert torch.equal(a.gravity_block_mask, torch.ones_like(a.gravity_block_mask).tril())
    assert sum(a.num_heads for a in dense.gravity_layers()) == masks.head_keep.numel()
    every = dense_masks(2, 4, masks.block_size, masks.max_length)
    assert isinstance(every, Masks) and every.density() == 1.0


def test_a_sparse_model_on_cuda_asks_the_resolver_only_when_gravity_sparse_is_loaded(monkeypatch):
    import sys

    from gravity_sparse.kernels import GravityKernel

    model = attach_masks(tiny_model(), random_masks(), kernel="reference")
    attn = detach_kernel(model).gravity_layers()[0]  # as loaded: no kernel attached
    monkeypatch.delitem(sys.modules, "gravity_sparse.kernels")  # as in a plain-transformers process
    attn._maybe_use_kernel(torch.device("cuda"))
    assert "gravity_kernel" not in attn.__dict__
    monkeypatch.undo()
    attn.__dict__.pop("_kernel_probed")
    attn._maybe_use_kernel(torch.device("cuda"))  # no GPU needed to pick it
    assert (
        isinstance(attn.gravity_kernel, GravityKernel) and attn.gravity_kernel.backend == "triton"
    )
