"""The byte-level tokenizer: ids are bytes, exact round trips, AutoTokenizer loads it with no custom code."""

import random

import pytest
from transformers import AutoTokenizer

from gravity_sparse.model.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    build_tokenizer,
    decode_bytes,
)

TEXTS = [
    "",
    'The assert statement\n*******************\n\n   assert_stmt ::= "assert" expression',
    "  leading and trailing spaces  \t\r\n",
    "naïve café — ünïcödé, 漢字, emoji 🙂🐍, combining e\u0301, zero\u200bwidth",
    "<|bos|> looks like a special token but is plain text",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_decode_bytes_drops_special_tokens():
    assert decode_bytes([BOS_ID, 104, 105, EOS_ID, PAD_ID]) == b"hi"


def test_special_token_ids(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
    assert tokenizer.decode([BOS_ID, 65, EOS_ID], skip_special_tokens=True) == "A"


@pytest.mark.parametrize("text", TEXTS)
def test_utf8_text_ids_are_its_bytes_and_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_random_unicode_round_trip(tokenizer):
    rng = random.Random(0)
    # code points from several planes, surrogates excluded (not encodable as UTF-8)
    pool = [c for c in range(0x20, 0x30000, 97) if not 0xD800 <= c < 0xE000] + [10, 9, 32]
    for _ in range(20):
        text = "".join(chr(rng.choice(pool)) for _ in range(rng.randrange(1, 200)))
        ids = tokenizer.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
        assert decode_bytes([BOS_ID, *ids, EOS_ID]) == text.encode("utf-8")


def test_saved_tokenizer_loads_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)
    batch = loaded(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0] == [97, 98, PAD_ID, PAD_ID] or batch["input_ids"][0] == [
        PAD_ID,
        PAD_ID,
        97,
        98,
    ]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
