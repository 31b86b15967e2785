"""Field math on constructed probability tensors, against brute-force loops and closed forms."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gravity_sparse.model.modeling_gravity import gravity_attention_reference, gravity_scores
from gravity_sparse.stages.s1_measure.field import (
    LayerFieldAccumulator,
    block_mass_sums,
    block_query_counts,
    cosine_from_gram,
    distance_sums,
    entropy_sums,
    fit_power_law,
    head_locality,
    head_output_gram,
)


def causal_probs(bsz: int, heads: int, s: int, seed: int = 0) -> torch.Tensor:
    """Random row-stochastic causal attention (B, H, S, S)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, heads, s, s, generator=gen) * 2
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)


def brute_force(probs: torch.Tensor, block_size: int):
    """Block field, drop cost, profile and entropy by plain loops over (sequence, query, key)."""
    bsz, heads, s, _ = probs.shape
    nb = -(-s // block_size)
    field = np.zeros((heads, nb, nb))
    cost = np.zeros((heads, nb, nb))
    rows = np.zeros(nb)
    prof, pairs = np.zeros((heads, s)), np.zeros(s)
    ent = np.zeros(heads)
    p = probs.double().numpy()
    for b in range(bsz):
        for i in range(s):
            rows[i // block_size] += 1
            for j in range(i + 1):
                field[:, i // block_size, j // block_size] += p[b, :, i, j]
                prof[:, i - j] += p[b, :, i, j]
                pairs[i - j] += 1
                ent -= np.where(p[b, :, i, j] > 0, p[b, :, i, j] * np.log(p[b, :, i, j]), 0)
            for kb in range(i // block_size + 1):
                share = p[b, :, i, kb * block_size : (kb + 1) * block_size].sum(-1)
                # KL(renormalised without block kb ‖ full) = −log(1 − share)
                cost[:, i // block_size, kb] -= np.log1p(-np.minimum(share, 1 - 1e-6))
    rows = rows[None, :, None]
    return field / rows, cost / rows, prof / pairs, ent / (bsz * s)


@pytest.mark.parametrize("chunk", [1, 5, 13])
def test_accumulator_matches_brute_force(chunk):
    bsz, heads, s, bs = 2, 3, 13, 4  # 13 is not a multiple of the block size: a partial last block
    probs = causal_probs(bsz, heads, s)
    acc = LayerFieldAccumulator(heads, s, bs, "cpu")
    for start in range(0, s, chunk):
        stop = min(s, start + chunk)
        p = probs[:, :, start:stop, :stop]  # a query chunk sees only its causal keys
        acc.add(p, p * 10, start)
    got = acc.result()
    field, cost, prof, ent = brute_force(probs, bs)
    torch.testing.assert_close(
        got["block_field"].double(), torch.from_numpy(field), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        got["block_cost"].double(), torch.from_numpy(cost), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(got["profile"].double(), torch.from_numpy(prof), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        got["score_profile"].double(), torch.from_numpy(prof) * 10, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(got["entropy"].double(), torch.from_numpy(ent), atol=1e-5, rtol=0)
    rows = got["block_field"].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert torch.all(got["block_field"].triu(1) == 0)


def test_previous_token_and_uniform_closed_form():
    s, bs = 16, 4
    prev = torch.zeros(s, s)
    prev[0, 0] = 1.0
    prev[torch.arange(1, s), torch.arange(s - 1)] = 1.0
    uniform = torch.ones(s, s).tril() / torch.arange(1, s + 1).view(s, 1)
    probs = torch.stack([prev, uniform]).unsqueeze(0)  # (1, 2, S, S)
    acc = LayerFieldAccumulator(2, s, bs, "cpu")
    acc.add(probs, probs, 0)
    got = acc.result()
    # previous token: all mass at Δ = 1 except the first query (Δ = 0, one of S pairs at Δ = 0)
    expected_prev = torch.zeros(s)
    expected_prev[0], expected_prev[1] = 1.0 / s, 1.0
    torch.testing.assert_close(got["profile"][0], expected_prev)
    # uniform: mean over i >= Δ of 1 / (i + 1)
    harmonic = [sum(1.0 / (i + 1) for i in range(d, s)) / (s - d) for d in range(s)]
    torch.testing.assert_close(got["profile"][1], torch.tensor(harmonic))
    # previous-token block field: the first query of each block looks into the block before
    diag = torch.full((s // bs,), (bs - 1) / bs)
    diag[0] = 1.0
    torch.testing.assert_close(got["block_field"][0].diagonal(), diag)
    torch.testing.assert_close(got["block_field"][0].diagonal(-1), torch.full((3,), 1 / bs))
    # uniform rows: block mass = keys of the block seen / (i + 1); entropy = mean log(i + 1)
    torch.testing.assert_close(got["entropy"][0], torch.tensor(0.0))
    torch.testing.assert_close(got["entropy"][1], torch.log(torch.arange(1.0, s + 1)).mean())
    assert fit_power_law(got["profile"][0]).alpha != fit_power_law(got["profile"][0]).alpha  # NaN
    assert head_locality(got["block_field"])[0] > head_locality(got["block_field"])[1]


def test_block_mass_and_distance_sums_are_batch_sums():
    probs = causal_probs(4, 2, 9, seed=3)
    for k in range(2):  # mass and drop cost
        whole = block_mass_sums(probs, 0, 3, 3)[k]
        parts = sum(block_mass_sums(probs[b : b + 1], 0, 3, 3)[k] for b in range(4))
        torch.testing.assert_close(whole, parts)
    torch.testing.assert_close(
        distance_sums(probs, 0), sum(distance_sums(probs[b : b + 1], 0) for b in range(4))
    )
    assert entropy_sums(probs).shape == (2,)
    torch.testing.assert_close(
        block_query_counts(9, 4), torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)
    )


@pytest.mark.parametrize("alpha,amp", [(1.0, 0.5), (2.3, 3.0), (0.0, 0.1)])
def test_power_law_fit_recovers_exact_law(alpha, amp):
    delta = np.arange(200, dtype=np.float64)
    profile = amp * np.maximum(delta, 1) ** -alpha
    profile[0] = 123.0  # Δ = 0 is outside the fit
    fit = fit_power_law(profile)
    assert fit.alpha == pytest.approx(alpha, abs=1e-9)
    assert fit.amp == pytest.approx(amp, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_power_law_fit_r2_drops_with_noise_and_needs_two_points():
    rng = np.random.default_rng(0)
    delta = np.arange(1, 300, dtype=np.float64)
    profile = np.concatenate([[1.0], delta**-1.5 * np.exp(rng.normal(0, 0.5, delta.shape))])
    fit = fit_power_law(profile)
    assert 1.3 < fit.alpha < 1.7 and 0.3 < fit.r2 < 0.99
    one_point = np.array([1.0, 1.0, 0.0, 0.0])
    assert math.isnan(fit_power_law(one_point).alpha)


def test_gravity_scores_softmax_is_reference_attention():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 11, 8, generator=gen) for h in (4, 2, 2))
    mass_log = torch.randn(4, generator=gen)
    groups = torch.tensor([0, 0, 1, 1])
    _, probs = gravity_attention_reference(q, k, v, mass_log, kv_groups=groups, return_weights=True)
    scores = gravity_scores(q, k, mass_log, 0.1, groups)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    mine = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(mine, probs, atol=1e-6, rtol=1e-5)
    # and the scores themselves are M² / (‖q − k‖² + ε)
    d2 = (q[0, 3, 5] - k[0, 1, 2]).pow(2).sum()
    expected = F.softplus(mass_log[3]) ** 2 / (d2 + 0.1)
    torch.testing.assert_close(scores[0, 3, 5, 2], expected, atol=1e-5, rtol=1e-4)


def test_head_output_gram_and_cosine():
    gen = torch.Generator().manual_seed(2)
    out = torch.randn(2, 3, 5, 4, generator=gen)
    w = torch.randn(6, 12, generator=gen)
    gram = head_output_gram(out, w)
    per_head = [
        torch.einsum("bcd,ed->bce", out[:, h], w[:, h * 4 : (h + 1) * 4]).flatten()
        for h in range(3)
    ]
    expected = torch.stack([torch.stack([a @ b for b in per_head]) for a in per_head]).double()
    torch.testing.assert_close(gram, expected, rtol=1e-5, atol=1e-4)
    cos = cosine_from_gram(gram)
    assert torch.allclose(cos.diagonal(), torch.ones(3, dtype=torch.float64))
    direct = F.cosine_similarity(per_head[0], per_head[2], dim=0)
    assert float(cos[0, 2]) == pytest.approx(float(direct), abs=1e-5)
    zero = cosine_from_gram(torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(zero, torch.eye(2, dtype=torch.float64))
