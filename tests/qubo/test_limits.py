"""The solve-size limit: long contexts at small blocks are refused in one line, naming what fits."""

from __future__ import annotations

import pytest

from gravity_sparse.errors import UserError
from gravity_sparse.qubo.limits import (
    MAX_BLOCK_VARIABLES,
    block_variables,
    check_solve_size,
    fitting_block_size,
)
from gravity_sparse.qubo.synthetic import synthetic_field
from gravity_sparse.stages.s2_solve.config import SolveConfig
from gravity_sparse.stages.s2_solve.solve import solve_field


def test_gravity2_at_4k_fits():
    assert block_variables(36, 16, 32) == 285_696
    check_solve_size(36, 16, 4096, 128)


@pytest.mark.parametrize("block", [512, 128])
def test_gravity2_at_32k_is_refused_with_a_block_size_that_fits(block):
    with pytest.raises(UserError) as err:
        check_solve_size(36, 16, 32768, block)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{MAX_BLOCK_VARIABLES:,}" in msg and "solve.max_block_variables" in msg
    assert "block_size=1024 (32×32 blocks" in msg
    assert fitting_block_size(36, 16, 32768, block, MAX_BLOCK_VARIABLES) == 1024


def test_limit_zero_means_none():
    check_solve_size(36, 16, 32768, 128, 0)


def test_solve_field_refuses_before_any_work():
    field, meta = synthetic_field(2, 2, 1, 8, block_size=4, seed=0)
    with pytest.raises(UserError, match="above the limit of 50"):
        solve_field(field, meta, SolveConfig(max_block_variables=50))
    with pytest.raises(UserError, match="max_block_variables"):
        SolveConfig(max_block_variables=-1)
