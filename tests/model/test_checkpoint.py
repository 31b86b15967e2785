"""The shipped tiny model: loads both ways, and its held-out slice loss matches its model card."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gravity_sparse import load_model
from gravity_sparse.model.data import eval_loss, split_text
from gravity_sparse.model.tokenizer import PAD_ID

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "gravity-tiny"
CARD = CHECKPOINT / "training" / "card.json"

pytestmark = pytest.mark.skipif(
    not CARD.is_file(), reason="checkpoints/gravity-tiny has not been trained and published yet"
)

PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = tok("The ", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
with torch.no_grad():
    logits = model(ids).logits[0, -1]
print("RESULT " + json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("gravity_sparse")),
                  "generated": out[0].tolist(), "logits": logits.tolist()}))
"""


@pytest.fixture(scope="module")
def card():
    return json.loads(CARD.read_text())


@pytest.fixture(scope="module")
def loaded():
    return load_model(CHECKPOINT)


def test_card_masses_are_the_models_and_differ(card, loaded):
    """The card's masses are measured again from the weights (not just read back from the JSON)."""
    model, _ = loaded
    masses = torch.stack(
        [torch.nn.functional.softplus(a.gravity_mass_log.detach()) for a in model.gravity_layers()]
    )
    torch.testing.assert_close(masses, torch.tensor(card["masses_per_layer"]), rtol=1e-5, atol=1e-6)
    assert masses.std() > 0.01  # learned masses differ across heads and layers
    assert (CHECKPOINT / "README.md").read_text().count(f"{card['heldout_loss_nats_per_byte']:.4f}")


def test_heldout_slice_loss_matches_the_card(card, loaded):
    model, tokenizer = loaded
    sl = card["heldout_slice"]
    ids = tokenizer.encode(split_text("heldout"))
    loss, tokens = eval_loss(model, ids, sl["seq_len"], batch_size=4, max_tokens=sl["tokens"])
    assert tokens == sl["tokens"]
    assert loss == pytest.approx(sl["loss"], rel=0.01)
    assert loss <= 1.6  # the bundled model's quality bar, measured here, not read from the card


def test_plain_transformers_loads_it_with_trust_remote_code(loaded, tmp_path):
    model, tokenizer = loaded
    # run from an empty folder so only the checkpoint's own code can be used
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(CHECKPOINT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["modules"] == []
    ids = tokenizer("The ", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=PAD_ID)
    torch.testing.assert_close(torch.tensor(result["logits"]), logits, rtol=1e-4, atol=1e-4)
    assert result["generated"] == generated[0].tolist()


def test_checkpoint_ships_the_current_modeling_files():
    """trust_remote_code runs the files inside the checkpoint: they must be the package's own."""
    from gravity_sparse.model.io import DEFAULT_MODEL, SOURCE_FILES

    package = Path(__file__).resolve().parents[2] / "gravity_sparse" / "model"
    for name in SOURCE_FILES:
        shipped = (DEFAULT_MODEL / name).read_text()
        assert shipped == (package / name).read_text(), f"{name} differs: re-save the checkpoint"
