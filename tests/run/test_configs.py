"""Every config class round-trips (dict, JSON and YAML) with a non-default value in every key."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from gravity_sparse.errors import UserError
from gravity_sparse.experiments.passkey.config import PasskeyConfig
from gravity_sparse.experiments.pretrain.config import PretrainConfig
from gravity_sparse.experiments.sweep.config import SweepConfig
from gravity_sparse.run.config import build_config, config_to_dict, load_config
from gravity_sparse.run.pipeline import ModelConfig, PipelineConfig
from gravity_sparse.stages.s1_measure.config import MeasureConfig
from gravity_sparse.stages.s2_solve.config import SolveConfig
from gravity_sparse.stages.s3_apply.config import ApplyConfig
from gravity_sparse.stages.s4_heal.config import HealConfig
from gravity_sparse.stages.s5_export.config import ExportConfig
from gravity_sparse.stages.s6_bench.config import BenchConfig

NON_DEFAULT = {
    ModelConfig: dict(path="some/model", dtype="bfloat16", device="cpu"),
    MeasureConfig: dict(
        seq_len=256, block_size=32, num_sequences=5, batch_size=3, importance="grad",
        ablation_sequences=2, ablation_group=2, block_grad=True, chunk_elements=1000, plots=False,
        progress=False,
    ),
    SolveConfig: dict(
        density=0.4, head_drop=0.1, seed=3, num_reads=2, num_sweeps=50, beta_range=[0.1, 10.0],
        polish=False, threads=1, bisection_rounds=3, baselines=["greedy"], sink_blocks=2,
        exact_layers=0, milp_time_limit=5.0, brute_force_max=10, block_value="kl",
        block_scale="importance", importance_source="grad", eps=0.2, mass_scale=2.0,
        redundancy_weight=0.1, kv_cost=0.5, contiguity=0.2, penalty_margin=2.0,
        max_block_variables=1000, row_coupling=0.5, structure="window",
        structure_cost="mass", structure_sink="choose", structure_rows="field",
    ),
    ApplyConfig: dict(
        eval_text="calibration", seq_len=128, batch_size=2, max_tokens=100, baselines=False,
        kernel="reference",
    ),
    HealConfig: dict(
        text="train", eval_text="calibration", token_budget=50_000, seq_len=128, batch_size=4,
        lr=1e-3, warmup_fraction=0.1, lora_r=8, lora_alpha=16, lora_dropout=0.1, distill=0.25,
        train_masses=False, val_fraction=0.2, eval_every=5, patience=2, eval_max_tokens=512,
        eval_batch_size=2, kernel="cpu", dense_reference=True,
    ),
    ExportConfig: dict(
        dir="out/x", parity_len=64, parity_batch=1, parity_tolerance=1e-3, check_plain=False
    ),
    BenchConfig: dict(
        prefill_lengths=[64], batch_size=2, decode_context=[16, 32], decode_tokens=4, repeats=1,
        warmup=0, kernel="reference", extend="diagonal", synthetic="smol", synthetic_layers=2,
        variants=["export"],
    ),
    SweepConfig: dict(
        densities=[0.3], head_drops=[0.5], methods=["qubo", "uniform"], heal=False,
        heal_token_budget=1000, eval_max_tokens=100, recall_trials=8, recall_lengths=[128, 256],
        recall_depths=[0.5], recall_choices=3, recall_segment=16,
    ),
    PasskeyConfig: dict(
        task="recall", model="some/model", masks=["m.safetensors"], dense=False, lengths=[128],
        depths=[0.3], trials=7, seed=2, choices=3, segment=16, out="runs/r",
    ),
    PretrainConfig: dict(
        num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1, intermediate_size=96,
        seq_len=64, rope_theta=500.0, gravity_eps=0.2, mass_init=1.0, batch_size=2, steps=10,
        lr=1e-3, min_lr_ratio=0.2, warmup_steps=2, mass_lr=1e-3, weight_decay=0.0, beta2=0.95,
        grad_clip=0.5, seed=4, eval_interval=5, eval_tokens=100, eval_batch_size=2,
        log_interval=2, checkpoint_interval=5, time_budget_minutes=1.0, num_threads=2,
        sample_prompt="A ", sample_tokens=10, out_dir="runs/x",
    ),
}  # fmt: skip


def _non_default(cls):
    values = NON_DEFAULT[cls]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert f.name in values, f"{cls.__name__}.{f.name} has no non-default test value"
        assert values[f.name] != default, f"{cls.__name__}.{f.name}: the test value is the default"
    return build_config(cls, values)


@pytest.mark.parametrize("cls", list(NON_DEFAULT), ids=lambda c: c.__name__)
def test_config_round_trips_with_non_default_values(cls, tmp_path):
    cfg = _non_default(cls)
    assert build_config(cls, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(cls, path) == cfg


def test_pipeline_config_round_trips_with_every_section_non_default(tmp_path):
    sections = {
        "model": ModelConfig, "measure": MeasureConfig, "solve": SolveConfig,
        "apply": ApplyConfig, "heal": HealConfig, "export": ExportConfig, "bench": BenchConfig,
        "sweep": SweepConfig,
    }  # fmt: skip
    data = {name: NON_DEFAULT[cls] for name, cls in sections.items()}
    data["measure"] = {**data["measure"], "seq_len": 512}  # apply/heal windows must fit the masks
    data.update(run_dir="runs/y", seed=9, calibration_text="heal", masks="greedy")
    cfg = build_config(PipelineConfig, data)
    assert set(sections) | {"run_dir", "seed", "calibration_text", "masks"} == {
        f.name for f in dataclasses.fields(PipelineConfig)
    }
    assert build_config(PipelineConfig, json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_a_float_written_without_a_dot_is_a_number():
    # YAML 1.1 (PyYAML) reads `lr: 1e-3` and the CLI's `lr=1e-3` as the string "1e-3"
    cfg = build_config(HealConfig, yaml.safe_load("lr: 1e-3"))
    assert cfg.lr == 0.001
    with pytest.raises(UserError, match="lr must be a number, got 'fast'"):
        build_config(HealConfig, {"lr": "fast"})


@pytest.mark.parametrize("name", ["tiny", "smol", "gravity2-h100"])
def test_every_shipped_pipeline_resolves(name):
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(PipelineConfig, root / "pipelines" / f"{name}.yaml")
    assert cfg.measure.seq_len % cfg.measure.block_size == 0
    assert cfg.heal.seq_len <= cfg.measure.seq_len and cfg.apply.seq_len <= cfg.measure.seq_len
    if (
        cfg.measure.importance == "grad"
    ):  # solve must not ask for an importance measure did not make
        assert cfg.solve.importance_source == "grad"
    if name == "smol":  # the shape: ≥ 2,048 tokens in blocks of 64, and a five-method sweep
        assert cfg.measure.seq_len >= 2048 and cfg.measure.block_size == 64
        assert set(cfg.sweep.methods) == {"qubo", "window", "greedy", "random", "uniform"}
        assert sorted(cfg.sweep.densities) == [0.15, 0.25, 0.35, 0.5]
