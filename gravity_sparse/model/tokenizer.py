"""Byte-level tokenizer of the bundled tiny gravity model: token id = byte value.

Ids 0..255 are the 256 byte values, then three special tokens: 256 `<|bos|>`, 257 `<|eos|>`,
258 `<|pad|>` (vocabulary 259). Built with the `tokenizers` library — a BPE model with no merges over
the 256 ByteLevel symbols (GPT-2's byte-to-unicode table), ByteLevel pre-tokenizer (no regex split, no
prefix space) and decoder — wrapped in `PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(dir)`
loads it with no custom code. Encoding adds no special tokens and never matches special-token strings in
the text (`split_special_tokens`): the ids of a text are exactly its UTF-8 bytes, so a loss in nats per
token is a loss in nats per byte.

`decode_bytes` turns ids back into raw bytes, dropping special tokens (the tokenizer's own `decode`
returns `str` and must replace bytes that are not valid UTF-8, e.g. in the middle of a sampled character).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

NUM_BYTES = 256
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer (ids 0..255 = bytes, 256 BOS, 257 EOS, 258 PAD)."""
    byte_to_symbol = bytes_to_unicode()
    vocab = {byte_to_symbol[b]: b for b in range(NUM_BYTES)}
    vocab.update({BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID, PAD_TOKEN: PAD_ID})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # "<|bos|>" inside a text is seven bytes, not BOS
    )
    return tokenizer


def decode_bytes(ids: Iterable[int]) -> bytes:
    """Bytes of token ids; special tokens (ids ≥ 256) are dropped."""
    return bytes(i for i in (int(t) for t in ids) if 0 <= i < NUM_BYTES)
