"""The sweep fanned out over two processes (torchrun, gloo): each rank solves, evaluates and heals its
share of the points by itself, rank 0 gathers the rows in point order and writes RUN/sweep/ once."""

import json

import pytest
from launchers import copy_run, leftovers, run, single, small_pipeline, torchrun

from gravity_sparse.cli import main
from gravity_sparse.run.artifacts import read_meta

SWEEP = [
    "sweep.densities=[0.5,0.7]",
    "sweep.head_drops=[0.0]",
    "sweep.methods=[qubo]",
    "sweep.heal_token_budget=256",  # one heal step per pattern
    "sweep.eval_max_tokens=256",
]


@pytest.mark.slow
def test_two_process_sweep_gives_the_single_process_rows(tmp_path):
    pipeline = small_pipeline(tmp_path)
    assert main(["measure", "-c", str(pipeline)]) == 0
    for name in ("one", "two"):
        copy_run(tmp_path / "run", tmp_path / name, ("01_measure",))
    run(single("sweep", "-c", str(pipeline), f"run_dir={tmp_path / 'one'}", *SWEEP))
    two = run(torchrun(2, "sweep", "-c", str(pipeline), f"run_dir={tmp_path / 'two'}", *SWEEP))

    a, b = (json.loads((tmp_path / r / "sweep" / "sweep.json").read_text()) for r in ("one", "two"))
    # in point order, although rank 1 ran the second point
    assert [(r["density_target"], r["method"]) for r in b["rows"]] == [(0.5, "qubo"), (0.7, "qubo")]
    assert b["skipped"] == a["skipped"] == []
    assert b["loss_dense"] == pytest.approx(a["loss_dense"], abs=1e-9)
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert {k: v for k, v in rb.items() if not k.startswith("loss")} == {
            k: v for k, v in ra.items() if not k.startswith("loss")
        }
        assert rb["loss_unhealed"] == pytest.approx(ra["loss_unhealed"], abs=1e-9)
        assert rb["loss_healed"] == pytest.approx(ra["loss_healed"], abs=1e-6)
        assert rb["heal_steps"] == 1
    assert read_meta(tmp_path / "two" / "sweep")["world_size"] == 2
    assert leftovers(tmp_path / "two") == []
    # every rank printed the rows of its own points; one summary line, from rank 0
    lines = two.stdout.splitlines()
    assert sum(line.startswith("sweep density") for line in lines) == 2
    assert sum(line.startswith("sweep    ") for line in lines) == 1
