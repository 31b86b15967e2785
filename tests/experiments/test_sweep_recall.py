"""The sweep's recall (`sweep.recall_trials`): every pattern is scored unhealed and healed, on the masks
it names, the same as `evaluate_recall` on those masks run alone; a length past the masks is refused
before any work."""

import json

import pytest
from launchers import small_pipeline

from gravity_sparse.cli import main
from gravity_sparse.experiments.passkey.recall import evaluate_recall
from gravity_sparse.experiments.sweep.sweep import _patterns
from gravity_sparse.model.data import encode_text, resolve_text
from gravity_sparse.model.io import load_model
from gravity_sparse.model.masks import attach_masks, detach_masks
from gravity_sparse.run.config import load_config
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages.s2_solve.field_io import read_field

SWEEP = [
    "sweep.densities=[0.5]",
    "sweep.head_drops=[0.25]",
    "sweep.methods=[qubo,window]",
    "sweep.heal_token_budget=256",
    "sweep.eval_max_tokens=256",
    "sweep.recall_trials=4",
    "sweep.recall_lengths=[64]",
    "sweep.recall_depths=[0.1,0.9]",
    "sweep.recall_segment=6",
    "sweep.recall_choices=2",
]


def test_sweep_scores_recall_of_every_pattern_on_its_own_masks(tmp_path):
    pipeline = small_pipeline(tmp_path)
    assert main(["measure", "-c", str(pipeline)]) == 0
    assert main(["sweep", "-c", str(pipeline), *SWEEP]) == 0
    folder = tmp_path / "run" / "sweep"
    summary = json.loads((folder / "sweep.json").read_text())
    assert (folder / "recall.png").stat().st_size > 0
    md = (folder / "sweep.md").read_text()
    assert "Recall accuracy" in md and "| 1 | dense |" in md

    cfg = load_config(PipelineConfig, str(pipeline), SWEEP)
    model, tok = load_model(cfg.model.path)
    model.eval()
    pool = encode_text(tok, resolve_text("train"))
    tensors, meta = read_field(tmp_path / "run" / "01_measure" / "field.safetensors")
    patterns = _patterns(cfg, tensors, meta, 0.5, 0.25, float(model.config.gravity_eps))

    def alone(masks):
        if masks is not None:
            attach_masks(model, masks)
        try:
            return evaluate_recall(
                model, tok, [64], [0.1, 0.9], 4, cfg.seed, choices=2, segment=6, pool=pool
            )
        finally:
            if masks is not None:
                detach_masks(model)

    def accuracy_and_gain(rows):
        return [(r["accuracy"], pytest.approx(r["gain"], abs=1e-5)) for r in rows]

    dense = alone(None)
    assert accuracy_and_gain(summary["recall_dense"]) == accuracy_and_gain(dense)
    for row in summary["rows"]:
        own = alone(patterns[row["method"]])
        assert accuracy_and_gain(row["recall_unhealed"]) == accuracy_and_gain(own)
        assert [r["gain"] for r in own] != pytest.approx([r["gain"] for r in dense], abs=1e-4)
        assert len(row["recall_healed"]) == 2
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in row["recall_healed"])


def test_recall_longer_than_the_masks_is_refused_before_any_work(tmp_path, capsys):
    pipeline = small_pipeline(tmp_path)
    assert main(["measure", "-c", str(pipeline)]) == 0
    capsys.readouterr()
    assert main(["sweep", "-c", str(pipeline), *SWEEP, "sweep.recall_lengths=[128]"]) != 0
    err = capsys.readouterr().err
    assert "recall_lengths 128 is longer than the masks (64 tokens)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "sweep.progress").exists()


def test_an_interrupted_recall_sweep_keeps_the_dense_recall_and_resumes(tmp_path, monkeypatch):
    import gravity_sparse.experiments.passkey.recall as recall_module
    import gravity_sparse.stages.s4_heal.heal as heal_module
    from gravity_sparse.experiments.sweep.sweep import _dense_key, _dense_recall, collect_sweep

    pipeline = small_pipeline(tmp_path)
    assert main(["measure", "-c", str(pipeline)]) == 0
    real_heal, real_recall, heals, recalls = (
        heal_module.heal_model,
        recall_module.evaluate_recall,
        [],
        [],
    )

    def heal_then_die(*args, **kwargs):
        heals.append(1)
        if len(heals) == 2:
            raise KeyboardInterrupt  # killed while healing the second pattern
        return real_heal(*args, **kwargs)

    def counted(*args, **kwargs):
        recalls.append(1)
        return real_recall(*args, **kwargs)

    monkeypatch.setattr(heal_module, "heal_model", heal_then_die)
    monkeypatch.setattr(recall_module, "evaluate_recall", counted)
    assert main(["sweep", "-c", str(pipeline), *SWEEP]) == 130
    assert len(recalls) == 4  # dense, the first pattern unhealed and healed, the second unhealed
    cfg = load_config(PipelineConfig, str(pipeline), SWEEP)
    partial = collect_sweep(cfg)
    assert [r["method"] for r in partial["rows"]] == ["qubo"] and "recall_healed" in partial[
        "rows"
    ][0]
    assert len(partial["recall_dense"]) == 2  # the dense recall was logged with the rows
    progress = tmp_path / "run" / "sweep.progress"
    other_solve = load_config(PipelineConfig, str(pipeline), [*SWEEP, "solve.seed=7"])
    assert _dense_recall(progress, _dense_key(other_solve)) == partial["recall_dense"]
    other_recall = load_config(PipelineConfig, str(pipeline), [*SWEEP, "sweep.recall_trials=6"])
    assert _dense_recall(progress, _dense_key(other_recall)) is None

    monkeypatch.setattr(heal_module, "heal_model", real_heal)
    recalls.clear()
    assert main(["sweep", "-c", str(pipeline), *SWEEP]) == 0
    assert len(recalls) == 2  # only the window pattern, unhealed and healed: dense is reused
    final = json.loads((tmp_path / "run" / "sweep" / "sweep.json").read_text())
    assert final["recall_dense"] == partial["recall_dense"]
