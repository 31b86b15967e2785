"""Loading Gravity-2-layout and our-format checkpoints; saving; bad input gives one-line errors."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from gravity_sparse import load_model, save_model
from gravity_sparse.cli import main
from gravity_sparse.errors import UserError

MASSES = torch.tensor([[0.1, -0.4, 1.3, 2.2], [-1.0, 0.7, 0.0, 3.1]])


@pytest.fixture
def qwen2_dir(tmp_path):
    """A tiny random Qwen2 saved by stock transformers (the Gravity-2 layout minus the masses)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=259,
        max_position_embeddings=256,
    )
    model = Qwen2ForCausalLM(cfg)
    d = tmp_path / "qwen2"
    model.save_pretrained(d)
    return d, model


def _check_masses(model):
    got = torch.stack([a.gravity_mass_log.detach() for a in model.gravity_layers()])
    assert torch.equal(got, MASSES)


def test_gravity2_layout_tensor_masses(qwen2_dir):
    d, qwen = qwen2_dir
    torch.save(MASSES.clone(), d / "gravity_mass_log.pt")
    model, tok = load_model(d)
    _check_masses(model)
    assert tok is None
    assert model.config._attn_implementation == "gravity"
    # the Qwen2 weights are the stock ones
    w = model.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(w, qwen.model.layers[1].self_attn.k_proj.weight)


def test_gravity2_layout_dict_masses_other_prefix(qwen2_dir):
    d, _ = qwen2_dir
    masses = {
        f"base_model.model.model.layers.{i}.self_attn.gravity_mass_log": MASSES[i].clone()
        for i in (1, 0)
    }
    torch.save(masses, d / "gravity_mass_log.pt")
    model, _ = load_model(d)
    _check_masses(model)


def test_gravity2_layout_masses_in_safetensors(qwen2_dir):
    d, _ = qwen2_dir
    weights = load_file(d / "model.safetensors")
    for i in range(2):
        weights[f"model.layers.{i}.self_attn.gravity_mass_log"] = MASSES[i].clone()
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(d)
    _check_masses(model)


def test_missing_masses_is_an_error(qwen2_dir):
    d, _ = qwen2_dir
    with pytest.raises(UserError, match="no gravity masses"):
        load_model(d)


def test_wrong_mass_shape_is_an_error(qwen2_dir):
    d, _ = qwen2_dir
    torch.save(torch.zeros(2, 5), d / "gravity_mass_log.pt")
    with pytest.raises(UserError, match=r"shape \[2, 5\], expected \[2, 4\]"):
        load_model(d)


def test_save_reload_and_plain_transformers_subprocess(tmp_path):
    model = tiny_model(seed=4)
    out = save_model(model, None, tmp_path / "ours")
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        ref = model(x).logits
        again, _ = load_model(out)
        assert torch.equal(again(x).logits, ref)
    torch.save({"x": x, "logits": ref}, tmp_path / "ref.pt")
    # a Python that cannot import gravity_sparse: only torch + transformers + the files in the folder
    code = textwrap.dedent(f"""
        import sys
        sys.modules["gravity_sparse"] = None  # any import of it now fails
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert m.config._attn_implementation == "gravity", m.config._attn_implementation
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            got = m(ref["x"]).logits
        print("MAXDIFF", (got - ref["logits"]).abs().max().item())
        g = m.generate(ref["x"][:, :4], max_new_tokens=5, do_sample=False, pad_token_id=258)
        print("GEN", tuple(g.shape))
    """)
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MAXDIFF 0.0" in proc.stdout, proc.stdout
    assert "GEN (2, 9)" in proc.stdout


def test_save_refuses_existing_dir(tmp_path):
    model = tiny_model()
    save_model(model, None, tmp_path / "m")
    with pytest.raises(UserError, match="already exists"):
        save_model(model, None, tmp_path / "m")
    save_model(model, None, tmp_path / "m", overwrite=True)


def _cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def test_cli_missing_path_one_line(capsys, tmp_path):
    rc, err = _cli(capsys, "info", str(tmp_path / "nope"))
    assert rc == 2 and err.count("\n") == 0 and "does not exist" in err


def test_cli_truncated_safetensors_one_line(capsys, tmp_path):
    out = save_model(tiny_model(), None, tmp_path / "m")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc, err = _cli(capsys, "info", str(out))
    assert rc == 2 and err.count("\n") == 0 and "truncated" in err, err


def test_cli_wrong_mass_shape_one_line(capsys, qwen2_dir):
    d, _ = qwen2_dir
    torch.save(torch.zeros(3, 4), d / "gravity_mass_log.pt")
    rc, err = _cli(capsys, "info", str(d))
    assert rc == 2 and err.count("\n") == 0 and "mass tensor has shape [3, 4]" in err


def test_cli_unknown_config_key_one_line(capsys, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("run_dir: runs/x\n")
    rc, err = _cli(capsys, "validate", "-c", str(cfg), "sovle.density=0.3")
    assert rc == 2 and err.count("\n") == 0 and "unknown config key sovle" in err


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gravity_sparse", "info", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
