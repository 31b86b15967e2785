"""profile_field (O(L·H·T)) against the former T × T implementation, a hand-computed case, and its memory."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from gravity_sparse.qubo.profile import profile_field
from gravity_sparse.qubo.synthetic import synthetic_field
from gravity_sparse.stages.s2_solve.values import block_values


def profile_field_reference(profile: torch.Tensor, block_field: torch.Tensor) -> np.ndarray:
    """The implementation before issue 19, verbatim: builds (L, H, T, T) arrays. The specification."""
    prof = profile.double().numpy()  # (L, H, S)
    num_layers, num_heads, seq = prof.shape
    nqb = block_field.shape[-1]
    block = -(-seq // nqb)
    pos = np.arange(nqb * block)
    dist = pos[:, None] - pos[None, :]
    padded = np.concatenate([prof, np.zeros((num_layers, num_heads, nqb * block - seq))], -1)
    valid = (dist >= 0) & (pos[:, None] < seq) & (pos[None, :] < seq)
    pf = np.where(valid, padded[..., np.clip(dist, 0, None)], 0.0)  # (L, H, T, T)
    pf = pf.reshape(num_layers, num_heads, nqb, block, nqb, block).sum(-1).mean(-2)
    pf[..., 0] = np.maximum(pf[..., 0], block_field.double().numpy()[..., 0])
    pf *= np.tril(np.ones((nqb, nqb)))
    return pf / np.maximum(pf.sum(-1, keepdims=True), 1e-12)


# (seq, nqb): full blocks, a partial last block, block 1, one block, more blocks than the padding allows
SHAPES = [(16, 4), (10, 3), (9, 3), (7, 7), (5, 1), (10, 9), (33, 4), (64, 8)]


def _inputs(seq: int, nqb: int, seed: int, integer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    if integer:  # every sum is exact in float64: the two implementations must agree bit for bit
        prof = rng.integers(0, 8, (2, 3, seq)).astype(np.float64)
        bf = rng.integers(0, 4 * seq, (2, 3, nqb, nqb)).astype(np.float64) / 4
    else:
        prof = rng.random((2, 3, seq)) ** 3
        bf = rng.random((2, 3, nqb, nqb)) * 2
    return torch.from_numpy(prof), torch.from_numpy(bf)


# 1/B is exact only for a power of two B = ceil(seq / nqb)
EXACT_SHAPES = [(s, n) for s, n in SHAPES if not -(-s // n) & (-(-s // n) - 1)]


@pytest.mark.parametrize(("seq", "nqb"), EXACT_SHAPES)
def test_equals_reference_exactly_when_arithmetic_is_exact(seq: int, nqb: int) -> None:
    for seed in range(3):
        prof, bf = _inputs(seq, nqb, seed, integer=True)
        np.testing.assert_array_equal(profile_field(prof, bf), profile_field_reference(prof, bf))


@pytest.mark.parametrize(("seq", "nqb"), SHAPES)
def test_equals_reference_on_random_floats(seq: int, nqb: int) -> None:
    for seed in range(3):
        prof, bf = _inputs(seq, nqb, seed, integer=False)
        got, want = profile_field(prof, bf), profile_field_reference(prof, bf)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_sink_column_decides() -> None:
    """A block field whose sink column is larger than the profile's must win there (and only there)."""
    prof, bf = _inputs(64, 8, 0, integer=False)
    bf = bf * 0
    bf[..., 0] = 50.0  # far above any profile block value
    got = profile_field(prof, bf)
    np.testing.assert_allclose(got, profile_field_reference(prof, bf), rtol=1e-12, atol=1e-15)
    assert (got[..., 1:, 0] > 0.5).all()
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-12)


def test_synthetic_field_matches_reference() -> None:
    field, _ = synthetic_field(2, 4, 2, 8, block_size=16, seed=3)
    got = block_values(field, "profile")
    want = profile_field_reference(field["profile"], field["block_field"])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_hand_computed() -> None:
    """seq 4 in 2 blocks of 2, profile [4, 2, 1, 0].

    Row 0 (queries 0, 1), key block 0: p0 + p1 + p0 = 10 over 2 queries -> 5.
    Row 1 (queries 2, 3), key block 0: (2,0) p2 + (2,1) p1 + (3,0) p3 + (3,1) p2 = 4 -> 2;
    key block 1: (2,2) p0 + (3,2) p1 + (3,3) p0 = 10 -> 5.
    Sink column of the measured field: [1, 3] -> row 0 keeps 5, row 1 takes 3. Rows renormalised.
    """
    prof = torch.tensor([[[4.0, 2.0, 1.0, 0.0]]])
    bf = torch.tensor([[[[1.0, 0.0], [3.0, 0.5]]]])
    want = np.array([[1.0, 0.0], [3 / 8, 5 / 8]])
    np.testing.assert_allclose(profile_field(prof, bf)[0, 0], want, rtol=1e-15)
    bf[..., 1, 0] = 0.5  # now the profile wins the sink column: row 1 is [2, 5] / 7
    np.testing.assert_allclose(profile_field(prof, bf)[0, 0], [[1, 0], [2 / 7, 5 / 7]], rtol=1e-15)


def test_hand_computed_partial_last_block() -> None:
    """seq 3 in 2 blocks of 2: query 3 does not exist and counts as a zero row in block 1's mean.

    Row 1, key block 0: (2,0) p2 + (2,1) p1 = 3 -> 1.5; key block 1: (2,2) p0 = 4 -> 2. Row 0 as above.
    """
    prof = torch.tensor([[[4.0, 2.0, 1.0]]])
    bf = torch.zeros(1, 1, 2, 2)
    want = np.array([[1.0, 0.0], [1.5 / 3.5, 2 / 3.5]])
    np.testing.assert_allclose(profile_field(prof, bf)[0, 0], want, rtol=1e-15)


def test_gravity2_shape_is_linear_in_tokens() -> None:
    """36 × 16 heads at T = 4096, 32 × 32 blocks: the old version needed ≈ 77 GB; this one < 64 MB."""
    gen = torch.Generator().manual_seed(0)
    prof = torch.rand(36, 16, 4096, generator=gen)
    bf = torch.rand(36, 16, 32, 32, generator=gen)
    tracemalloc.start()
    start = time.perf_counter()
    out = profile_field(prof, bf)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.shape == (36, 16, 32, 32)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-12)
    # float64 profile (19 MB) + its padded copy (19 MB) + a few (L, H, 32, 32) arrays (5 MB each)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert seconds < 5.0
