"""gravitize ship=delta: the model shipped as its difference to the base (how checkpoints/gravity-smol is
stored) rebuilds to the full model, and a missing or changed base is a one-line error."""

import json

import pytest
import torch
from safetensors import safe_open
from test_gravitize import tiny_llama

from gravity_sparse import load_model
from gravity_sparse.errors import UserError
from gravity_sparse.gravitize import GravitizeConfig
from gravity_sparse.gravitize.delta import DELTA_FILE, apply_delta, pack_delta, save_delta
from gravity_sparse.gravitize.run import run_gravitize


def _cfg(root, out, ship):
    return GravitizeConfig(
        source=str(root / "llama"),
        out=str(root / out),
        seq_len=32,
        num_sequences=3,
        heldback_sequences=1,
        steps=8,
        eval_max_tokens=256,
        eval_texts="heldout",
        distill_steps=3,
        distill_seq_len=32,
        distill_lr=5e-3,
        distill_lora_r=4,
        ship=ship,
    )


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta")
    tiny_llama(root / "llama")
    full = run_gravitize(_cfg(root, "full", "full"), progress=False)
    delta = run_gravitize(_cfg(root, "delta", "delta"), progress=False)
    return root, full, delta


def test_delta_rebuilds_the_full_model(shipped):
    _, full, delta = shipped
    assert (delta / DELTA_FILE).is_file() and not (delta / "model.safetensors").exists()
    with torch.no_grad():
        weights = dict(load_model(full)[0].named_parameters())
        rebuilt, tok = load_model(delta)
    assert tok is not None
    # the run changed the model (else this comparison would be empty): q/k and the LoRA'd projections
    base = dict(load_model(full)[0].named_parameters())  # same run, so compare against the source
    assert base.keys() == weights.keys()
    for name, w in rebuilt.named_parameters():
        # q/k are stored in fp16, LoRA updates as fp16 factors: differences are fp16 rounding
        torch.testing.assert_close(w, weights[name], rtol=2e-3, atol=2e-3, msg=name)
    record = json.loads((delta / "gravitize.json").read_text())
    assert record["delta"]["max_logit_diff_rebuilt_vs_full"] < 1e-2
    assert record["delta"]["bytes"] < sum(f.stat().st_size for f in full.iterdir())


def test_delta_packs_low_rank_updates_as_factors_and_refuses_full_rank():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(48, 40))
    model = torch.nn.Sequential(torch.nn.Linear(48, 40))
    model.load_state_dict(base.state_dict())
    model.config = type("C", (), {"tie_word_embeddings": False})()
    with torch.no_grad():
        model[0].weight.add_(torch.randn(40, 3) @ torch.randn(3, 48) * 0.1)  # rank 3
    tensors = pack_delta(model, base)
    assert set(tensors) == {"0.weight::u", "0.weight::v"}  # the unchanged bias is not stored
    assert tensors["0.weight::u"].shape[1] <= 8
    with torch.no_grad():
        model[0].weight.add_(torch.randn(40, 48))  # now full rank 40 > what a factor pair saves
    with pytest.raises(UserError, match="rank above"):
        pack_delta(model, base)


def test_delta_round_trip_through_the_file(tmp_path):
    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Linear(64, 48))
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    model.load_state_dict(base.state_dict())
    model.config = type("C", (), {"tie_word_embeddings": False})()
    with torch.no_grad():
        model[0].weight.add_(torch.randn(48, 1) @ torch.randn(1, 64))  # rank 1: stored as factors
        model[0].bias.add_(1.0)  # 1-D: stored whole
    save_delta(tmp_path, pack_delta(model, base))
    assert not torch.allclose(base[0].weight, model[0].weight)
    apply_delta(base, tmp_path)
    torch.testing.assert_close(base[0].bias, model[0].bias)
    torch.testing.assert_close(base[0].weight, model[0].weight, rtol=0, atol=5e-3)


def test_changed_or_missing_base_is_a_one_line_error(shipped, tmp_path):
    root, _, delta = shipped
    config = json.loads((delta / "config.json").read_text())
    # another base than the one packed against
    moved = tmp_path / "changed"
    tiny_llama(moved, initializer_range=0.05)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in delta.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config["gravity_base"]["path"] = str(moved)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not the file it was packed against"):
        load_model(bad)
    # a base package that is not installed: the line says what to install
    config["gravity_base"] = {
        "module": "gravity_sparse_no_such_base",
        "subpath": "m.gguf",
        "file": "m.gguf",
        "pip": "no-such-base==1.0",
        "sha256": "0",
        "bytes": 1,
    }
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UserError, match=r"not installed: run `make smol` \(.*no-such-base==1.0"
    ) as e:
        load_model(bad)
    assert "\n" not in str(e.value)
    # a truncated delta file
    (bad / "config.json").write_text((delta / "config.json").read_text())
    (bad / DELTA_FILE).write_bytes((delta / DELTA_FILE).read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_model(bad)


def test_a_run_continued_from_a_delta_output_ships_only_its_update(shipped):
    root, _, delta = shipped
    cfg = _cfg(root, "stacked", "delta")
    cfg.start_from, cfg.steps = str(delta), 0
    stacked = run_gravitize(cfg, progress=False)
    # the earlier delta file is kept byte for byte; the distillation's update is a second layer
    assert (stacked / DELTA_FILE).read_bytes() == (delta / DELTA_FILE).read_bytes()
    layer = stacked / "gravity_delta.1.safetensors"
    with safe_open(str(layer), "pt") as f:
        keys = list(f.keys())
    whole = [k for k in keys if "::" not in k]
    assert whole and all(k.endswith("gravity_mass_log") for k in whole)
    assert any(k.endswith("q_proj.weight::u") for k in keys)  # q/k updates are low-rank here
    record = json.loads((stacked / "gravitize.json").read_text())
    assert record["start_from"]["path"] == str(delta)
    assert record["layers"] == json.loads((delta / "gravitize.json").read_text())["layers"]
    assert record["delta"]["max_logit_diff_rebuilt_vs_full"] < 1e-2
    # what loads is the continued model, not the start model
    a, b = load_model(delta)[0], load_model(stacked)[0]
    x = torch.tensor([list(b"The assert statement")])
    with torch.no_grad():
        assert (a(x).logits - b(x).logits).abs().max() > 1e-3


def test_start_from_something_else_is_a_one_line_error(shipped, tmp_path):
    root, _, _ = shipped
    cfg = _cfg(root, "x", "delta")
    cfg.out = str(tmp_path / "x")
    cfg.start_from = str(tmp_path / "nope")
    with pytest.raises(UserError, match="not a finished gravitize output"):
        run_gravitize(cfg, progress=False)
