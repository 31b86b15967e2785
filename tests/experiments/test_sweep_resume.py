"""A sweep killed part-way resumes from `RUN/sweep.progress`: finished patterns are not healed again, the
rows equal an uninterrupted sweep's, and rows of another config are never reused."""

import json

import pytest
from launchers import copy_run, small_pipeline

import gravity_sparse.stages.s4_heal.heal as heal_module
from gravity_sparse.cli import main
from gravity_sparse.errors import UserError
from gravity_sparse.experiments.sweep.sweep import collect_sweep
from gravity_sparse.run.config import load_config
from gravity_sparse.run.pipeline import PipelineConfig

SWEEP = [
    "sweep.densities=[0.5,0.7]",
    "sweep.head_drops=[0.0]",
    "sweep.methods=[qubo,window]",
    "sweep.heal_token_budget=256",
    "sweep.eval_max_tokens=256",
]


def _rows(run_dir):
    return json.loads((run_dir / "sweep" / "sweep.json").read_text())["rows"]


def test_an_interrupted_sweep_resumes_without_redoing_finished_patterns(
    tmp_path, monkeypatch, capsys
):
    pipeline = small_pipeline(tmp_path)
    assert main(["measure", "-c", str(pipeline)]) == 0
    for name in ("whole", "cut", "other"):
        copy_run(tmp_path / "run", tmp_path / name, ("01_measure",))
    assert main(["sweep", "-c", str(pipeline), f"run_dir={tmp_path / 'whole'}", *SWEEP]) == 0

    real_heal, calls, die_at = heal_module.heal_model, [], [3]

    def heal_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == die_at[0]:
            raise KeyboardInterrupt  # killed while healing the third pattern
        return real_heal(*args, **kwargs)

    monkeypatch.setattr(heal_module, "heal_model", heal_then_die)
    cut = tmp_path / "cut"
    assert main(["sweep", "-c", str(pipeline), f"run_dir={cut}", *SWEEP]) == 130  # interrupted
    assert not (cut / "sweep").exists()
    logged = (cut / "sweep.progress" / "rows-rank0.jsonl").read_text().splitlines()
    assert len(logged) == 2
    partial = collect_sweep(load_config(PipelineConfig, str(pipeline), [f"run_dir={cut}", *SWEEP]))
    whole = _rows(tmp_path / "whole")
    assert [r["method"] for r in partial["rows"]] == [r["method"] for r in whole[:2]]
    assert partial["missing"] == [
        {"head_drop": 0.0, "density_target": 0.7, "method": m} for m in ("qubo", "window")
    ]

    calls.clear()
    die_at[0] = 0
    capsys.readouterr()
    assert main(["sweep", "-c", str(pipeline), f"run_dir={cut}", *SWEEP]) == 0
    assert len(calls) == 2  # only the two patterns that were not finished are healed
    assert capsys.readouterr().out.count("(from sweep.progress)") == 2
    assert not (cut / "sweep.progress").exists()
    finished = collect_sweep(load_config(PipelineConfig, str(pipeline), [f"run_dir={cut}", *SWEEP]))
    assert finished["missing"] == [] and finished["rows"] == _rows(cut)
    assert [(r["density_target"], r["method"]) for r in _rows(cut)] == [
        (r["density_target"], r["method"]) for r in whole
    ]
    for a, b in zip(_rows(cut), whole, strict=True):
        assert a["loss_unhealed"] == pytest.approx(b["loss_unhealed"], abs=1e-9)
        assert a["loss_healed"] == pytest.approx(b["loss_healed"], abs=1e-6)

    # rows logged under another config (heal budget) are not reused
    other = tmp_path / "other"
    (other / "sweep.progress").mkdir()
    (other / "sweep.progress" / "rows-rank0.jsonl").write_text("\n".join(logged) + "\n")
    calls.clear()
    bigger = [*SWEEP[:-2], "sweep.heal_token_budget=512", "sweep.eval_max_tokens=256"]
    with pytest.raises(UserError, match="no finished pattern"):
        collect_sweep(load_config(PipelineConfig, str(pipeline), [f"run_dir={other}", *bigger]))
    assert main(["sweep", "-c", str(pipeline), f"run_dir={other}", *bigger]) == 0
    assert len(calls) == 4
