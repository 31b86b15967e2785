"""Gravity attention inside transformers: the formula, GQA, padding, the KV cache, dtypes, attentions."""

import pytest
import torch
from torch.nn import functional as F

from gravity_sparse.model.modeling_gravity import gravity_attention_reference


def naive_gravity(q, k, v, mass_log, eps):
    """The Gravity-2 card's formula, one head and one query at a time, straight from the definition."""
    b, hq, s, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    out = torch.zeros(b, hq, s, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            m2 = F.softplus(mass_log[h].double()) ** 2
            for i in range(s):
                pos = sk - s + i
                scores = []
                for j in range(pos + 1):
                    dist2 = ((q[bi, h, i].double() - k[bi, h // group, j].double()) ** 2).sum()
                    scores.append(m2 / (dist2 + eps))
                p = torch.softmax(torch.stack(scores), dim=0)
                out[bi, h, i] = p @ v[bi, h // group, : pos + 1].double()
    return out


@pytest.mark.parametrize(
    "b,hq,hkv,s,sk,d,eps",
    [
        (1, 2, 2, 5, 5, 4, 0.1),
        (2, 4, 2, 7, 7, 8, 0.1),
        (1, 8, 1, 3, 9, 16, 0.5),
        (2, 6, 3, 6, 6, 3, 0.01),
    ],
)
def test_reference_matches_formula(b, hq, hkv, s, sk, d, eps):
    torch.manual_seed(0)
    q, k, v = torch.randn(b, hq, s, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, d)
    mass_log = torch.randn(hq)
    out, probs = gravity_attention_reference(q, k, v, mass_log, eps=eps, return_weights=True)
    expect = naive_gravity(q, k, v, mass_log, eps)
    assert torch.allclose(out.double(), expect, atol=1e-5), (out.double() - expect).abs().max()
    assert torch.allclose(probs.sum(-1), torch.ones(b, hq, s), atol=1e-5)


def test_centering_keeps_large_norms_accurate():
    # q and k far from the origin: ‖q‖² + ‖k‖² − 2q·k cancels catastrophically without the centering shift
    torch.manual_seed(1)
    offset = 300.0
    q = torch.randn(1, 2, 6, 8) * 0.1 + offset
    k = torch.randn(1, 2, 6, 8) * 0.1 + offset
    v = torch.randn(1, 2, 6, 8)
    mass_log = torch.tensor([0.5, 1.5])
    out, _ = gravity_attention_reference(q, k, v, mass_log)
    expect = naive_gravity(q, k, v, mass_log, 0.1)
    assert torch.allclose(out.double(), expect, atol=1e-4), (out.double() - expect).abs().max()


def test_model_uses_gravity_and_masses_matter(model):
    assert model.config._attn_implementation == "gravity"
    x = torch.randint(0, 256, (1, 12))
    before = model(x).logits
    with torch.no_grad():
        model.gravity_layers()[1].gravity_mass_log[2] += 3.0
    assert not torch.allclose(model(x).logits, before)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded(model, side):
    torch.manual_seed(2)
    seqs = [torch.randint(0, 256, (n,)) for n in (11, 6, 9)]
    width = max(len(s) for s in seqs)
    pad = model.config.pad_token_id
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[r, sl], mask[r, sl] = s, 1
    # positions count real tokens only, as generate does for left padding
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for r, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            assert torch.allclose(batched[r, sl], alone, atol=1e-5), (
                (batched[r, sl] - alone).abs().max()
            )


def test_cached_generate_equals_uncached(model):
    x = torch.randint(0, 256, (2, 7))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw)
        uncached = model.generate(x, use_cache=False, **kw)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, uncached)


def test_cached_step_logits_equal_full_forward(model):
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :6], use_cache=True)
        step = model(x[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step, full[:, 6:], atol=1e-5)


def test_bf16_close_to_fp32(model):
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(x).logits
        low = model.to(torch.bfloat16)(x).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_output_attentions_are_gravity_probabilities(model):
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        out = model(x, output_attentions=True)
    assert len(out.attentions) == 2
    a = out.attentions[0]
    assert a.shape == (1, 4, 9, 9)
    assert torch.allclose(a.sum(-1), torch.ones(1, 4, 9), atol=1e-5)
    assert torch.all(a.triu(1) == 0)  # causal


def test_block_mask_restricts_attention(model):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    block_mask = torch.ones(4, 4, 4, dtype=torch.bool).tril()
    block_mask[1, 3, 0] = False
    head_keep = torch.tensor([True, True, False, True])
    out, probs = gravity_attention_reference(
        q,
        k,
        v,
        torch.zeros(4),
        block_mask=block_mask,
        head_keep=head_keep,
        block_size=2,
        return_weights=True,
    )
    assert torch.all(probs[0, 1, 6:, 0:2] == 0)  # the dropped block (3, 0)
    # every allowed key of those rows keeps some mass (keys 2.. up to the query itself), none beyond
    assert torch.all(probs[0, 1, 6, 2:7] > 0) and torch.all(probs[0, 1, 7, 2:8] > 0)
    assert probs[0, 1, 6, 7] == 0
    assert torch.allclose(probs[0, 1].sum(-1), torch.ones(8), atol=1e-6)
    assert torch.all(out[0, 2] == 0)
    with pytest.raises(ValueError, match="longer than the block mask"):
        gravity_attention_reference(
            torch.randn(1, 4, 9, 4),
            torch.randn(1, 2, 9, 4),
            torch.randn(1, 2, 9, 4),
            torch.zeros(4),
            block_mask=block_mask,
            block_size=2,
        )


def test_gradients_reach_masses(model):
    model.train()
    x = torch.randint(0, 256, (2, 10))
    loss = model(x, labels=x).loss
    loss.backward()
    for attn in model.gravity_layers():
        assert attn.gravity_mass_log.grad is not None
        assert attn.gravity_mass_log.grad.abs().sum() > 0
