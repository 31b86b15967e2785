"""Baselines and the profile field on hand-made inputs, with the answers worked out by hand."""

import numpy as np
import pytest
import torch

from gravity_sparse.qubo.baselines import baseline_masks
from gravity_sparse.qubo.profile import profile_field
from gravity_sparse.qubo.registry import BASELINES

# one layer, two heads, 3 × 3 blocks: off-diagonal blocks in tril order (1,0), (2,0), (2,1)
FIELD = np.zeros((1, 2, 3, 3))
FIELD[0, 0, [1, 2, 2], [0, 0, 1]] = [0.9, 0.1, 0.5]
FIELD[0, 1, [1, 2, 2], [0, 0, 1]] = [0.6, 0.7, 0.3]
TARGET = 2 * 3 + 3  # both diagonals (6 blocks) + 3 off-diagonal blocks

EXPECTED = {
    # the three largest field values of the model: 0.9 (h0), 0.7 and 0.6 (h1)
    "greedy": [[True, False, False], [True, True, False]],
    # 2 blocks for head 0, 1 for head 1, each head's largest first
    "uniform": [[True, False, True], [False, True, False]],
    # sink column first, then nearest to the diagonal: (1,0), (2,0), (2,1)
    "window": [[True, True, False], [True, False, False]],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_baseline_masks_on_a_hand_made_field(name):
    heads, blocks = baseline_masks(name, FIELD, TARGET, sink_blocks=1)
    assert heads.all()
    assert blocks.tolist() == [EXPECTED[name]]


def test_window_without_sinks_is_the_nearest_diagonals():
    _, blocks = baseline_masks("window", FIELD, TARGET, sink_blocks=0)
    # distance 1 first: (1,0) then (2,1); head 0 takes both, head 1 the first
    assert blocks.tolist() == [[[True, False, True], [True, False, False]]]


def test_random_baseline_meets_the_budget_and_follows_its_seed():
    a = baseline_masks("random", FIELD, TARGET, seed=1)[1]
    assert a.sum() == 3 and np.array_equal(a, baseline_masks("random", FIELD, TARGET, seed=1)[1])
    seeds = {baseline_masks("random", FIELD, TARGET, seed=s)[1].tobytes() for s in range(8)}
    assert len(seeds) > 1


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_spends_the_budget_in_the_kept_heads_only(name):
    kept = np.array([[True, False]])
    heads, blocks = baseline_masks(name, FIELD, 3 + 2, heads=kept)
    assert heads.tolist() == kept.tolist()
    assert blocks[0, 1].sum() == 0 and blocks[0, 0].sum() == 2
    if name == "greedy":
        assert blocks[0, 0].tolist() == [True, False, True]  # 0.9 and 0.5


def test_profile_field_by_hand():
    """4 tokens, blocks of 2: query i puts profile[i − j] on key j; blocks sum keys, average queries."""
    profile = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]], dtype=torch.float64)
    block_field = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    block_field[0, 0, 0, 0] = 0.1  # below the profile's 0.65: the profile stays
    block_field[0, 0, 1, 0] = 0.5  # above the profile's 0.325: the sink keeps the measured mass
    got = profile_field(profile, block_field)[0, 0]
    # row 0: queries 0, 1 see keys 0..1: (0.5 + (0.3 + 0.5)) / 2 = 0.65, nothing above the diagonal
    # row 1: key block 0: ((0.15 + 0.3) + (0.05 + 0.15)) / 2 = 0.325 -> sink 0.5;
    #        key block 1: (0.5 + (0.3 + 0.5)) / 2 = 0.65; rows renormalised to 1
    want = np.array([[1.0, 0.0], [0.5 / 1.15, 0.65 / 1.15]])
    np.testing.assert_allclose(got, want, rtol=1e-12)
