"""Stage folders and the runner on a rank other than 0 (RANK set, no process group: every collective is a
no-op, so what one rank does alone is visible)."""

import pytest

from gravity_sparse import dist
from gravity_sparse.run import runner
from gravity_sparse.run.artifacts import read_meta, stage_folder
from gravity_sparse.run.pipeline import PipelineConfig


def test_only_rank_0_writes_the_stage_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with stage_folder(tmp_path / "run", "solve", config={"a": 1}) as sf:
        assert not sf.writer and not sf.path.is_relative_to(tmp_path)
        (sf.path / "out.txt").write_text("scratch")  # a stage may write anyway: it is thrown away
        scratch = sf.path
    assert not scratch.exists()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())

    monkeypatch.setenv("RANK", "0")
    with stage_folder(tmp_path / "run", "solve", config={"a": 1}) as sf:
        assert sf.writer and sf.path.parent == tmp_path / "run"
        (sf.path / "out.txt").write_text("result")
    meta = read_meta(tmp_path / "run" / "02_solve")
    assert meta["world_size"] == 1 and meta["distributed"]["backend"] is None


class FakeStage:
    def __init__(self, data_parallel: bool):
        self.DATA_PARALLEL = data_parallel
        self.calls = 0

    def run(self, cfg):
        self.calls += 1
        self.alone = dist.is_alone()
        return cfg.run_path() / "02_solve"


@pytest.mark.parametrize("rank,data_parallel,runs", [(0, False, 1), (1, False, 0), (1, True, 1)])
def test_a_stage_that_is_not_data_parallel_runs_on_rank_0_only(
    tmp_path, monkeypatch, rank, data_parallel, runs
):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    stage = FakeStage(data_parallel)
    monkeypatch.setattr(runner, "stage_module", lambda name: stage)
    folder, _, _ = runner.run_stage(PipelineConfig(run_dir=str(tmp_path)), "solve")
    assert stage.calls == runs and folder == tmp_path / "02_solve"
    if runs:  # rank 0 runs a stage that is not data-parallel as a process by itself
        assert stage.alone == (not data_parallel)


def test_measure_apply_heal_are_data_parallel_and_the_others_are_not():
    parallel = {
        s for s in runner.STAGE_MODULES if getattr(runner.stage_module(s), "DATA_PARALLEL", 0)
    }
    assert parallel == {"measure", "apply", "heal"}
