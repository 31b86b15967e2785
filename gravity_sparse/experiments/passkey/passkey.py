"""The passkey task (Mohtashami & Jaggi 2023): a 5-digit key stated once, filler text around it, then a
request for the key. A trial is correct when the model's greedy continuation of the request starts with the
5 digits of the key.

Scoring is one forward pass per trial: the key's tokens are appended to the prompt and the trial counts as
correct when the argmax at every key position is the key's own token. That is exactly "greedy decoding
produces the key first", without a decode loop. The trials of one cell (length, depth) share everything
before the needle, so that prefix is run once into a KV cache and each trial runs only the rest on a copy
of it (exact: the logits are those of the whole prompt). Prompts are built to the requested length in the
model's own tokens (the filler is repeated and cut), with the key sentence at the requested depth of the
filler.
Keys come from a seeded generator, so every model and mask sees the same prompts.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch

from gravity_sparse.errors import UserError

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is "


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def build_trial(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, key ids) with len(prompt) + len(key) == length and the needle at `depth`."""
    prompt, key_ids, _ = _trial(tokenizer, length, depth, key)
    return prompt, key_ids


def _trial(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int], int]:
    """build_trial's (prompt, key ids) and the length of the prefix before the needle."""
    intro, question, key_ids = (
        _ids(tokenizer, INTRO),
        _ids(tokenizer, QUESTION),
        _ids(tokenizer, key),
    )
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    room = length - len(intro) - len(needle) - len(question) - len(key_ids)
    if room < 1:
        raise UserError(f"passkey length {length} leaves no room for filler")
    unit = _ids(tokenizer, FILLER)
    filler = (unit * (room // len(unit) + 1))[:room]
    cut = int(round(depth * room))
    prompt = intro + filler[:cut] + needle + filler[cut:] + question
    return prompt, key_ids, len(intro) + cut


def keys(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [str(rng.randrange(10000, 100000)) for _ in range(count)]


@torch.no_grad()
def key_logits(
    model: torch.nn.Module, prompt: list[int], key_ids: list[int], prefix: tuple | None = None
) -> torch.Tensor:
    """(len(key_ids), vocab) logits that predict each key token after `prompt`. `prefix`: (n, cache)
    holding the KV of prompt[:n] (from `prefix_cache`); only the rest is run, on a copy of the cache (a
    copy of 2k tokens' KV costs far less than their forward, and needs no version-specific `crop`)."""
    ids = torch.tensor([prompt + key_ids])
    if prefix is None:
        return model(input_ids=ids, logits_to_keep=len(key_ids) + 1).logits[0, :-1]
    from gravity_sparse.model.modeling_gravity import cache_kwarg

    n, cache = prefix
    out = model(
        input_ids=ids[:, n:], use_cache=True, logits_to_keep=len(key_ids) + 1,
        **cache_kwarg(copy.deepcopy(cache)),
    )  # fmt: skip
    return out.logits[0, :-1]


def trial_correct(
    model: torch.nn.Module, prompt: list[int], key_ids: list[int], prefix: tuple | None = None
) -> bool:
    """Greedy decoding after `prompt` starts with `key_ids` (see `key_logits` for `prefix`)."""
    logits = key_logits(model, prompt, key_ids, prefix)
    return bool((logits.argmax(-1) == torch.tensor(key_ids)).all())


@torch.no_grad()
def prefix_cache(model: torch.nn.Module, ids: list[int]) -> tuple[int, Any] | None:
    """(len(ids), a DynamicCache holding their KV), or None for an empty prefix."""
    from transformers import DynamicCache

    from gravity_sparse.model.modeling_gravity import cache_kwarg

    if not ids:
        return None
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1, **cache_kwarg(cache))
    return len(ids), cache


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int,
    on_trial=None,
    cache_prefix: bool = True,
) -> list[dict[str, Any]]:
    """[{"length", "depth", "trials", "correct", "accuracy"}] for every length × depth cell."""
    rows = []
    for length in lengths:
        for depth in depths:
            correct, prefix, prefix_ids = 0, None, None
            for key in keys(seed + 7919 * length + int(1000 * depth), trials):
                prompt, key_ids, n = _trial(tokenizer, length, depth, key)
                # the prefix is run once a cell (again only if keys of another length move the needle)
                if cache_prefix and prompt[:n] != prefix_ids:
                    prefix, prefix_ids = prefix_cache(model, prompt[:n]), prompt[:n]
                correct += trial_correct(model, prompt, key_ids, prefix)
                if on_trial is not None:
                    on_trial()
            rows.append(
                {"length": length, "depth": depth, "trials": trials, "correct": correct,
                 "accuracy": correct / trials}
            )  # fmt: skip
    return rows
