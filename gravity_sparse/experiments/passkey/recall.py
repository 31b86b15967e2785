"""The recall task: which of several contexts holds the segment being repeated? A retrieval test that a
model which cannot copy exactly can still pass, scored as an accuracy against a known chance level.

A trial group is `choices` contexts of the requested length, alike except for their segments: filler
text (the passkey filler) with one segment of `segment` random tokens at each requested depth. A segment
is tokens drawn at random from the train text, so language alone cannot predict it. Every segment of the
group is then appended, as a candidate, to every context, and scored by its loss after its first token
(the first has no cue). A trial (one segment) is correct when its loss is lowest under the context that
holds it: the model recognised the segment it saw. Ties at the lowest loss get an equal share of the
credit, so a model or mask that cannot see the segments scores exactly the chance level 1/choices. The
gain is the segment's mean loss under the other contexts minus its loss under its own (nats/token), the
size of the recall behind the accuracy.

Scoring runs each context once into a KV cache and each candidate after it (exact: the logits are those
of context + candidate run whole).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gravity_sparse.errors import UserError

from .passkey import FILLER, _ids

TIE = 1e-6  # nats/token: losses this close count as tied


def build_group(
    tokenizer, pool: torch.Tensor, length: int, depths: list[float], segment: int, choices: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(contexts (choices, length − segment), segments (choices, len(depths), segment)): context c holds
    segments[c, i] at depth i of its filler; a candidate appended to a context makes `length` tokens."""
    room = length - (len(depths) + 1) * segment
    if room < 1:
        raise UserError(
            f"recall length {length} leaves no room for filler around {len(depths)} segments of "
            f"{segment} tokens"
        )
    unit = _ids(tokenizer, FILLER)
    filler = torch.tensor((unit * (room // len(unit) + 1))[:room])
    segments = pool[torch.randint(0, pool.numel(), (choices, len(depths), segment), generator=gen)]
    cuts = [round(d * room) for d in depths]
    order = sorted(range(len(depths)), key=lambda i: cuts[i])
    contexts = []
    for c in range(choices):
        parts, at = [], 0
        for i in order:
            parts += [filler[at : cuts[i]], segments[c, i]]
            at = cuts[i]
        contexts.append(torch.cat([*parts, filler[at:]]))
    return torch.stack(contexts), segments


@torch.no_grad()
def candidate_losses(model: torch.nn.Module, context: torch.Tensor, candidates: torch.Tensor):
    """(K,) mean loss of each candidate's tokens after its first, each appended to `context`: the context
    runs once into a DynamicCache, each candidate after it, and the cache is cropped back to the context
    (cheaper than copying it)."""
    from transformers import DynamicCache

    from gravity_sparse.model.modeling_gravity import cache_kwarg

    cache = DynamicCache(config=model.config)
    model(input_ids=context[None], use_cache=True, logits_to_keep=1, **cache_kwarg(cache))
    seg, out = candidates.shape[-1], []
    for cand in candidates:
        logits = model(
            input_ids=cand[None], use_cache=True, logits_to_keep=seg, **cache_kwarg(cache)
        ).logits[0, :-1]
        out.append(torch.nn.functional.cross_entropy(logits.float(), cand[1:]))
        cache.crop(-seg)  # negative: remove the candidate (both transformers 4 and 5 accept it)
    return torch.stack(out)


def score_group(losses: torch.Tensor, choices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """losses (choices, K) of candidate k under context c, candidate k = (owner k // (K/choices)):
    (credit (K,), gain (K,)) as in the module docstring."""
    per = losses.shape[1] // choices
    owner = torch.arange(losses.shape[1]) // per
    own = losses[owner, torch.arange(losses.shape[1])]
    best = losses.min(0).values
    tied = (losses <= best + TIE).sum(0)
    credit = torch.where(own <= best + TIE, 1.0 / tied, torch.zeros_like(own))
    gain = (losses.sum(0) - own) / (choices - 1) - own
    return credit, gain


def evaluate_recall(
    model: torch.nn.Module,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int,
    *,
    choices: int = 4,
    segment: int = 32,
    pool: torch.Tensor | None = None,
    on_trial=None,
) -> list[dict[str, Any]]:
    """[{"length", "depth", "trials", "correct", "accuracy", "chance", "gain", "gain_se"}] per length ×
    depth. Each group of `choices` contexts gives every depth `choices` trials, so a cell has `trials`
    rounded up to a multiple of `choices`. `pool`: the token ids segments are drawn from (default: the
    train split through the tokenizer)."""
    from gravity_sparse.model.data import encode_text, resolve_text

    if choices < 2:
        raise UserError("recall needs at least 2 choices")
    if pool is None:
        pool = encode_text(tokenizer, resolve_text("train"))
    groups = math.ceil(trials / choices)
    rows = []
    for length in lengths:
        gen = torch.Generator().manual_seed(seed + 7919 * length)
        credit, gain = [], []
        for _ in range(groups):
            contexts, segments = build_group(tokenizer, pool, length, depths, segment, choices, gen)
            cands = segments.reshape(-1, segment)  # (choices · depths, segment), owner-major
            losses = torch.stack([candidate_losses(model, c, cands) for c in contexts])
            c, g = score_group(losses, choices)
            credit.append(c.view(choices, len(depths)))
            gain.append(g.view(choices, len(depths)))
            if on_trial is not None:
                on_trial(choices * len(depths))
        credit_t, gain_t = torch.cat(credit).double(), torch.cat(gain).double()
        n = credit_t.shape[0]
        for i, depth in enumerate(depths):
            rows.append(
                {"length": length, "depth": depth, "trials": n,
                 "correct": round(float(credit_t[:, i].sum()), 4),
                 "accuracy": float(credit_t[:, i].mean()), "chance": 1.0 / choices,
                 "gain": float(gain_t[:, i].mean()),
                 "gain_se": float(gain_t[:, i].std() / n**0.5) if n > 1 else float("nan")}
            )  # fmt: skip
    return rows
