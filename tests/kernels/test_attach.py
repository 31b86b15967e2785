"""attach_kernel: a tiny sparse GravityForCausalLM gives the reference logits through the Triton kernels."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_masks, tiny_model

from gravity_sparse.kernels import GravityKernel, attach_kernel, detach_kernel
from gravity_sparse.model.masks import attach_masks
from gravity_sparse.model.modeling_gravity import GravityForCausalLM

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK, MAX_LEN = 16, 64


def tiny_sparse_model(seed: int = 0) -> GravityForCausalLM:
    """A tiny model with random block masks and one dropped head per layer (reference attention)."""
    model = tiny_model(
        seed, sharpen=False, random_masses=True, device=DEVICE, vocab_size=64, pad_token_id=None,
        intermediate_size=96, max_position_embeddings=128,
    )  # fmt: skip
    masks = random_masks(
        L=2, H=4, nb=MAX_LEN // BLOCK, block=BLOCK, seed=seed, drop=((0, 0), (1, 1))
    )
    return attach_masks(model, masks, kernel="reference")


@torch.no_grad()
def test_attached_kernel_gives_reference_logits_in_prefill_and_decode() -> None:
    model = tiny_sparse_model()
    ids = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    reference = model(ids).logits

    attach_kernel(model, backend="triton")
    assert all(isinstance(a.gravity_kernel, GravityKernel) for a in model.gravity_layers())
    prefill = model(ids).logits
    diff = (prefill - reference).abs()
    assert diff.max() < 1e-4, f"prefill: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"

    # cached decode: a 40-token prompt, then 5 single tokens against the cache (decode kernel)
    out = model(ids[:, :40], use_cache=True)
    cache, steps = out.past_key_values, [out.logits[:, -1]]
    for pos in range(40, 44):
        out = model(ids[:, pos : pos + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits[:, -1])
    decoded = torch.stack(steps, dim=1)
    diff = (decoded - reference[:, 39:44]).abs()
    assert diff.max() < 1e-4, f"decode: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}"

    detach_kernel(model)
    assert not any(hasattr(a, "gravity_kernel") for a in model.gravity_layers())


@torch.no_grad()
def test_padded_batch_falls_back_to_the_reference_with_its_mask() -> None:
    model = tiny_sparse_model(seed=2)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :6] = 0  # left padding in the first row
    reference = model(ids, attention_mask=attention_mask).logits
    attach_kernel(model, backend="triton")
    calls = []
    kernel = model.gravity_layers()[0].gravity_kernel
    original = kernel._block_index
    kernel._block_index = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    padded = model(ids, attention_mask=attention_mask).logits
    assert not calls, "a padded batch must not take the block-sparse kernel"
    diff = (padded - reference)[:, :, :].abs()[attention_mask.bool()]
    assert diff.max() < 1e-5, f"padded: max abs diff {diff.max():.3e}"
    model(ids)  # the unpadded batch does take the kernel
    assert calls


def test_attach_refuses_an_unusable_backend() -> None:
    from gravity_sparse.errors import UserError

    model = tiny_sparse_model()
    with pytest.raises(UserError, match="unknown attention backend"):
        attach_kernel(model, backend="fast")
