"""Corpus splits, user text files, token blocks and the held-out loss."""

import math
import random
from pydoc_data.topics import topics

import pytest
import torch
from torch.nn import functional as F

from gravity_sparse.errors import UserError
from gravity_sparse.model.data import (
    SPLITS,
    BlockDataset,
    assign_topics,
    corpus_splits,
    encode_text,
    eval_loss,
    load_text_files,
    resolve_text,
    split_sizes,
    split_text,
    split_topics,
    to_ids,
    token_blocks,
    unigram_loss,
)


def test_splits_partition_the_topics():
    names = split_topics(topics)
    assert set(names) == set(SPLITS)
    all_names = [t for split in SPLITS for t in names[split]]
    assert sorted(all_names) == sorted(topics)  # every topic exactly once: disjoint and complete
    for split in SPLITS:
        assert names[split], f"{split} has no topic"
        text = split_text(split)
        for t in names[split]:
            assert topics[t] in text
        for other in SPLITS:
            if other != split:
                for t in names[other]:
                    if len(topics[t]) > 200:  # short topics may be substrings of others by chance
                        assert topics[t] not in text


def test_split_sizes_meet_the_targets():
    sizes = split_sizes()
    total = sum(len(text.encode()) for text in topics.values())
    separators = (len(topics) - len(SPLITS)) * 2
    assert sum(sizes.values()) == total + separators
    assert sizes["heldout"] >= 0.05 * total
    assert sizes["calibration"] >= 0.04 * total and sizes["heal"] >= 0.04 * total
    assert sizes["train"] >= 0.75 * total


def test_split_is_deterministic_and_independent_of_dict_order():
    shuffled = list(topics.items())
    random.Random(1).shuffle(shuffled)
    assert assign_topics(dict(shuffled)) == assign_topics(topics)
    assert corpus_splits() == {s: split_text(s) for s in SPLITS}


def test_assignment_rule_on_a_toy_corpus():
    # 10 topics of 100 bytes: held-out (8% = 80 bytes) takes topics of ≤ 40 bytes only -> none here
    toy = {f"t{i}": "x" * 100 for i in range(10)}
    assert set(assign_topics(toy).values()) == {"train"}
    toy.update({f"s{i}": "y" * 10 for i in range(40)})  # total 1400: held-out target 112 bytes
    assignment = assign_topics(toy)
    held = sum(len(toy[t]) for t, s in assignment.items() if s == "heldout")
    assert 112 <= held <= 112 + 10


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match="unknown corpus split"):
        split_text("validation")


def test_load_text_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first file\n")
    b.write_text("second ü\n")
    assert load_text_files([a, b]) == "first file\n\n\nsecond ü\n"
    assert resolve_text(str(a)) == "first file\n"
    assert resolve_text("heldout") == split_text("heldout")


def test_load_text_files_errors(tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "bin.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(UserError, match="not found"):
        load_text_files([tmp_path / "missing.txt"])
    with pytest.raises(UserError, match="empty"):
        load_text_files([empty])
    with pytest.raises(UserError, match="not UTF-8"):
        load_text_files([binary])
    with pytest.raises(UserError, match="no text files"):
        load_text_files([])


def test_token_blocks_cover_every_target_once():
    ids = torch.arange(1000)
    blocks = token_blocks(ids, 64)  # (N, 65)
    assert blocks.shape == (15, 65)
    targets = blocks[:, 1:].flatten()
    assert torch.equal(targets, torch.arange(1, 15 * 64 + 1))
    assert torch.equal(blocks[1:, 0], blocks[:-1, -1])  # consecutive windows share one token
    assert token_blocks(ids, 64, max_blocks=3).shape == (3, 65)
    assert token_blocks(torch.arange(65), 64).shape == (1, 65)
    with pytest.raises(UserError, match="shorter than one sequence"):
        token_blocks(torch.arange(64), 64)


def test_text_never_becomes_ids_without_a_tokenizer():
    # raw UTF-8 bytes as ids are only right for the byte model: text must go through a tokenizer
    with pytest.raises(TypeError, match="encode_text"):
        to_ids("aé")
    with pytest.raises(TypeError, match="encode_text"):
        to_ids(b"\x00\xff")
    with pytest.raises(UserError, match="tokenizer"):
        encode_text(None, "aé")
    assert to_ids([3, 1]).tolist() == [3, 1]


def test_block_dataset_items():
    ds = BlockDataset(torch.arange(200), 32)
    assert len(ds) == 6
    item = ds[1]
    assert item["input_ids"].tolist() == list(range(32, 64))
    assert torch.equal(item["labels"], item["input_ids"])


class _FixedLogits(torch.nn.Module):
    """A causal-LM-shaped 'model' whose next-token logits are a fixed table indexed by the current
    token: the decoder's hidden state is the token's one-hot vector, the lm_head multiplies by the table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.model = self._Decoder(table.shape[0])

    class _Decoder(torch.nn.Module):
        def __init__(self, vocab: int):
            super().__init__()
            self.vocab = vocab

        def forward(self, input_ids, use_cache=False):
            hidden = F.one_hot(input_ids, self.vocab).float()
            return type("Out", (), {"last_hidden_state": hidden})()

    def lm_head(self, hidden):
        return hidden @ self.table

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.lm_head(self.model(input_ids).last_hidden_state)})()


def test_eval_loss_matches_brute_force():
    torch.manual_seed(0)
    table = torch.randn(256, 256)
    model = _FixedLogits(table)
    ids = torch.randint(0, 256, (300,))
    loss, count = eval_loss(model, ids, seq_len=50, batch_size=4)
    assert count == 250  # 5 windows of 50 targets
    logp = table.log_softmax(-1)
    expected = -sum(logp[ids[i], ids[i + 1]] for i in range(250)) / 250
    assert loss == pytest.approx(float(expected), rel=1e-5)
    other_batching = eval_loss(model, ids, 50, 3)
    assert other_batching[1] == count and other_batching[0] == pytest.approx(loss, rel=1e-6)
    assert eval_loss(model, ids, 50, 4, max_tokens=60)[1] == 100


def test_eval_loss_of_uniform_model_is_log_vocab():
    model = _FixedLogits(torch.zeros(256, 256))
    loss, _ = eval_loss(model, torch.arange(200) % 256, seq_len=16, batch_size=2)
    assert loss == pytest.approx(math.log(256))


def test_unigram_loss():
    train = torch.tensor([0, 0, 1])
    # add-one smoothed over 4 symbols: p(0) = 3/7, p(1) = 2/7
    assert unigram_loss(train, torch.tensor([0, 1]), vocab_size=4) == pytest.approx(
        -(math.log(3 / 7) + math.log(2 / 7)) / 2
    )
