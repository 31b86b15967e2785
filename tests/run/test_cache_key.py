"""Cache invalidation, proven on the cache key: what each stage hashes, and what the runner redoes."""

import dataclasses
from types import SimpleNamespace

import pytest

from gravity_sparse.errors import UserError
from gravity_sparse.run import runner
from gravity_sparse.run.artifacts import hash_path, read_meta, stage_dirname
from gravity_sparse.run.config import load_config
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import STAGES, common


def _cfg(*overrides):
    return load_config(PipelineConfig, None, list(overrides))


@pytest.mark.parametrize(
    "override,changed",
    [
        ("calibration_text=heal", {"measure"}),
        ("measure.num_sequences=3", {"measure"}),
        ("solve.density=0.2", {"solve"}),
        ("apply.max_tokens=100", {"apply"}),
        ("heal.lr=0.001", {"heal"}),
        ("heal.kernel=reference", {"heal"}),
        ("export.parity_len=64", {"export"}),
        ("bench.repeats=5", {"bench"}),
        ("masks=greedy", {"heal", "export", "bench"}),
        ("seed=1", set(STAGES)),
        ("model.dtype=bfloat16", set(STAGES)),
        ("sweep.heal=false", set()),
    ],
)
def test_a_config_change_changes_the_key_of_exactly_the_stages_that_use_it(override, changed):
    base, other = _cfg(), _cfg(override)
    differs = {s for s in STAGES if common.section(base, s) != common.section(other, s)}
    assert differs == changed


def test_solve_eps_is_hashed_only_when_set():
    assert "eps" not in common.section(_cfg(), "solve")["solve"]
    assert common.section(_cfg("solve.eps=0.1"), "solve")["solve"]["eps"] == 0.1


def test_solve_eps_other_than_the_models_is_a_one_line_error():
    from gravity_sparse.stages.s2_solve.config import resolve_eps

    cfg = _cfg("solve.eps=0.2").solve
    with pytest.raises(UserError, match="differs from the model's gravity_eps 0.1") as err:
        resolve_eps(cfg, 0.1)
    assert "\n" not in str(err.value)
    assert resolve_eps(_cfg().solve, 0.1) == resolve_eps(_cfg("solve.eps=0.1").solve, 0.1) == 0.1


def test_inputs_hash_texts_by_content_and_earlier_stages_by_folder(tmp_path):
    from gravity_sparse.stages.s3_apply import stage as apply_stage

    cfg = _cfg(f"run_dir={tmp_path}")
    found = apply_stage.inputs(cfg)
    assert found["solve"] == tmp_path / stage_dirname("solve")
    assert found["eval"].startswith("sha256:")
    assert (
        apply_stage.inputs(_cfg(f"run_dir={tmp_path}", "apply.eval_text=calibration"))["eval"]
        != found["eval"]
    )


def _fake_stages(calls):
    """Stage modules that each read the previous stage's folder and write what they read."""

    def make(i, stage):
        def inputs(cfg):
            return {} if i == 0 else {"prev": cfg.run_path() / stage_dirname(STAGES[i - 1])}

        def run(cfg, overwrite=False):
            calls.append(stage)
            found = inputs(cfg)
            with common.folder(cfg, stage, found) as sf:  # the output depends on config and inputs
                text = repr(common.section(cfg, stage))
                (sf.path / "out.txt").write_text(
                    text + repr(sorted(map(hash_path, found.values())))
                )
            return sf.final

        return SimpleNamespace(inputs=inputs, run=run)

    return {stage: make(i, stage) for i, stage in enumerate(STAGES)}


def test_runner_skips_current_stages_and_redoes_everything_downstream_of_a_change(
    tmp_path, monkeypatch
):
    calls: list[str] = []
    modules = _fake_stages(calls)
    monkeypatch.setattr(runner, "stage_module", modules.__getitem__)
    cfg = _cfg(f"run_dir={tmp_path}")
    runner.run_pipeline(cfg)
    assert calls == list(STAGES)
    calls.clear()
    lines = []
    runner.run_pipeline(cfg, echo=lines.append)
    assert calls == [] and all("[cached]" in line for line in lines)
    runner.run_pipeline(dataclasses.replace(cfg, solve=_cfg("solve.density=0.2").solve))
    assert calls == list(STAGES[1:])  # measure stays; solve changed, so did every later input
    calls.clear()
    runner.run_pipeline(cfg, ["measure", "solve"], force=True)
    assert calls == ["measure", "solve"]
    assert read_meta(tmp_path / stage_dirname("solve"))["status"] == "ok"
