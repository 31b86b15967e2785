"""The structured QUBO (one window structure per head): costs against a per-query loop, the BQM against
brute force, the annealer against the exact optimum, and the solve's budget and mask shapes."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from gravity_sparse.errors import UserError
from gravity_sparse.qubo import structured as st
from gravity_sparse.qubo.coupling import offdiag_blocks
from gravity_sparse.qubo.synthetic import synthetic_field
from gravity_sparse.stages.s2_solve.config import SolveConfig
from gravity_sparse.stages.s2_solve.solve import solve_field


def _random_model(seed: int, heads: int = 3, seq: int = 45, block: int = 8):
    """A profile with a partial last block (45 = 5·8 + 5) and measured sink shares."""
    rng = np.random.default_rng(seed)
    nqb = -(-seq // block)
    profile = rng.random((heads, seq)) ** 3 / (1 + np.arange(seq))
    sink = rng.random((heads, nqb)) * 0.6
    return profile, sink, block, nqb


def _loop_cost(profile, sink, block, masks, kind):
    """Per query i: block masses from the profile, the sink block raised to its measured share."""
    heads, seq = profile.shape
    out = np.zeros(heads)
    for h in range(heads):
        costs = []
        for i in range(seq):
            qb = i // block
            mb = np.zeros(qb + 1)
            for j in range(i + 1):
                mb[j // block] += profile[h, i - j]
            if qb >= 1:
                s = min(sink[h, qb], 0.999)
                mb[0] = max(mb[0], s * (mb.sum() - mb[0]) / (1 - s))
            keep = np.array([masks[h, qb, kb] or kb == qb for kb in range(qb + 1)])
            kept = mb[keep].sum() / mb.sum()
            costs.append({"kl": -np.log(kept), "mass": 1 - kept, "sq": (1 - kept) ** 2}[kind])
        out[h] = np.mean(costs)
    return out


@pytest.mark.parametrize("kind", ["kl", "mass", "sq"])
def test_mask_costs_equal_a_per_query_loop(kind):
    profile, sink, block, nqb = _random_model(0)
    rng = np.random.default_rng(1)
    masks = np.tril(rng.random((3, nqb, nqb)) < 0.5)
    model = st.row_model(profile, sink, block)
    got = st.mask_costs(model, masks, kind)
    np.testing.assert_allclose(got, _loop_cost(profile, sink, block, masks, kind), rtol=1e-10)


@pytest.mark.parametrize("kind", ["kl", "mass", "sq"])
def test_structure_costs_closed_form_equals_mask_costs(kind):
    profile, sink, block, nqb = _random_model(2)
    model = st.row_model(profile, sink, block)
    widths, sinks = st.structures(nqb, "choose")
    closed = st.structure_costs(model, widths, sinks, kind)
    qb, kb = offdiag_blocks(nqb)
    for s, mask in enumerate(st.structure_masks(nqb, widths, sinks)):
        full = np.zeros((3, nqb, nqb), dtype=bool)
        full[:, qb, kb] = mask
        np.testing.assert_allclose(closed[:, s], st.mask_costs(model, full, kind), atol=1e-12)
    # wider is never costlier, the sink never hurts, the full window is free
    no_sink = closed[:, :nqb]
    assert (np.diff(no_sink, axis=1) <= 1e-12).all()
    assert (closed[:, nqb:] <= no_sink[:, : nqb - 2] + 1e-12).all()
    np.testing.assert_allclose(no_sink[:, -1], 0.0, atol=1e-12)
    assert (
        st.structure_blocks(nqb, widths, sinks)[:nqb]
        == nqb + np.r_[0, np.cumsum(np.arange(nqb - 1, 0, -1))]
    ).all()


def _random_field(seed: int, heads: int = 3, nqb: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = np.tril(rng.random((heads, nqb, nqb)) ** 3)
    return field / field.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["kl", "mass", "sq"])
def test_field_costs_equal_a_per_row_loop_and_each_structure_mask(kind):
    field = _random_field(3)
    heads, nqb = field.shape[:2]
    masks = np.tril(np.random.default_rng(4).random((heads, nqb, nqb)) < 0.4, -1)
    phi = {"kl": lambda k: -np.log(k), "mass": lambda k: 1 - k, "sq": lambda k: (1 - k) ** 2}[kind]
    loop = [
        np.mean([phi((field[h, q, : q + 1] * (masks[h, q, : q + 1] | (np.arange(q + 1) == q))).sum())
                 for q in range(nqb)])
        for h in range(heads)
    ]  # fmt: skip
    np.testing.assert_allclose(st.field_mask_costs(field, masks, kind), loop, rtol=1e-12)
    widths, sinks = st.structures(nqb, "choose")
    closed = st.field_structure_costs(field, widths, sinks, kind)
    qb, kb = offdiag_blocks(nqb)
    for s, mask in enumerate(st.structure_masks(nqb, widths, sinks)):
        full = np.zeros((heads, nqb, nqb), dtype=bool)
        full[:, qb, kb] = mask
        np.testing.assert_allclose(closed[:, s], st.field_mask_costs(field, full, kind), rtol=1e-12)
    assert (np.diff(closed[:, :nqb], axis=1) <= 1e-12).all()  # wider is never costlier
    np.testing.assert_allclose(closed[:, nqb - 1], 0.0, atol=1e-12)


def _tiny_problem(seed: int, heads: int = 2, nqb: int = 3) -> st.LayerProblem:
    rng = np.random.default_rng(seed)
    widths, _ = st.structures(nqb, "choose")
    option = rng.normal(0.0, 1.0, (heads, len(widths)))
    pair = np.triu(rng.random((heads, heads)), 1)
    imp = rng.random(heads)
    groups = np.arange(heads) % 2
    kv_cost, kv_pen = 0.05, 0.5
    return st.LayerProblem(
        layer=0,
        heads=list(range(heads)),
        kv=sorted(set(groups.tolist())),
        option=option,
        importance=imp,
        pair=pair + pair.T,
        groups=groups,
        kv_cost=kv_cost,
        kv_penalty=kv_pen,
        onehot=0.5 + imp + (pair + pair.T).sum(1) + kv_pen + kv_cost + np.abs(option).max(1),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bqm_minimum_is_the_exact_feasible_optimum(seed):
    problem = _tiny_problem(seed)
    n = problem.num_variables
    states = np.array(list(itertools.product([0, 1], repeat=n)), dtype=np.int8)
    energies = problem.energy(states)
    choice, best = st.exact_layer(problem)
    assert energies.min() == pytest.approx(best, abs=1e-9)
    assert problem.energy(problem.state(choice)[None, :])[0] == pytest.approx(best, abs=1e-9)
    # every feasible choice: the BQM energy is the choice energy
    k, s = problem.option.shape
    for c in itertools.product(range(-1, s), repeat=k):
        c = np.array(c)
        assert problem.energy(problem.state(c)[None, :])[0] == pytest.approx(
            problem.choice_energy(c), abs=1e-9
        )


def test_polish_reaches_a_pairwise_optimum_from_anywhere():
    problem = _tiny_problem(3, heads=6, nqb=5)
    choice = st.polish(problem, np.full(6, -1))
    e = problem.choice_energy(choice)
    options = range(-1, problem.num_structures)
    for a, b in itertools.combinations(range(6), 2):
        for oa, ob in itertools.product(options, options):
            trial = choice.copy()
            trial[a], trial[b] = oa, ob
            assert problem.choice_energy(trial) >= e - 1e-12


def test_polish_moves_two_heads_that_share_a_kv_head():
    # keeping one head alone pays the whole KV head (0.1 + 1.0 > 0.8), keeping both is cheaper than
    # dropping both (0.2 + 1.0 < 1.6): only a two-head move gets there from "both dropped"
    problem = st.LayerProblem(
        layer=0,
        heads=[0, 1],
        kv=[0],
        option=np.array([[0.1, 0.5], [0.1, 0.5]]),
        importance=np.array([0.8, 0.8]),
        pair=np.zeros((2, 2)),
        groups=np.array([0, 0]),
        kv_cost=1.0,
        kv_penalty=1.5,
        onehot=np.full(2, 10.0),
    )
    choice = st.polish(problem, np.array([-1, -1]))
    assert choice.tolist() == [0, 0]
    assert problem.choice_energy(choice) == pytest.approx(st.exact_layer(problem)[1])


@pytest.fixture(scope="module")
def field():
    return synthetic_field(4, 9, 3, 8, seed=5)


@pytest.mark.parametrize(
    ("head_drop", "rows"), [(None, "profile"), (0.25, "profile"), (0.25, "field")]
)
def test_window_solve_meets_the_budget_with_structures(field, head_drop, rows):
    tensors, meta = field
    cfg = SolveConfig(
        density=0.45, head_drop=head_drop, seed=2, structure="window", structure_rows=rows
    )
    result = solve_field(tensors, meta, cfg)
    rep = result.report
    assert rep["blocks_computed"] == rep["blocks_target"]
    if head_drop is not None:
        assert rep["heads_kept"] == rep["heads_target"] == 36 - round(0.25 * 36)
    assert rep["max_gap"] <= 1e-9  # anneal + polish at the exact optimum of every layer
    nqb = tensors["block_field"].shape[-1]
    mask = result.block_mask.numpy()
    width = np.array(rep["structures"]["width_blocks"])
    sink = np.array(rep["structures"]["sink"])
    q, k = np.tril_indices(nqb)
    partial = 0
    for layer, head in zip(*np.nonzero(result.head_keep.numpy()), strict=True):
        w = width[layer, head]
        expect = ((q - k) <= w) | (sink[layer, head] & (k == 0))
        got = mask[layer, head, q, k]
        assert (got[expect]).all()  # the structure is kept
        extra = got & ~expect
        assert ((q - k)[extra] == w + 1).all()  # anything else is on the next diagonal
        partial += int(extra.sum())
    assert partial == rep["repair"]["partial_blocks"]
    kept = result.head_keep.numpy()
    assert (sink[kept] | (width[kept] == nqb - 1)).all()  # structure_sink=always
    assert not mask[~result.head_keep.numpy()].any()
    # the change is visible: the free-block QUBO chooses other blocks
    blocks = solve_field(tensors, meta, SolveConfig(density=0.45, head_drop=head_drop, seed=2))
    assert not np.array_equal(blocks.block_mask.numpy(), mask)
    again = solve_field(tensors, meta, cfg)
    assert np.array_equal(again.block_mask.numpy(), mask)
    if rows == "field":  # priced on the field, the structures differ from the profile's
        profile = solve_field(tensors, meta, dataclasses.replace(cfg, structure_rows="profile"))
        assert not np.array_equal(profile.block_mask.numpy(), mask)


@pytest.mark.parametrize("rows", ["profile", "field"])
def test_window_solve_beats_the_window_baseline_on_its_own_objective(field, rows):
    tensors, meta = field
    for density in (0.45, 0.55, 0.7):
        cfg = SolveConfig(
            density=density, head_drop=0.25, structure="window", baselines=["window"],
            structure_rows=rows,
        )  # fmt: skip
        rep = solve_field(tensors, meta, cfg).report
        assert (
            rep["structured_objective"] <= rep["baselines"]["window"]["structured_objective"] + 1e-9
        )


def test_a_budget_below_every_head_with_its_sink_is_a_user_error(field):
    tensors, meta = field
    # 8 × 8 blocks: diagonal + sink = 15 of 36 blocks a head; 27 heads need 405 of 1,296 (0.31)
    cfg = SolveConfig(density=0.3, head_drop=0.25, structure="window")
    with pytest.raises(
        UserError, match="below the 405 that 27 kept heads need .*structure_sink=choose"
    ):
        solve_field(tensors, meta, cfg)
    # without a head target the solver drops heads instead
    rep = solve_field(tensors, meta, SolveConfig(density=0.3, structure="window")).report
    assert rep["blocks_computed"] == rep["blocks_target"] and rep["heads_kept"] < 27


def test_structure_config_errors():
    with pytest.raises(UserError, match="solve.structure must be one of blocks, window"):
        SolveConfig(structure="diagonal")
    with pytest.raises(UserError, match="structure_cost must be one of kl, mass, sq"):
        SolveConfig(structure="window", structure_cost="l2")
    with pytest.raises(UserError, match="structure_rows must be one of profile, field"):
        SolveConfig(structure="window", structure_rows="rows")


def test_window_bqm_files_hold_the_solution(field, tmp_path):
    import json

    import dimod

    from gravity_sparse.stages.s2_solve.stage import write_solve_outputs

    tensors, meta = field
    result = solve_field(
        tensors,
        meta,
        SolveConfig(density=0.3, head_drop=0.25, structure="window", structure_sink="choose"),
    )
    write_solve_outputs(result, tmp_path)
    files = sorted((tmp_path / "bqm").glob("*.json"))
    assert len(files) == 4  # one BQM per layer
    width = np.array(result.report["structures"]["width_blocks"])
    for path in files:
        record = json.loads(path.read_text())
        assert "structure" in record["variables"]
        with open(tmp_path / "bqm" / record["bqm_file"], "rb") as f:
            bqm = dimod.BinaryQuadraticModel.from_file(f)
        final = np.array(record["samples"]["final"]["state"])
        energy = bqm.energy(dict(enumerate(final.tolist())))
        assert energy == pytest.approx(record["samples"]["final"]["energy"], abs=1e-12)
        k, layer = 9, record["layer"]
        nstruct = len(st.structures(8, "choose")[0])
        u = final[k : k * (nstruct + 1)].reshape(k, nstruct)
        assert (final[:k] + u.sum(1) == 1).all()  # exactly one option per head
        widths = st.structures(8, "choose")[0][u.argmax(1)]
        assert np.array_equal(np.where(final[:k] == 1, -1, widths), width[layer])


def test_sqrt_block_scale_is_the_geometric_mean_in_both_formulations(field):
    from gravity_sparse.qubo.formulation import build_terms, scale_of_heads
    from gravity_sparse.qubo.structured_solve import build_structured

    tensors, meta = field
    imp = tensors["importance"].double().numpy()
    np.testing.assert_allclose(scale_of_heads(imp, "sqrt") ** 2, imp * imp.mean())
    args = (
        tensors["block_field"].double().numpy(),
        imp,
        tensors["redundancy"].double().numpy(),
        tensors["mass"].double().numpy(),
        tensors["kv_groups"].numpy(),
    )
    terms = {b: build_terms(*args, num_kv=3, block_scale=b) for b in ("flat", "importance", "sqrt")}
    # c_hb is linear in S_h: sqrt's values are the geometric mean of flat's and importance's
    np.testing.assert_allclose(
        terms["sqrt"].value ** 2, terms["flat"].value * terms["importance"].value, rtol=1e-9
    )
    prof, bf = tensors["profile"].double().numpy(), args[0]
    costs = {
        b: build_structured(prof, bf, terms[b], kind="kl", block_scale=b).costs
        for b in ("flat", "importance", "sqrt")
    }
    np.testing.assert_allclose(
        costs["sqrt"] ** 2, costs["flat"] * costs["importance"], rtol=1e-9, atol=1e-30
    )


@pytest.mark.parametrize("rows", ["profile", "field"])
def test_the_objective_prices_masks_as_the_structures_are_priced(field, rows):
    from gravity_sparse.qubo.formulation import build_terms
    from gravity_sparse.qubo.structured_solve import build_structured

    tensors, meta = field
    bf = tensors["block_field"].double().numpy()
    num_layers, heads, nqb, _ = bf.shape
    args = (bf, tensors["importance"].double().numpy(), tensors["redundancy"].double().numpy(),
            tensors["mass"].double().numpy(), tensors["kv_groups"].numpy())  # fmt: skip
    terms = build_terms(*args, num_kv=3, block_scale="flat")
    s = build_structured(
        tensors["profile"].double().numpy(), bf, terms, kind="kl", block_scale="flat", rows=rows
    )
    qb, kb = offdiag_blocks(nqb)
    for j in (0, 3, len(s.widths) - 1):
        full = np.zeros((heads, nqb, nqb), dtype=bool)
        full[:, qb, kb] = s.masks[j]
        for layer in range(num_layers):
            np.testing.assert_allclose(
                s.scale[layer] * s.mask_costs(layer, full), s.costs[layer, :, j], atol=1e-12
            )
