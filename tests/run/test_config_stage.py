"""Typed configs (YAML + dotted overrides, round trip) and atomic stage folders with meta.json."""

import json

import pytest

from gravity_sparse.errors import UserError
from gravity_sparse.run.artifacts import is_current, read_meta, require_stage, stage_folder
from gravity_sparse.run.config import apply_overrides, build_config, config_to_dict, load_config
from gravity_sparse.run.pipeline import PipelineConfig


def test_yaml_plus_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("run_dir: runs/a\nmodel:\n  dtype: bfloat16\n")
    cfg = load_config(PipelineConfig, f, ["seed=7", "model.device=cpu"])
    assert cfg.run_dir == "runs/a" and cfg.seed == 7
    assert cfg.model.dtype == "bfloat16" and cfg.model.device == "cpu"


@pytest.mark.parametrize("cls", [PipelineConfig])
def test_round_trip(cls):
    cfg = load_config(cls, None, ["seed=3"])
    again = build_config(cls, json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("sed=1", "unknown config key sed"),
        ("model.dtipe=x", "unknown config key model.dtipe"),
        ("seed=abc", "seed must be an integer"),
        ("model=3", "model must be a mapping"),
        ("seed", "not of the form key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message):
        load_config(PipelineConfig, None, [override])


def test_overrides_do_not_mutate_input():
    data = {"model": {"dtype": "float32"}}
    out = apply_overrides(data, ["model.dtype=bfloat16"])
    assert data["model"]["dtype"] == "float32" and out["model"]["dtype"] == "bfloat16"


def test_stage_folder_atomic_and_meta(tmp_path):
    inp = tmp_path / "input.txt"
    inp.write_text("hello")
    with stage_folder(tmp_path / "run", "solve", config={"a": 1}, inputs={"text": inp}) as sf:
        (sf.path / "out.txt").write_text("x")
        assert not sf.final.exists()  # nothing visible until the stage finishes
        sf.summary["n"] = 1
    folder = tmp_path / "run" / "02_solve"
    meta = read_meta(folder)
    assert meta["status"] == "ok" and meta["config"] == {"a": 1} and meta["summary"] == {"n": 1}
    assert (
        "torch" in meta["versions"]
        and meta["wall_time_s"] >= 0
        and len(meta["input_hashes"]["text"]) == 64
    )
    assert is_current(folder, {"a": 1}, {"text": inp})
    assert not is_current(folder, {"a": 2}, {"text": inp})
    inp.write_text("changed")
    assert not is_current(folder, {"a": 1}, {"text": inp})
    assert require_stage(tmp_path / "run", "solve") == folder


def test_interrupted_stage_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with stage_folder(tmp_path, "measure", config={}) as sf:
            (sf.path / "half.safetensors").write_text("partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="run `gravity-sparse measure` first"):
        require_stage(tmp_path, "measure")


def test_interrupted_rerun_keeps_previous_result(tmp_path):
    with stage_folder(tmp_path, "measure", config={"v": 1}) as sf:
        (sf.path / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with stage_folder(tmp_path, "measure", config={"v": 2}) as sf:
            raise RuntimeError("killed")
    assert (tmp_path / "01_measure" / "f").read_text() == "old"
