"""A BPE-tokenized gravity model built in the test: every stage turns text into ids with the model's own
tokenizer, never as raw bytes. On this model byte ids give other counts and another loss, so a stage that
still fed bytes would fail here."""

import json

import pytest
import torch
import yaml
from tiny_models import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn import functional as F
from transformers import PreTrainedTokenizerFast

from gravity_sparse import save_model
from gravity_sparse.cli import main
from gravity_sparse.model.data import split_text

SEQ = 32


def bpe_tokenizer(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2/Qwen2 style) trained on the calibration split."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([split_text("calibration")], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    tok = bpe_tokenizer()
    model = tiny_model(seed=4, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model_dir = save_model(model, tok, root / "model")
    text = split_text("heldout")[:6000]
    (root / "text.txt").write_text(text)
    cfg = {
        "run_dir": str(root / "run"),
        "model": {"path": str(model_dir), "device": "cpu"},
        "calibration_text": str(root / "text.txt"),
        "measure": {"seq_len": SEQ * 2, "block_size": 16, "num_sequences": 0, "importance": "grad"},
        "solve": {"density": 0.6, "num_sweeps": 100, "exact_layers": 0},
        "apply": {"seq_len": SEQ, "eval_text": str(root / "text.txt"), "baselines": False},
        "heal": {"seq_len": SEQ},
        "bench": {"prefill_lengths": [SEQ], "decode_context": SEQ},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    return root, tok, text


def test_bpe_tokenizer_is_not_bytes(bpe_run):
    _, tok, text = bpe_run
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < 0.7 * len(text.encode())  # merges: far fewer tokens than bytes
    assert tok.decode(ids) == text


def test_measure_and_apply_count_and_score_the_models_own_tokens(bpe_run, capsys):
    root, tok, text = bpe_run
    rc = main(["run", str(root / "pipeline.yaml"), "--stages", "measure,solve,apply"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n_bpe, n_bytes = ids.numel(), len(text.encode())

    # measure: the calibration text is cut into sequences of the tokenizer's tokens
    summary = json.loads((root / "run" / "01_measure" / "summary.json").read_text())
    assert summary["num_tokens"] == (n_bpe // (2 * SEQ)) * 2 * SEQ
    assert summary["num_tokens"] != (n_bytes // (2 * SEQ)) * 2 * SEQ

    # apply: the dense held-out loss equals an independent computation over the tokenizer's ids
    rows = json.loads((root / "run" / "03_apply" / "results.json").read_text())
    dense = next(r for r in rows if r["method"] == "dense")
    model = tiny_model(seed=4, vocab_size=len(tok), pad_token_id=tok.pad_token_id)

    def loss_of(stream: torch.Tensor) -> tuple[float, int]:
        n = (stream.numel() - 1) // SEQ
        windows = stream[torch.arange(n)[:, None] * SEQ + torch.arange(SEQ + 1)]
        with torch.no_grad():
            logits = model(windows[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item(), n * SEQ

    expected, tokens = loss_of(ids)
    assert dense["tokens"] == tokens
    assert dense["loss"] == pytest.approx(expected, rel=1e-5)
    byte_loss, _ = loss_of(torch.tensor(list(text.encode())))
    assert abs(byte_loss - expected) > 0.01  # byte ids would have given another answer


def test_too_short_text_is_counted_in_tokens(bpe_run, capsys, tmp_path):
    root, tok, _ = bpe_run
    short = "The assert statement is used to check a condition. " * 2
    n_bpe = len(tok(short, add_special_tokens=False)["input_ids"])
    assert n_bpe < 2 * SEQ <= len(short.encode())  # long enough in bytes, too short in tokens
    (tmp_path / "short.txt").write_text(short)
    rc = main(
        [
            "measure",
            "-c",
            str(root / "pipeline.yaml"),
            f"run_dir={tmp_path / 'run'}",
            f"calibration_text={tmp_path / 'short.txt'}",
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0
    assert f"{n_bpe} tokens" in err and "Traceback" not in err


def test_model_without_tokenizer_is_a_one_line_error(tmp_path, capsys):
    model_dir = save_model(tiny_model(), None, tmp_path / "notok")
    cfg = {"run_dir": str(tmp_path / "run"), "model": {"path": str(model_dir), "device": "cpu"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["measure", "-c", str(tmp_path / "p.yaml")])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "has no tokenizer" in line and "tokenizer.json" in line
