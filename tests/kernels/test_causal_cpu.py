"""The CPU backend (the block path, with its hand-written backward: the heal path on CPU) with a block mask
and a head mask against the reference, attached to a model."""

import copy

import pytest
import torch
from tiny_models import assert_same_output_and_grads, attention_inputs, random_masks, tiny_model

from gravity_sparse.kernels.causal_cpu import cpu_attention, cpu_gravity_kernel
from gravity_sparse.model.gravity_block_attention import BlockGravityAttention
from gravity_sparse.model.masks import Masks, attach_masks
from gravity_sparse.model.modeling_gravity import gravity_attention_reference


def _block_mask(hq, nb, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(hq, nb, nb, generator=g) < 0.4).tril() | torch.eye(nb, dtype=torch.bool)


@pytest.mark.parametrize("s,block", [(37, 8), (64, 16), (40, 16)])
def test_block_masked_kernel_matches_reference(s, block):
    hq, kv_groups = 4, torch.tensor([0, 0, 1, 1])
    q, k, v, mass_log = attention_inputs(2, hq, 2, s, 8, seed=s)
    nb = -(-s // block)
    bm = _block_mask(hq, nb, seed=s)
    assert not bm.tril(-1).all(), "the mask must actually drop blocks"
    ref, _ = gravity_attention_reference(
        q, k, v, mass_log, eps=0.1, kv_groups=kv_groups, block_mask=bm, block_size=block
    )
    dense, _ = gravity_attention_reference(q, k, v, mass_log, eps=0.1, kv_groups=kv_groups)
    assert (ref - dense).abs().max() > 1e-3, "the block mask must change the output"
    out = cpu_attention(q, k, v, mass_log, kv_groups=kv_groups, block_mask=bm, block_size=block)
    assert_same_output_and_grads(out, ref, (q, k, v, mass_log))


def test_block_masked_kernel_gradcheck():
    q, k, v, mass_log = attention_inputs(1, 4, 2, 12, 3, dtype=torch.float64)
    kv_groups = torch.tensor([0, 1, 1, 0])
    bm = _block_mask(4, 3, seed=1)
    assert torch.autograd.gradcheck(
        lambda *x: cpu_attention(*x, kv_groups=kv_groups, block_mask=bm, block_size=4),
        (q, k, v, mass_log),
    )


def _pair(masks):
    """The same tiny model twice, masks attached: the reference path and the CPU kernel."""
    ref = attach_masks(tiny_model(seed=3), masks, kernel="reference")
    fast = attach_masks(copy.deepcopy(ref), masks, kernel="cpu")
    assert all(a.gravity_kernel is cpu_gravity_kernel for a in fast.gravity_layers())
    return ref, fast


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of the block path's autograd function (training: a fallback does not call it)."""
    calls = []
    apply = BlockGravityAttention.apply

    def counted(*args):
        calls.append(args[0].shape)
        return apply(*args)

    monkeypatch.setattr(BlockGravityAttention, "apply", counted)
    return calls


def test_model_with_masks_same_loss_and_gradients_as_reference(kernel_calls):
    masks = random_masks(nb=4, block=16)  # layer 0 drops head 1, layer 1 drops all its heads
    ref, fast = _pair(masks)
    x = torch.randint(0, 256, (2, 57), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for model in (ref, fast):
        model.train()
        loss = model(input_ids=x, labels=x).loss
        params = [p for p in model.parameters() if p.requires_grad]
        losses.append(loss.detach())
        got = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]
        )
    # the kernel really ran (no fallback) on layer 0; layer 1 has no kept head and computes nothing
    assert kernel_calls == [torch.Size([2, 4, 57, 16])]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for g_fast, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-3, atol=1e-5)
    # a dropped head's query rows get no gradient; a kept head's do
    names = [n for n, p in fast.named_parameters() if p.requires_grad]
    q_grad = dict(zip(names, grads[1], strict=True))
    head_dim = fast.config.hidden_size // fast.config.num_attention_heads
    w0 = q_grad["model.layers.0.self_attn.q_proj.weight"].view(4, head_dim, -1).abs().amax((1, 2))
    assert w0[1] == 0 and (w0[[0, 2, 3]] > 0).all()
    assert q_grad["model.layers.1.self_attn.q_proj.weight"].abs().max() == 0


def test_padding_and_dropped_diagonals_are_exact(kernel_calls):
    masks = random_masks(nb=4, block=16)
    ref, fast = _pair(masks)
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    att = torch.ones_like(x)
    att[0, :7] = 0  # left padding
    with torch.no_grad():
        got = fast(input_ids=x, attention_mask=att).logits
        want = ref(input_ids=x, attention_mask=att).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    no_diag = Masks(masks.head_keep, masks.block_mask.clone(), masks.block_size, masks.max_length)
    no_diag.block_mask[0, 0, 2, 2] = False  # rows 32-47 of layer 0 head 0 see nothing
    ref2 = attach_masks(copy.deepcopy(ref), no_diag, kernel="reference")
    fast2 = attach_masks(copy.deepcopy(ref), no_diag, kernel="cpu")
    with torch.no_grad():
        out_ref, out_fast = ref2(input_ids=x).logits, fast2(input_ids=x).logits
    assert torch.isfinite(out_fast).all()
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-4)


def test_a_mask_that_is_not_causal_goes_to_the_reference():
    masks = random_masks(nb=4, block=16)
    ref, fast = _pair(masks)
    q, k, v, _ = (t.detach() for t in attention_inputs(1, 4, 2, 20, 16))
    bidirectional = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    attn = fast.gravity_layers()[0]
    got = cpu_gravity_kernel(attn, q, k, v, bidirectional)
    want = attn.reference_attention(q, k, v, bidirectional)[0]
    assert torch.equal(got, want)


def test_sequence_longer_than_the_mask_is_a_readable_error():
    _, fast = _pair(random_masks(nb=4, block=16))
    x = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the block mask"):
        fast(input_ids=x)
