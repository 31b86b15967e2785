"""measure in two processes (torchrun, gloo on CPU) gives the single-process field.

Each rank measures whole calibration batches, so every number it adds is the one a single process adds;
only the order of the float64 additions differs. The stored field is float32, so the tolerance is one
float32 rounding step (relative 2⁻²³) — on this machine it comes out bitwise equal.
"""

import json

import pytest
import torch
from launchers import leftovers, run, single, small_pipeline, torchrun
from safetensors import safe_open


def _field(folder):
    with safe_open(str(folder / "field.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("measure2")
    pipeline = small_pipeline(root, measure={"plots": True})
    one = run(single("measure", "-c", str(pipeline), f"run_dir={root / 'one'}"))
    two = run(torchrun(2, "measure", "-c", str(pipeline), f"run_dir={root / 'two'}"))
    return root, one, two


def test_two_process_field_equals_single_process_field(measured):
    root, _, _ = measured
    (a, meta_a), (b, meta_b) = (
        _field(root / "one" / "01_measure"),
        _field(root / "two" / "01_measure"),
    )
    assert meta_a == meta_b and meta_a["num_tokens"] == "512"  # 8 sequences of 64, in 4 batches
    assert set(a) == set(b)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=2**-23, atol=1e-30, equal_nan=True)
        else:
            assert torch.equal(a[key], b[key]), key
    assert a["importance"].abs().max() > 0 and a["importance_grad"].abs().max() > 0
    summary = [
        json.loads((root / r / "01_measure" / "summary.json").read_text()) for r in ("one", "two")
    ]
    assert summary[0]["loss"] == pytest.approx(summary[1]["loss"], rel=1e-12)


def test_the_stage_folder_is_written_once_by_rank_0(measured):
    root, one, two = measured
    folder = root / "two" / "01_measure"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["distributed"]["backend"] == "gloo"
    assert json.loads((root / "one" / "01_measure" / "meta.json").read_text())["world_size"] == 1
    assert sorted(p.name for p in (root / "two").iterdir()) == ["01_measure"]
    assert leftovers(root / "two") == []
    assert any(folder.glob("*.png"))  # rank 0 also drew the plots
    assert [line.split()[0] for line in two.stdout.splitlines()] == ["measure"]  # rank 0 prints
