"""Text data: the bundled corpus and its splits, user text files, fixed-length token blocks, held-out loss.

Corpus: the English text of `pydoc_data.topics` (ships with CPython; Python 3.11: 79 topics, 466 117 UTF-8
bytes), split BY TOPIC so that no topic's text is in two splits:

    heldout      ≥ 8% of bytes   never used to train, measure, solve or heal
    calibration  ≥ 5%            measure (the locality field)
    heal         ≥ 5%            LoRA healing
    train        the rest        pretraining

Rule (deterministic, depends only on the topics dict): walk the topics in order of sha256(topic name);
a topic no larger than half a split's byte target joins the first of heldout, calibration, heal that is
still below its target (so each split holds several topics and ends within 1.5 × its target); every other
topic goes to train. A split's text is its topics' texts in
that order, joined by a blank line. Sizes on Python 3.11: see `split_sizes()` and the model card of
`checkpoints/gravity-tiny`.

Text becomes token ids only through the model's own tokenizer (`encode_text`), in every stage; lengths and
budgets count that tokenizer's tokens. The bundled tiny model's tokenizer is byte-level (`tokenizer.py`),
so for it nats per token = nats per byte.

Blocks: `token_blocks(ids, seq_len)` cuts a token stream into non-overlapping windows of seq_len + 1
tokens, (N, seq_len + 1), consecutive windows sharing one token so that inputs `[:, :-1]` and targets
`[:, 1:]` (both (N, seq_len)) cover every token after the first exactly once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path

import torch
from torch.nn import functional as F

from gravity_sparse import dist
from gravity_sparse.errors import UserError

SPLITS = ("train", "calibration", "heal", "heldout")
# (split, byte fraction target), filled in this order; whatever is left is train
SPLIT_TARGETS = (("heldout", 0.08), ("calibration", 0.05), ("heal", 0.05))
MAX_TOPIC_FRACTION = 0.5  # of a split's target: small splits get several topics
TOPIC_SEPARATOR = "\n\n"


def _topic_order(topics: dict[str, str]) -> list[str]:
    return sorted(topics, key=lambda name: hashlib.sha256(name.encode()).hexdigest())


def assign_topics(topics: dict[str, str]) -> dict[str, str]:
    """Split name of every topic (the rule in the module docstring)."""
    total = sum(len(text.encode()) for text in topics.values())
    filled = {name: 0 for name, _ in SPLIT_TARGETS}
    assignment = {}
    for topic in _topic_order(topics):
        size = len(topics[topic].encode())
        assignment[topic] = "train"
        for name, fraction in SPLIT_TARGETS:
            target = fraction * total
            if filled[name] < target and size <= MAX_TOPIC_FRACTION * target:
                filled[name] += size
                assignment[topic] = name
                break
    return assignment


def split_topics(topics: dict[str, str]) -> dict[str, list[str]]:
    """Topic names of every split, in the order their texts are joined."""
    assignment = assign_topics(topics)
    return {s: [t for t in _topic_order(topics) if assignment[t] == s] for s in SPLITS}


@cache
def corpus_splits() -> dict[str, str]:
    """Text of each split of the bundled corpus: {"train", "calibration", "heal", "heldout"} → str."""
    from pydoc_data.topics import topics

    return {
        name: TOPIC_SEPARATOR.join(topics[t] for t in names)
        for name, names in split_topics(topics).items()
    }


def split_text(name: str) -> str:
    """Text of one split of the bundled corpus."""
    splits = corpus_splits()
    if name not in splits:
        raise UserError(f"unknown corpus split {name!r}; expected one of {', '.join(SPLITS)}")
    return splits[name]


def split_sizes() -> dict[str, int]:
    """UTF-8 bytes of each split."""
    return {name: len(text.encode()) for name, text in corpus_splits().items()}


def load_text_files(paths: Sequence[str | Path]) -> str:
    """The user's own UTF-8 text files, joined by a blank line."""
    if not paths:
        raise UserError("no text files given")
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"text file not found: {path}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not UTF-8 text (byte {err.start})") from None
        if not text.strip():
            raise UserError(f"text file is empty: {path}")
        texts.append(text)
    return TOPIC_SEPARATOR.join(texts)


