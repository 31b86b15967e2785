"""`gravity-sparse eval passkey`: prompts of the requested length with the key at the requested depth,
one-forward scoring that equals greedy decoding, and a results folder for dense and masked models."""

from __future__ import annotations

import json

import pytest
import torch

from gravity_sparse import load_model
from gravity_sparse.errors import UserError
from gravity_sparse.experiments.passkey.config import PasskeyConfig
from gravity_sparse.experiments.passkey.passkey import (
    INTRO,
    NEEDLE,
    QUESTION,
    build_trial,
    evaluate,
    keys,
    trial_correct,
)
from gravity_sparse.experiments.passkey.run import run_passkey
from gravity_sparse.model.masks import dense_masks, write_masks


@pytest.fixture(scope="module")
def tiny():
    return load_model(None)


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_trial_has_the_length_and_the_key_at_its_depth(tiny, depth):
    _, tok = tiny
    prompt, key_ids = build_trial(tok, 500, depth, "48213")
    assert len(prompt) + len(key_ids) == 500
    assert tok.decode(key_ids) == "48213"
    hits = _find(prompt, key_ids)
    assert len(hits) == 2  # "The pass key is K. Remember it. K is the pass key."
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    needle_start = hits[0] - n("The pass key is ")
    room = len(prompt) - n(INTRO) - n(NEEDLE.format(key="48213")) - n(QUESTION)
    assert room > 200
    assert needle_start - n(INTRO) == round(depth * room)  # filler tokens before the needle


def test_keys_are_five_digits_and_seeded():
    k = keys(3, 20)
    assert k == keys(3, 20) and k != keys(4, 20)
    assert all(len(x) == 5 and x.isdigit() for x in k)


class _Oracle(torch.nn.Module):
    """Predicts the next input token (shift = 1: always right) or the current one (shift = 0: wrong)."""

    def __init__(self, vocab: int, shift: int):
        super().__init__()
        self.vocab, self.shift = vocab, shift

    def forward(self, input_ids, logits_to_keep=0):
        nxt = torch.roll(input_ids, -self.shift, dims=1)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return type("Out", (), {"logits": logits[:, -logits_to_keep:]})()


def test_scoring_positions_are_the_key_positions(tiny):
    _, tok = tiny
    prompt, key_ids = build_trial(tok, 300, 0.5, "10101")
    assert trial_correct(_Oracle(259, 1), prompt, key_ids)
    assert not trial_correct(_Oracle(259, 0), prompt, key_ids)


def test_scoring_equals_greedy_decoding(tiny):
    model, tok = tiny
    for key in ("11111", "40404", "98765", "55555"):
        prompt, key_ids = build_trial(tok, 300, 0.2, key)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=len(key_ids), do_sample=False, pad_token_id=258
            )
        assert trial_correct(model, prompt, key_ids) == (out[0, len(prompt) :].tolist() == key_ids)


def test_eval_passkey_writes_dense_and_masked_results(tiny, tmp_path):
    model, _ = tiny
    L, H = len(model.gravity_layers()), model.config.num_attention_heads
    masks = dense_masks(L, H, 64, 512)
    masks.block_mask &= torch.eye(8, dtype=torch.bool)  # only the diagonal blocks
    masks.method = "diagonal"
    (tmp_path / "m").mkdir()
    path = write_masks(masks, tmp_path / "m" / "masks.safetensors")
    cfg = PasskeyConfig(
        masks=[str(path)], lengths=[300, 400], depths=[0.2, 0.8], trials=2, out=str(tmp_path / "pk")
    )
    out, summary = run_passkey(cfg, progress=False)
    data = json.loads((out / "passkey.json").read_text())
    assert [e["label"] for e in data["results"]] == ["dense", "diagonal (m)"]
    assert data["results"][1]["density"] < 1.0
    for entry in data["results"]:
        assert [(r["length"], r["depth"]) for r in entry["rows"]] == [
            (300, 0.2), (300, 0.8), (400, 0.2), (400, 0.8)
        ]  # fmt: skip
        assert all(0 <= r["correct"] <= r["trials"] == 2 for r in entry["rows"])
    assert (out / "passkey.png").stat().st_size > 1000
    assert "| dense |" in (out / "passkey.md").read_text()
    # the same prompts for both: a model evaluated twice gives the same rows
    again = evaluate(model, tiny[1], [300], [0.2], 2, 0)
    assert again == data["results"][0]["rows"][:1]


def test_bad_passkey_input_is_one_line(tmp_path, capsys):
    from gravity_sparse.cli import main

    rc = main(
        ["eval", "passkey", f"masks=[{tmp_path / 'none.safetensors'}]", f"out={tmp_path / 'o'}"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and "Traceback" not in err
    masks = dense_masks(4, 8, 64, 256)
    path = write_masks(masks, tmp_path / "short.safetensors")
    with pytest.raises(UserError, match="longer than the masks"):
        run_passkey(PasskeyConfig(masks=[str(path)], lengths=[512], out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="nothing to evaluate"):
        PasskeyConfig(dense=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sparse", [False, True])
def test_prefix_cached_scoring_equals_the_whole_prompt(tiny, sparse):
    from gravity_sparse.experiments.passkey.passkey import _trial, key_logits, prefix_cache
    from gravity_sparse.model.masks import attach_masks, detach_masks

    model, tok = tiny
    L, H = len(model.gravity_layers()), model.config.num_attention_heads
    if sparse:  # dropped heads, a sink column and a band: the key must travel through kept blocks
        masks = dense_masks(L, H, 32, 512)
        masks.head_keep[:, ::3] = False
        band = torch.ones(16, 16, dtype=torch.bool).tril() & ~torch.ones(16, 16).tril(-4).bool()
        masks.block_mask &= band | (torch.arange(16) == 0)
        attach_masks(model, masks)
    try:
        for depth in (0.3, 0.9):
            keys_ = ["31415", "27182"]
            prompt, key_ids, n = _trial(tok, 450, depth, keys_[0])
            assert 40 < n < len(prompt) - 20
            prefix = prefix_cache(model, prompt[:n])
            for key in keys_:  # the second trial reuses the same prefix cache
                prompt, key_ids, n2 = _trial(tok, 450, depth, key)
                assert n2 == n
                got = key_logits(model, prompt, key_ids, prefix)
                want = key_logits(model, prompt, key_ids)
                torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
                assert prefix[1].get_seq_length() == n
    finally:
        if sparse:
            detach_masks(model)
