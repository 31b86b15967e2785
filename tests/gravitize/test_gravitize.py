"""gravitize a tiny random Llama built in the test: the transfer lowers every layer's attention-output error,
the output loads through load_model and plain transformers, and cached and uncached generate agree."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gravity_sparse import load_model
from gravity_sparse.errors import UserError
from gravity_sparse.gravitize import GravitizeConfig
from gravity_sparse.gravitize.run import run_gravitize
from gravity_sparse.model.tokenizer import build_tokenizer


def tiny_llama(path, **overrides):
    """A random Llama (GQA 2:1, tied embeddings) with a byte tokenizer, saved as a HF directory."""
    torch.manual_seed(0)
    kw = dict(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=258,
    )
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # sharper than the default init, so attention is far from uniform
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def gravitized(tmp_path_factory):
    root = tmp_path_factory.mktemp("grav")
    tiny_llama(root / "llama")
    cfg = GravitizeConfig(
        source=str(root / "llama"),
        out=str(root / "gravity"),
        seq_len=64,
        num_sequences=6,
        heldback_sequences=2,
        steps=60,
        lr=1e-2,
        eval_max_tokens=1024,
        distill_steps=6,
        distill_seq_len=32,
        distill_teacher_tokens=2048,
        distill_lr=5e-3,
        distill_weight=1.0,
    )
    return root, run_gravitize(cfg, progress=False)


def test_transfer_lowers_every_layers_error(gravitized):
    _, out = gravitized
    record = json.loads((out / "gravitize.json").read_text())
    assert set(record["layers"]) == {"0", "1"}
    for layer in record["layers"].values():
        assert layer["rel_mse_after"] < 0.95 * layer["rel_mse_before"]
        assert layer["mass_min"] > 0
    assert json.loads((out / "meta.json").read_text())["status"] == "complete"
    # the end-to-end distillation ran, and its validation (next-token loss) history is recorded
    assert record["distill"]["steps"] == 6
    evals = [h["eval_loss"] for h in record["distill"]["log_history"] if "eval_loss" in h]
    assert len(evals) >= 2 and all(math.isfinite(e) for e in evals)
    # losses of the original and the gravity model on the same tokens of both held-out texts
    assert set(record["losses"]) == {"heldout", "docstrings"}
    for row in record["losses"].values():
        assert row["tokens"] >= 512
        for key in ("source", "after_transfer", "after_distill", "gap_pct"):
            assert math.isfinite(row[key])
    # greedy samples of both models for the same prompts
    assert len(record["samples"]) == 3
    assert all(
        isinstance(s["source"], str) and isinstance(s["gravity"], str) for s in record["samples"]
    )
    assert not out.with_name(out.name + ".partial").exists()


def test_output_loads_and_generates_the_same_with_and_without_cache(gravitized):
    _, out = gravitized
    model, tok = load_model(out)
    assert model.config.model_type == "gravity" and tok is not None
    x = torch.tensor([list(b"The assert statement")])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=258)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **kw)
        uncached = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.slow
def test_output_loads_in_plain_transformers(gravitized, tmp_path):
    _, out = gravitized
    model, _ = load_model(out)
    x = torch.tensor([list(b"The assert statement")])
    with torch.no_grad():
        ref = model(x).logits
    code = textwrap.dedent(f"""
        import sys
        sys.modules["gravity_sparse"] = None
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            print(m(torch.tensor({x.tolist()})).logits.flatten()[:50].tolist())
    """)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, ref.flatten()[:50], rtol=1e-4, atol=1e-4)


def test_resume_skips_finished_layers(tmp_path):
    tiny_llama(tmp_path / "llama")
    cfg = GravitizeConfig(
        source=str(tmp_path / "llama"),
        out=str(tmp_path / "g"),
        seq_len=32,
        num_sequences=2,
        heldback_sequences=1,
        steps=4,
        eval_max_tokens=256,
    )
    work = tmp_path / "g.partial"
    (work / "layers").mkdir(parents=True)
    # an interrupted run: layer 0 finished with a recognisable mass, layer 1 not started
    from safetensors.torch import save_file

    save_file(
        {"gravity_mass_log": torch.full((4,), 3.0)}, str(work / "layers" / "layer_000.safetensors")
    )
    (work / "layers.json").write_text(json.dumps({"0": {"rel_mse_after": 0.5}}))
    out = run_gravitize(cfg, progress=False)
    model, _ = load_model(out)
    assert torch.allclose(model.gravity_layers()[0].gravity_mass_log, torch.full((4,), 3.0))
    assert not torch.allclose(model.gravity_layers()[1].gravity_mass_log, torch.full((4,), 3.0))


def test_bad_input_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_gravitize(GravitizeConfig(source=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install gguf"):
            run_gravitize(GravitizeConfig(source=str(gguf), out=str(tmp_path / "o")))
    tiny_llama(tmp_path / "notok")
    for f in tmp_path.glob("notok/tokenizer*"):
        f.unlink()
    with pytest.raises(UserError, match="tokenizer"):
        run_gravitize(GravitizeConfig(source=str(tmp_path / "notok"), out=str(tmp_path / "o")))
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=259)).save_pretrained(
        tmp_path / "gpt2"
    )
    build_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="supported architectures are llama, qwen2"):
        run_gravitize(GravitizeConfig(source=str(tmp_path / "gpt2"), out=str(tmp_path / "o")))


def test_cli_gravitize_one_line_error_for_a_missing_source(tmp_path, capsys):
    from gravity_sparse.cli import main

    rc = main(["gravitize", str(tmp_path / "missing"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