# Second held-out text, of another kind than pydoc's reference prose: docstrings of these stdlib modules
# (their own public functions and classes, in name order). No stage trains, measures or heals on it.
DOCSTRING_MODULES = (
    "argparse", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
    "difflib", "email.message", "fractions", "ftplib", "functools", "gettext", "heapq", "http.client",
    "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox", "pathlib", "pprint", "shutil",
    "smtplib", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "typing", "unittest.case", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


@cache
def docstring_text() -> str:
    """The "docstrings" text: module, class and function docstrings of DOCSTRING_MODULES."""
    import importlib
    import inspect

    docs = []
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
    return TOPIC_SEPARATOR.join(d for d in docs if d.strip())


def resolve_text(source: str | Sequence[str | Path]) -> str:
    """A corpus split by name ("heldout", ...), "docstrings", or the text of the user's files."""
    if isinstance(source, str) and source in SPLITS:
        return split_text(source)
    if source == "docstrings":
        return docstring_text()
    return load_text_files([source] if isinstance(source, (str, Path)) else source)


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids (1-D long) of a text through the model's own tokenizer, with no special tokens added.

    `tokenizer` is a transformers tokenizer (e.g. the second value `load_model` returns).
    """
    if tokenizer is None:
        raise UserError(
            "text can only become token ids through the model's tokenizer, and it has none"
        )
    if not isinstance(text, str):
        raise TypeError(f"encode_text takes a str, not {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def to_ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A 1-D long tensor of token ids. Text is refused: it goes through `encode_text` and a tokenizer."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(
            "to_ids takes token ids; turn text into ids with encode_text(tokenizer, text)"
        )
    return torch.as_tensor(ids, dtype=torch.long).flatten()


def token_blocks(
    ids: torch.Tensor | Sequence[int], seq_len: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len + 1) of a token stream; the incomplete tail is dropped."""
    ids = to_ids(ids)
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise UserError(
            f"text of {ids.numel()} tokens is shorter than one sequence of {seq_len} + 1 tokens "
            "(tokens of the model's tokenizer)"
        )
    if max_blocks is not None:
        n = min(n, max_blocks)
    starts = torch.arange(n) * seq_len
    return ids[starts[:, None] + torch.arange(seq_len + 1)]  # (N, seq_len + 1)


def random_blocks(
    ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """A training batch (batch_size, seq_len + 1) of windows at random offsets of a token stream."""
    if ids.numel() < seq_len + 1:
        raise UserError(f"training text of {ids.numel()} tokens is shorter than one sequence")
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
    return ids[starts[:, None] + torch.arange(seq_len + 1)]


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length sequences of a text: item i = {"input_ids", "labels"} of `token_blocks` row i.

    `labels` are the inputs themselves (transformers shifts them), each (seq_len,).
    """

    def __init__(self, ids: Sequence[int] | torch.Tensor, seq_len: int):
        self.blocks = token_blocks(ids, seq_len)[:, :-1]  # (N, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def iter_batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive row batches of a (N, T) tensor, in order."""
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i : i + batch_size]


def block_loss(
    model: torch.nn.Module, block: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross entropy (nats) of a batch of windows (B, T + 1): inputs [:, :-1], targets [:, 1:]."""
    logits = model(input_ids=block[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), block[:, 1:].flatten().to(logits.device), reduction=reduction
    )


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    ids: Sequence[int] | torch.Tensor,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    *,
    data_parallel: bool = False,
) -> tuple[float, int]:
    """Mean next-token loss (nats/token) over non-overlapping windows, and the number of tokens scored.

    Deterministic: the same windows in the same order every time; with max_tokens only the first
    ceil(max_tokens / seq_len) windows count. The lm_head runs over chunks of positions
    (`chunked_loss`), so no (B, S, V) logits exist at once. `data_parallel`: every rank of a launcher
    calls this at once, scores its share of the batches, and the sums are added (float64) over the ranks.
    """
    from .chunked_loss import final_hidden, nll_sums

    max_blocks = None if max_tokens is None else max(1, math.ceil(max_tokens / seq_len))
    blocks = token_blocks(ids, seq_len, max_blocks)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    batches = list(iter_batches(blocks, batch_size))
    for i in dist.share(len(batches)) if data_parallel else range(len(batches)):
        batch = batches[i].to(device)
        total += float(nll_sums(model, final_hidden(model, batch[:, :-1]), batch[:, 1:]).sum())
    model.train(was_training)
    if data_parallel:
        total = dist.sum_float(total)
    count = blocks.shape[0] * seq_len
    return total / count, count


def unigram_loss(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int = 256) -> float:
    """Cross entropy (nats/token) of eval_ids under the add-one-smoothed token frequencies of train_ids."""
    counts = torch.bincount(to_ids(train_ids), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[to_ids(eval_ids)].mean())
