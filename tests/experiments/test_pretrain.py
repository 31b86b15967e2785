"""Pretraining: the causal training kernel against the reference, the schedule, a micro run, resume."""

import json
from pathlib import Path

import pytest
import torch
from tiny_models import assert_same_output_and_grads, attention_inputs

from gravity_sparse import load_model
from gravity_sparse.errors import UserError
from gravity_sparse.experiments.pretrain.config import PretrainConfig
from gravity_sparse.experiments.pretrain.train import (
    lr_factor,
    make_optimizer,
    model_config,
    run_pretrain,
)
from gravity_sparse.kernels import attach_kernel, detach_kernel
from gravity_sparse.kernels.causal_cpu import cpu_attention
from gravity_sparse.model.data import block_loss, encode_text, random_blocks, split_text
from gravity_sparse.model.modeling_gravity import GravityForCausalLM, gravity_attention_reference
from gravity_sparse.model.tokenizer import build_tokenizer
from gravity_sparse.run import config as run_config

REPO = Path(__file__).resolve().parents[2]


def load_config(path, overrides=None) -> PretrainConfig:
    return run_config.load_config(PretrainConfig, path, overrides)


MICRO = dict(
    num_layers=2,
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    seq_len=32,
    batch_size=4,
    steps=2,
    warmup_steps=0,
    lr=1e-2,
    mass_lr=5e-2,
    eval_interval=1,
    eval_tokens=64,
    eval_batch_size=4,
    log_interval=1,
    checkpoint_interval=1,
    sample_tokens=8,
)


@pytest.mark.parametrize("s,groups", [(37, [0, 0, 1, 1]), (70, [0, 1, 0, 1]), (16, [1, 1, 0, 0])])
def test_causal_kernel_matches_reference_forward_and_backward(s, groups):
    kv_groups = torch.tensor(groups)
    q, k, v, mass_log = attention_inputs(2, 4, 2, s, 8)
    ref, _ = gravity_attention_reference(q, k, v, mass_log, eps=0.1, kv_groups=kv_groups)
    out = cpu_attention(q, k, v, mass_log, kv_groups=kv_groups)
    assert_same_output_and_grads(out, ref, (q, k, v, mass_log))


def test_causal_kernel_gradcheck():
    q, k, v, mass_log = attention_inputs(1, 4, 2, 9, 3, dtype=torch.float64)
    kv_groups = torch.tensor([0, 0, 1, 1])
    assert torch.autograd.gradcheck(
        lambda *x: cpu_attention(*x, kv_groups=kv_groups), (q, k, v, mass_log)
    )


def test_training_kernel_gives_the_reference_loss():
    cfg = PretrainConfig(**MICRO)
    torch.manual_seed(0)
    model = GravityForCausalLM(model_config(cfg))
    batch = random_blocks(
        encode_text(build_tokenizer(), split_text("train")), cfg.seq_len, 2, torch.Generator()
    )
    attach_kernel(model, "reference")
    ref = block_loss(model, batch)
    attach_kernel(model, "cpu")
    fast = block_loss(model, batch)
    detach_kernel(model)  # the model's own path is the same block path
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
    assert block_loss(model, batch).item() == fast.item()


def test_lr_schedule():
    cfg = PretrainConfig(**{**MICRO, "steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1})
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    factors = [lr_factor(t, cfg) for t in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))


def test_masses_have_their_own_group():
    cfg = PretrainConfig(**MICRO)
    model = GravityForCausalLM(model_config(cfg))
    opt = make_optimizer(model, cfg)
    masses = {id(a.gravity_mass_log) for a in model.gravity_layers()}
    mass_groups = [g for g in opt.param_groups if {id(p) for p in g["params"]} == masses]
    assert len(mass_groups) == 1
    assert mass_groups[0]["peak_lr"] == cfg.mass_lr and mass_groups[0]["weight_decay"] == 0.0
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


def test_config_validation():
    with pytest.raises(UserError, match="unknown config key layers"):
        load_config(REPO / "pipelines" / "pretrain-tiny.yaml", ["layers=4"])
    with pytest.raises(UserError, match="do not split"):
        PretrainConfig(num_heads=8, num_kv_heads=3, hidden_size=264)
    with pytest.raises(UserError, match="warmup_steps"):
        PretrainConfig(steps=10, warmup_steps=20)


def test_shipped_pretrain_config_meets_the_issue():
    cfg = load_config(REPO / "pipelines" / "pretrain-tiny.yaml")
    assert cfg.num_layers >= 4
    assert cfg.num_heads >= 8 and cfg.num_heads // cfg.num_kv_heads >= 2
    assert cfg.seq_len >= 512
    assert load_config(REPO / "pipelines" / "pretrain-tiny.yaml", ["steps=700"]).steps == 700


def test_micro_pretraining_lowers_the_loss_and_writes_a_loadable_model(tmp_path):
    cfg = PretrainConfig(**MICRO)
    torch.manual_seed(cfg.seed)
    initial = GravityForCausalLM(model_config(cfg))  # the same init as the run (same seed)
    model_dir = run_pretrain(cfg, tmp_path)

    model, tokenizer = load_model(model_dir)
    assert tokenizer.encode("ab") == [97, 98]
    batches = [
        random_blocks(
            encode_text(tokenizer, split_text("train")),
            cfg.seq_len,
            4,
            torch.Generator().manual_seed(t),
        )
        for t in range(cfg.steps)
    ]
    with torch.no_grad():
        before = sum(block_loss(initial, b).item() for b in batches)
        after = sum(block_loss(model, b).item() for b in batches)
    assert after < before - 0.05, (before, after)
    masses = torch.stack([a.gravity_mass_log.detach() for a in model.gravity_layers()])
    assert not torch.allclose(masses, torch.full_like(masses, cfg.mass_init))  # learned

    rows = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("heldout_loss" in r for r in rows)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["heldout_loss_nats_per_byte"] > 0 and len(result["masses_per_layer"]) == 2
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_resume_continues_exactly(tmp_path):
    cfg = PretrainConfig(**{**MICRO, "steps": 4, "warmup_steps": 1, "sample_tokens": 1})
    straight = run_pretrain(cfg, tmp_path / "straight")
    state = run_pretrain(cfg, tmp_path / "resumed", stop_at=2)
    assert state.name == "state.pt" and not (tmp_path / "resumed" / "model").exists()
    resumed = run_pretrain(cfg, tmp_path / "resumed")
    a, _ = load_model(straight)
    b, _ = load_model(resumed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    lines = (tmp_path / "resumed" / "loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]

    other = PretrainConfig(**{**MICRO, "steps": 4, "warmup_steps": 1, "lr": 5e-3})
    with pytest.raises(UserError, match="different config"):
        run_pretrain(other, tmp_path / "resumed")
