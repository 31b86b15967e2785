"""The solve stage: exactness of energies, budget, constraints, determinism, baselines, bad input."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import dimod
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gravity_sparse.errors import UserError
from gravity_sparse.qubo import anneal, exact
from gravity_sparse.qubo.formulation import (
    build_subproblem,
    build_terms,
    canonical,
    causal_blocks_per_head,
    computed_blocks,
    mass_weight,
    objective,
    offdiag_blocks,
    split_state,
    violations,
)
from gravity_sparse.qubo.synthetic import synthetic_field
from gravity_sparse.stages.s2_solve.config import SolveConfig
from gravity_sparse.stages.s2_solve.field_io import check_field_matches_model, read_field
from gravity_sparse.stages.s2_solve.solve import solve_field
from gravity_sparse.stages.s2_solve.stage import write_solve_outputs
from gravity_sparse.stages.s2_solve.values import row_coupling as coupling_of


def _terms(field: dict[str, torch.Tensor], meta: dict[str, str], **kw) -> object:
    return build_terms(
        field["block_field"].double().numpy(),
        field["importance"].double().numpy(),
        field["redundancy"].double().numpy(),
        field["mass"].double().numpy(),
        field["kv_groups"].numpy(),
        num_kv=int(meta["num_kv_heads"]),
        **kw,
    )


@pytest.fixture(scope="module")
def small_field():
    return synthetic_field(4, 8, 2, 8, seed=3)


@pytest.fixture(scope="module")
def solved(small_field, tmp_path_factory):
    field, meta = small_field
    cfg = SolveConfig(density=0.3, seed=1, exact_layers=1)
    result = solve_field(field, meta, cfg)
    out = tmp_path_factory.mktemp("solve")
    write_solve_outputs(result, out)
    return result, out


def test_saved_energies_match_dimod(solved):
    result, out = solved
    files = sorted((out / "bqm").glob("*.json"))
    assert len(files) == result.report["num_subproblems"] > 0
    nqb = result.block_mask.shape[-1]
    nb = nqb * (nqb - 1) // 2
    sub_of = {
        f"layer_{item['sub'].layer:02d}_c{i:03d}.bqm": item["sub"]
        for i, item in enumerate(result.subproblems)
    }
    for path in files:
        record = json.loads(path.read_text())
        with open(out / "bqm" / record["bqm_file"], "rb") as f:
            bqm = dimod.BinaryQuadraticModel.from_file(f)
        for sample in record["samples"].values():
            state = dict(enumerate(sample["state"]))
            assert bqm.energy(state) == pytest.approx(sample["energy"], rel=1e-12, abs=1e-12)
        # the saved states are the solver's: the final one is what the masks hold
        x, _, z = split_state(
            sub_of[record["bqm_file"]], nb, np.array(record["samples"]["final"]["state"])
        )
        layer, heads = record["layer"], record["heads"]
        assert np.array_equal(result.head_keep.numpy()[layer, heads], x.astype(bool))


def test_budget_met_exactly_and_masks_well_formed(solved, small_field):
    result, out = solved
    field, _ = small_field
    num_layers, num_heads, nqb, _ = field["block_field"].shape
    total = num_layers * num_heads * causal_blocks_per_head(nqb)
    with safe_open(str(out / "masks.safetensors"), framework="pt") as f:
        head_keep, block_mask, meta = (
            f.get_tensor("head_keep"),
            f.get_tensor("block_mask"),
            f.metadata(),
        )
    assert int(block_mask.sum()) == round(0.3 * total) == result.report["blocks_computed"]
    assert result.report["constraint_violations"] == 0
    assert not torch.triu(block_mask, diagonal=1).any()
    diag = block_mask.diagonal(dim1=-2, dim2=-1)  # (L, H, NQB)
    assert torch.equal(diag, head_keep[..., None].expand_as(diag))
    assert not block_mask[~head_keep].any()
    assert float(meta["density"]) == pytest.approx(0.3, abs=0.5 / total)
    assert meta["method"] == "qubo-sa" and meta["block_size"] == "64"
    for name in ("greedy", "window", "random", "uniform"):
        with safe_open(str(out / f"masks_{name}.safetensors"), framework="pt") as f:
            assert int(f.get_tensor("block_mask").sum()) == round(0.3 * total)


def test_kept_query_heads_keep_their_kv_head(solved, small_field):
    result, _ = solved
    kv_groups = small_field[0]["kv_groups"].numpy()
    nqb = small_field[0]["block_field"].shape[-1]
    nb = nqb * (nqb - 1) // 2
    for item in result.subproblems:
        sub = item["sub"]
        for name in ("anneal", "final"):
            x, y, z = split_state(sub, nb, item[name])
            kv_of = [sub.kv.index(g) for g in kv_groups[sub.layer, sub.heads].tolist()]
            assert all(y[kv_of[h]] for h in range(len(x)) if x[h])
            assert not z[~x].any()


def test_qubo_beats_baselines_on_its_objective(solved):
    result, _ = solved
    rep = result.report
    for name, base in rep["baselines"].items():
        assert rep["objective"] <= base["objective"] + 1e-12, name


def test_same_seed_same_masks(small_field, solved):
    field, meta = small_field
    again = solve_field(field, meta, SolveConfig(density=0.3, seed=1, exact_layers=0, baselines=[]))
    assert torch.equal(again.block_mask, solved[0].block_mask)
    assert torch.equal(again.head_keep, solved[0].head_keep)


def test_exact_checks_reported(solved):
    checks = solved[0].report["exact_checks"]
    assert checks and all(c["milp"]["optimal"] for c in checks)
    assert all(c["milp"]["gap"] >= -1e-9 for c in checks)  # nothing beats the optimum
    assert all(abs(c["milp_same_budget"]["gap"]) <= 1e-4 for c in checks)


@pytest.mark.parametrize("contiguity", [0.0, 0.5])
def test_annealer_matches_brute_force(contiguity):
    field, meta = synthetic_field(2, 2, 1, 4, seed=7)
    terms = _terms(field, meta, contiguity=contiguity)
    for layer in range(2):
        for lam in (0.2, 1.0, 3.0):
            lam *= float(terms.value.mean())
            sub = build_subproblem(terms, layer, [0, 1], lam)
            assert sub.num_variables <= exact.BRUTE_FORCE_MAX
            _, best = exact.brute_force(sub)
            res = anneal.anneal_subproblem(
                sub, terms, lam, seed=0, num_reads=4, num_sweeps=200, beta_range=None, polish=True
            )
            assert res.energy == pytest.approx(best, rel=1e-9, abs=1e-12)
            milp = exact.milp_optimum(sub)
            assert milp["energy"] == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("contiguity", [0.0, 1.0])
def test_penalties_are_never_worth_violating(contiguity):
    """Every state that breaks a constraint has a canonical repair of strictly lower energy."""
    field, meta = synthetic_field(1, 2, 1, 4, seed=11)
    terms = _terms(field, meta, contiguity=contiguity, kv_cost=0.5)
    nb = terms.value.shape[-1]
    sub = build_subproblem(terms, 0, [0, 1], float(terms.value.mean()))
    states = exact.all_states(sub.num_variables)
    energies = sub.energy(states)
    for state, energy in zip(states, energies, strict=True):
        if violations(sub, nb, state, terms.kv_groups):
            fixed = canonical(sub, nb, state, terms.kv_groups)
            assert sub.energy(fixed[None])[0] < energy


@pytest.mark.parametrize("row_coupling", [0.0, 1.0])
def test_energy_is_objective_plus_prices(row_coupling):
    field, meta = synthetic_field(1, 4, 2, 5, seed=5)
    terms = _terms(field, meta, contiguity=0.3, coupling=coupling_of(field, "mass", row_coupling))
    assert (terms.coupling is not None) == bool(row_coupling)
    nb = terms.value.shape[-1]
    lam, mu = 0.7 * float(terms.value.mean()), 0.01
    sub = build_subproblem(terms, 0, [0, 1, 2, 3], lam, mu)
    rng = np.random.default_rng(0)
    for _ in range(20):
        state = canonical(sub, nb, rng.integers(0, 2, sub.num_variables), terms.kv_groups)
        x, _, z = split_state(sub, nb, state)
        count = computed_blocks(terms.nqb, x[None], z[None])
        expected = objective(terms, x[None], z[None])[0] + lam * count + mu * x.sum()
        assert sub.energy(state[None])[0] == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_head_drop_is_exact(small_field):
    field, meta = small_field
    res = solve_field(
        field, meta, SolveConfig(density=0.25, head_drop=0.25, exact_layers=0, baselines=[])
    )
    assert int(res.head_keep.sum()) == 32 - 8
    assert res.report["blocks_computed"] == round(0.25 * 32 * 36)


def test_baselines_match_the_head_budget(small_field):
    field, meta = small_field
    res = solve_field(field, meta, SolveConfig(density=0.3, head_drop=0.25, exact_layers=0))
    importance = field["importance"].numpy()
    for name, (hk, bm) in res.baselines.items():
        assert int(hk.sum()) == int(res.head_keep.sum()), name
        assert int(bm.sum()) == res.report["blocks_computed"], name
        assert not bm[~hk].any(), name
        # the heads kept are the most important ones
        assert importance[hk.numpy()].min() >= importance[~hk.numpy()].max(), name


@pytest.mark.parametrize("density", [0.0, -0.1, 1.01])
def test_density_out_of_range_is_a_user_error(density):
    with pytest.raises(UserError, match="density"):
        SolveConfig(density=density)


def test_density_at_diagonal_minimum_is_a_user_error(small_field):
    field, meta = small_field
    with pytest.raises(UserError, match="diagonal-only minimum"):
        solve_field(field, meta, SolveConfig(density=2 / 9))  # NQB = 8: 8 of 36 blocks per head
    with pytest.raises(UserError, match="diagonal-only minimum"):
        solve_field(field, meta, SolveConfig(density=0.1))


def test_field_from_other_model_is_a_user_error(small_field, tmp_path: Path):
    field, meta = small_field
    check_field_matches_model(meta, 4, 8, 2)
    with pytest.raises(UserError, match="this model has"):
        check_field_matches_model(meta, 36, 16, 2)
    path = tmp_path / "field.safetensors"
    save_file({k: v.contiguous() for k, v in field.items()}, str(path), metadata=meta)
    tensors, got = read_field(path)
    assert got == meta and set(tensors) == set(field)
    broken = dict(field)
    broken["importance"] = torch.zeros(4, 7)
    save_file({k: v.contiguous() for k, v in broken.items()}, str(path), metadata=meta)
    with pytest.raises(UserError, match="importance has shape"):
        read_field(path)
    del broken["importance"]
    save_file({k: v.contiguous() for k, v in broken.items()}, str(path), metadata=meta)
    with pytest.raises(UserError, match="missing tensor"):
        read_field(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read field"):
        read_field(path)
    with pytest.raises(UserError, match="not found"):
        read_field(tmp_path / "nope.safetensors")


def test_config_round_trips_through_json():
    cfg = SolveConfig(density=0.4, head_drop=0.1, beta_range=[0.1, 10.0], baselines=["greedy"])
    assert SolveConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg


def test_mass_weight_is_relative_to_the_median_head():
    mass = np.array([[0.5, 1.0, 2.0], [4.0, 6.0, 8.0]])
    w = mass_weight(mass, eps=0.1, mass_scale=1.0)
    assert w[0, 2] < 0.5 < w[1, 0]  # the median bound lies between M = 2 and M = 4
    assert np.all(np.diff(w.ravel()[np.argsort(mass.ravel())]) > 0)  # heavier head, larger weight
    np.testing.assert_allclose(
        mass_weight(mass * 7.0, 0.1, 1.0), w
    )  # the masses' overall size cancels
    odd = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(mass_weight(odd, 0.1, 1.0)[1], 0.5)  # w = ½ at the median head
    assert np.all(mass_weight(mass, 0.1, 0.0) == 1.0)  # switched off


def _off_diagonal_values(field: dict[str, torch.Tensor]) -> np.ndarray:
    nqb = field["block_field"].shape[-1]
    qb, kb = offdiag_blocks(nqb)
    return -field["block_grad"].double().numpy()[..., qb, kb]  # (L, H, NB) nats, either sign


def test_grad_block_values_drop_the_blocks_the_model_is_better_without(small_field):
    """block_value=grad: values in nats of either sign. When fewer blocks are wanted than are worth
    keeping, no block with a negative value (dropping it lowers the loss) is kept."""
    field, meta = small_field
    value = _off_diagonal_values(field)
    assert (value < 0).any() and (value > 0).any()
    cfg = SolveConfig(density=0.3, seed=1, exact_layers=1, block_value="grad")
    result = solve_field(field, meta, cfg)
    rep = result.report
    assert rep["constraint_violations"] == 0
    assert rep["blocks_computed"] == rep["blocks_target"]
    qb, kb = offdiag_blocks(field["block_field"].shape[-1])
    kept = result.block_mask.numpy()[..., qb, kb] & result.head_keep.numpy()[..., None]
    positive = int((value > 0).sum())
    assert kept.sum() < positive  # the budget is below the blocks worth keeping
    assert (value[kept] > 0).all()
    # the annealer is exact on the checked layer here too
    assert rep["max_gap"] is not None and rep["max_gap"] <= 5e-5


def test_grad_block_values_meet_a_budget_above_the_blocks_worth_keeping(small_field):
    """A budget that must keep blocks of negative value needs a negative block price: still exact."""
    field, meta = small_field
    cfg = SolveConfig(density=0.9, seed=1, exact_layers=0, block_value="grad")
    rep = solve_field(field, meta, cfg).report
    assert rep["blocks_computed"] == rep["blocks_target"]
    assert rep["constraint_violations"] == 0 and rep["lambda"] < 0


def test_grad_block_values_need_a_measured_block_grad(small_field):
    field, meta = small_field
    without = {k: v for k, v in field.items() if k != "block_grad"}
    with pytest.raises(
        UserError, match="no block_grad: re-run measure with measure.block_grad=true"
    ):
        solve_field(without, meta, SolveConfig(density=0.3, block_value="grad"))
    bad = {**field, "block_grad": field["block_grad"][..., :-1]}
    with pytest.raises(UserError, match="block_grad has shape"):
        solve_field(bad, meta, SolveConfig(density=0.3, block_value="grad"))
