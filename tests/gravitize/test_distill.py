"""The end-to-end distillation resumes: a run killed after a checkpoint and rerun ends with the same
weights as an uninterrupted run, and a half-written checkpoint is never resumed from."""

import copy

import pytest
import torch
from test_gravitize import tiny_llama

from gravity_sparse.errors import UserError
from gravity_sparse.gravitize import distill as distill_mod
from gravity_sparse.gravitize.convert import gravity_from_pretrained
from gravity_sparse.gravitize.distill import (
    EXTRAS,
    distill_model,
    latest_checkpoint,
    teacher_text,
)
from gravity_sparse.model.data import BlockDataset, resolve_text
from gravity_sparse.model.tokenizer import build_tokenizer


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    teacher = tiny_llama(tmp_path_factory.mktemp("llama"))
    student = gravity_from_pretrained(teacher, eps=0.1, mass_init=0.5)
    text = resolve_text("train")[:2048].encode()  # real text: the next-token loss can improve
    ids = torch.tensor(list(text))
    return teacher, student, ids


def _distil(teacher, student, ids, scratch):
    return distill_model(
        copy.deepcopy(student),
        teacher,
        ids[:1536],
        ids[1536:],
        seq_len=32,
        steps=10,
        batch_size=2,
        lr=3e-2,
        lora_r=4,
        distill=0.5,
        scratch=scratch,
    )


def test_interrupted_distillation_resumes_to_the_same_weights(start, tmp_path, monkeypatch):
    teacher, student, ids = start
    whole, whole_rec = _distil(teacher, student, ids, tmp_path / "whole")
    assert whole_rec["resumed_from_step"] == 0 and whole_rec["steps"] == 10

    saved = distill_mod.SaveExtras.on_save

    def die_after_step_6(self, args, state, control, **kw):
        out = saved(self, args, state, control, **kw)
        if state.global_step == 6:
            raise Killed
        return out

    monkeypatch.setattr(distill_mod.SaveExtras, "on_save", die_after_step_6)
    with pytest.raises(Killed):
        _distil(teacher, student, ids, tmp_path / "cut")
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-6"

    resumed, rec = _distil(teacher, student, ids, tmp_path / "cut")
    assert rec["resumed_from_step"] == 6 and rec["steps"] == 10
    assert rec["best_val_loss"] == pytest.approx(whole_rec["best_val_loss"], rel=1e-5)
    a, b = whole.state_dict(), resumed.state_dict()
    changed = [n for n in a if not torch.equal(a[n], student.state_dict()[n])]
    assert any("mass" in n for n in changed) and any("mlp" in n for n in changed)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_checkpoint_without_its_extras_is_not_resumed(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        if complete:
            (ckpt / EXTRAS).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert latest_checkpoint(tmp_path / "empty") is None


CHAT = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_teacher_text_is_sampled_conversations(start):
    teacher, _, _ = start
    tok = build_tokenizer()
    tok.chat_template = CHAT
    kw = dict(seed=3, batch_size=4, question_tokens=12, answer_tokens=20, progress=False)
    ids = teacher_text(teacher, tok, 300, **kw)
    assert ids.numel() >= 300 and torch.equal(ids, teacher_text(teacher, tok, 300, **kw))
    assert tok.padding_side == "right"  # restored after the left-padded answer batches
    text = tok.decode(ids)
    # every conversation opens a user turn, and the teacher answers after the generation prompt
    assert text.startswith("<|im_start|>user\n")
    opened, answered = text.count("<|im_start|>user\n"), text.count("<|im_start|>assistant\n")
    assert opened >= 4 and answered == opened
    assert "<|pad|><|im_start|>" not in text  # no left padding leaks into the stream
    # another seed samples other text
    assert not torch.equal(ids[:300], teacher_text(teacher, tok, 300, **(kw | {"seed": 4}))[:300])


def test_repeat_windows_repeat_a_span_inside_every_window():
    ids = torch.arange(10_000)  # every token unique: a repeat can only come from the construction
    seq, count = 64, 40
    stream = distill_mod.repeat_windows(ids, seq, count, seed=5)
    assert stream.numel() == seq * count
    windows = stream.view(count, seq)
    for w in windows.tolist():
        head = w[:8]
        later = [i for i in range(8, seq - 7) if w[i : i + 8] == head]
        assert later, "the opening span does not come back"
        start = later[0]
        span = next(n for n in range(seq - start + 1) if start + n == seq or w[n] != w[start + n])
        assert 8 <= span <= seq // 4  # tokens are unique, so the match ends where the span does
    # the windows are what BlockDataset sees, and the draw is seeded
    assert torch.equal(BlockDataset(stream, seq).blocks[0], windows[0])
    assert torch.equal(stream, distill_mod.repeat_windows(ids, seq, count, seed=5))
    assert not torch.equal(stream, distill_mod.repeat_windows(ids, seq, count, seed=6))
    with pytest.raises(UserError, match="repeats need seq_len"):
        distill_mod.repeat_windows(ids, 16, 1)
