"""`gravity-sparse eval recall`: contexts alike but for their segments, cached candidate scoring equal to
the whole sequence run, the scoring rule (chance exactly where nothing is seen, ties shared), and the
results folder."""

from __future__ import annotations

import json

import pytest
import torch

from gravity_sparse import load_model
from gravity_sparse.errors import UserError
from gravity_sparse.experiments.passkey import recall
from gravity_sparse.experiments.passkey.config import PasskeyConfig
from gravity_sparse.experiments.passkey.recall import (
    build_group,
    candidate_losses,
    evaluate_recall,
    score_group,
)
from gravity_sparse.experiments.passkey.run import run_passkey
from gravity_sparse.model.masks import attach_masks, dense_masks, detach_masks, write_masks


@pytest.fixture(scope="module")
def tiny():
    return load_model(None)


POOL = torch.arange(100, 200)  # tokens the segments are drawn from (bytes 'd'..)


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub]


def test_contexts_differ_only_in_their_segments_at_the_depths(tiny):
    _, tok = tiny
    gen = torch.Generator().manual_seed(0)
    depths = [0.8, 0.1, 0.5]
    contexts, segments = build_group(tok, POOL, 300, depths, 10, 3, gen)
    assert contexts.shape == (3, 290) and segments.shape == (3, 3, 10)
    room = 300 - 4 * 10
    for c in range(3):
        for i, d in enumerate(depths):
            ahead = sum(10 for j in range(3) if round(depths[j] * room) < round(d * room))
            at = round(d * room) + ahead  # filler before it, plus the segments placed before it
            assert contexts[c, at : at + 10].tolist() == segments[c, i].tolist()
    differ = (contexts != contexts[0]).any(0)
    assert differ.sum() <= 3 * 10  # the filler is shared; only segment positions differ
    with pytest.raises(UserError, match="no room"):
        build_group(tok, POOL, 40, depths, 10, 3, gen)


@pytest.mark.parametrize("sparse", [False, True])
def test_cached_candidate_losses_equal_the_whole_sequence(tiny, sparse):
    model, tok = tiny
    L, H = len(model.gravity_layers()), model.config.num_attention_heads
    if sparse:
        masks = dense_masks(L, H, 32, 512)
        masks.head_keep[:, ::3] = False
        masks.block_mask &= torch.ones(16, 16).tril().bool() & ~torch.ones(16, 16).tril(-3).bool()
        attach_masks(model, masks)
    try:
        gen = torch.Generator().manual_seed(1)
        contexts, segments = build_group(tok, POOL, 320, [0.2, 0.7], 12, 2, gen)
        cands = segments.reshape(-1, 12)
        got = candidate_losses(model, contexts[1], cands)
        with torch.no_grad():
            for k, cand in enumerate(cands):  # every candidate after the first: the crop is exact
                x = torch.cat([contexts[1], cand])[None]
                logits = model(input_ids=x).logits[0, -12:-1]
                want = torch.nn.functional.cross_entropy(logits, cand[1:])
                assert float(got[k]) == pytest.approx(float(want), abs=2e-4)
    finally:
        if sparse:
            detach_masks(model)


def test_score_group_rule():
    # 2 contexts × 2 depths: candidates 0, 1 belong to context 0, candidates 2, 3 to context 1
    losses = torch.tensor([[1.0, 2.0, 3.0, 5.0], [2.0, 2.0, 1.0, 6.0]])
    credit, gain = score_group(losses, 2)
    assert credit.tolist() == [1.0, 0.5, 1.0, 0.0]  # right, tied, right, wrong
    assert gain.tolist() == [1.0, 0.0, 2.0, -1.0]
    credit, gain = score_group(torch.full((4, 8), 3.0), 4)  # nothing seen: exactly chance
    assert credit.tolist() == [0.25] * 8 and gain.abs().max() == 0


def _oracle(sign: float):
    """candidate_losses of a model that sees (sign 1) or shuns (−1) the segments in the first half of
    its context, and is blind to the second half."""

    def losses(model, context, candidates):
        half = context[: len(context) // 2].tolist()
        seen = [bool(_find(half, c.tolist())) for c in candidates]
        return torch.tensor([2.0 - sign * s for s in seen])

    return losses


@pytest.mark.parametrize(("sign", "near_start"), [(1.0, 1.0), (-1.0, 0.0)])
def test_evaluate_recall_scores_each_segment_against_its_own_context(
    tiny, monkeypatch, sign, near_start
):
    _, tok = tiny
    monkeypatch.setattr(recall, "candidate_losses", _oracle(sign))
    rows = evaluate_recall(None, tok, [200, 300], [0.1, 0.9], 6, 0, choices=3, segment=8, pool=POOL)
    cells = [(r["length"], r["depth"]) for r in rows]
    assert cells == [(200, 0.1), (200, 0.9), (300, 0.1), (300, 0.9)]
    for r in rows:
        assert r["trials"] == 6 and r["chance"] == pytest.approx(1 / 3)
        if r["depth"] == 0.1:  # seen (or shunned) by its own context alone
            assert r["accuracy"] == near_start and r["gain"] == pytest.approx(sign)
        else:  # unseen by every context: exactly chance, no gain
            assert r["accuracy"] == pytest.approx(1 / 3) and r["gain"] == 0.0


def test_eval_recall_writes_results_and_full_masks_equal_dense(tiny, tmp_path):
    model, _ = tiny
    L, H = len(model.gravity_layers()), model.config.num_attention_heads
    (tmp_path / "full").mkdir()
    path = write_masks(dense_masks(L, H, 64, 512), tmp_path / "full" / "masks.safetensors")
    cfg = PasskeyConfig(
        task="recall", masks=[str(path)], lengths=[256], depths=[0.2, 0.8], trials=3,
        choices=2, segment=8, out=str(tmp_path / "rc"),
    )  # fmt: skip
    out, summary = run_passkey(cfg, progress=False)
    data = json.loads((out / "recall.json").read_text())
    dense, full = (e["rows"] for e in data["results"])
    assert [r["trials"] for r in dense] == [4, 4]  # rounded up to whole groups of 2
    for a, b in zip(dense, full, strict=True):
        assert a["accuracy"] == b["accuracy"] and a["gain"] == pytest.approx(b["gain"], abs=1e-4)
    assert (out / "recall.png").stat().st_size > 1000
    md = (out / "recall.md").read_text()
    assert "Recall accuracy" in md and "mean gain" in md


def test_eval_recall_command_and_bad_input(tmp_path, capsys):
    from gravity_sparse.cli import main

    args = ["eval", "recall", "lengths=[200]", "depths=[0.5]", "trials=2", "segment=8"]
    assert main([*args, f"out={tmp_path / 'r'}"]) == 0
    assert capsys.readouterr().out.startswith("recall ")
    assert (tmp_path / "r" / "recall.json").is_file()
    assert main([*args, "choices=1", f"out={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert "choices" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match="eval task"):
        PasskeyConfig(task="copy")
    with pytest.raises(UserError, match="recall length 128 leaves no room"):
        PasskeyConfig(task="recall", lengths=[128, 512], depths=[0.1, 0.5, 0.9])
