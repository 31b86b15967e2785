"""heal.dense_reference: the dense model healed exactly like the sparse one, the fair reference where the
dense model is itself weak at the heal context (gravity-smol beyond 512 tokens)."""

import json

import pytest
from launchers import small_pipeline

from gravity_sparse.cli import main


def _heal(tmp_path, *overrides):
    pipeline = small_pipeline(tmp_path)
    for stage in ("measure", "solve", "heal"):
        assert main([stage, "-c", str(pipeline), "heal.dense_reference=true", *overrides]) == 0
    return json.loads((tmp_path / "run" / "04_heal" / "heal.json").read_text())


def test_masks_that_keep_everything_heal_to_the_dense_reference(tmp_path):
    rec = _heal(tmp_path, "solve.density=1.0", "solve.head_drop=0.0")
    assert rec["density"] == 1.0
    # two paths: the masked model with every block kept, and the model without masks
    assert rec["heldout_after"] == pytest.approx(rec["heldout_dense_healed"], abs=2e-4)
    assert abs(rec["heldout_dense_healed"] - rec["heldout_dense"]) > 1e-3  # healing changed it
    assert rec["gap_to_dense_healed_pct"] == pytest.approx(0.0, abs=0.05)


def test_a_sparse_heal_records_its_gap_to_the_healed_dense_model(tmp_path):
    rec = _heal(tmp_path)
    assert rec["density"] < 0.6
    ref, after = rec["heldout_dense_healed"], rec["heldout_after"]
    assert rec["gap_to_dense_healed_pct"] == pytest.approx(100 * (after - ref) / ref)
    assert abs(ref - rec["heldout_dense"]) > 1e-3 and abs(after - ref) > 1e-4
    meta = json.loads((tmp_path / "run" / "04_heal" / "meta.json").read_text())
    assert meta["summary"]["heldout_dense_healed"] == ref
