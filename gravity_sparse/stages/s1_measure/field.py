"""The locality field of gravity attention: pure tensor math, no model, no I/O.

Everything here reduces attention probabilities of one layer into small per-head sums, so that measuring
never holds more than one chunk of one layer's attention at a time and memory does not grow with the
number of calibration tokens. Shapes, for one chunk of queries of one layer:

    probs, scores   (B, H, C, Sk)   queries at absolute positions q_start .. q_start + C - 1 of a sequence,
                                    keys 0 .. Sk - 1 (Sk = q_start + C for prefill chunks)
    out             (B, H, C, D)    attention output of every head, before o_proj
    o_weight        (hidden, H * D) the layer's o_proj weight

and, once reduced (S = sequence length, NB = ceil(S / block_size)):

    block_field     (H, NB, NB)  mean probability mass that the queries of block qb put on the keys of
                                 block kb; each row sums to 1 over kb <= qb
    profile         (H, S)       mean attention probability at token distance Δ = i - j
    score_profile   (H, S)       mean raw gravity score M² / (d² + ε) at distance Δ
    entropy         (H,)         mean attention-row entropy (nats)
    redundancy      (H, H)       cosine similarity of the heads' outputs after their o_proj slice

The power-law fit `profile(Δ) ≈ amp · Δ^(-α)` over Δ >= 1 follows the attention-gravitational-field view
(arXiv 2603.04805): a straight line in log-log space, weighted by 1/Δ so that every octave of distance
counts the same (otherwise the many long, noisy distances would decide the slope).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from gravity_sparse import dist

MAX_BLOCK_SHARE = (
    1.0 - 1e-6
)  # caps −log(1 − p) at ≈ 13.8 nats for a block holding all of a row's mass


def block_mass_sums(
    probs: torch.Tensor, q_start: int, block_size: int, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (query block, key block): the summed probability mass, and the summed drop cost.

    probs (B, H, C, Sk) for queries q_start .. q_start + C - 1. Returns two (H, NB, NB) float64 sums over
    batch and queries; divide by `block_query_counts` for means. The drop cost of key block b for query q is
    −log(1 − p_qb): the KL divergence between the query's attention with block b removed (renormalised) and
    its full attention. It weighs a block by what the queries that need it lose, which a mean mass hides (the
    first queries of a block see almost nothing but the previous block).
    """
    bsz, heads, c, sk = probs.shape
    nkb = -(-sk // block_size)
    padded = F.pad(probs, (0, nkb * block_size - sk))  # (B, H, C, nkb * bs)
    per_key_block = padded.view(bsz, heads, c, nkb, block_size).sum(-1).double()  # (B, H, C, nkb)
    cost = -torch.log1p(-per_key_block.clamp(max=MAX_BLOCK_SHARE))
    q_blocks = torch.arange(q_start, q_start + c, device=probs.device) // block_size
    out = []
    for values in (per_key_block, cost):
        # sum over the batch in float64 so that the result does not depend on how sequences are batched
        sums = torch.zeros(heads, num_blocks, num_blocks, dtype=torch.float64, device=probs.device)
        sums[:, :, :nkb].index_add_(1, q_blocks, values.sum(0))
        out.append(sums)
    return out[0], out[1]


def block_query_counts(seq_len: int, block_size: int) -> torch.Tensor:
    """Number of queries of one sequence in each query block: (NB,) float64 (the last may be partial)."""
    starts = torch.arange(0, seq_len, block_size, dtype=torch.float64)
    return (seq_len - starts).clamp(max=block_size)


def distance_sums(values: torch.Tensor, q_start: int) -> torch.Tensor:
    """Sum of `values[..., i, j]` over the causal pairs at each distance Δ = i - j.

    values (B, H, C, Sk), queries q_start .. q_start + C - 1 (absolute), keys 0 .. Sk - 1. Returns
    (H, Sk) float64 indexed by Δ, summed over batch and queries; `distance_pair_counts` gives the number
    of pairs behind each entry.
    """
    bsz, heads, c, sk = values.shape
    if sk != q_start + c:
        raise ValueError(
            f"a chunk of {c} queries from {q_start} must see {q_start + c} keys, got {sk}"
        )
    # Skew instead of gather: flip the keys, so query c needs its row shifted left by C-1-c; padding
    # every row with C zeros and reading it with row stride W-1 does that shift for all rows at once.
    width = sk + c
    flipped = F.pad(values.flip(-1), (0, c))  # (B, H, C, W): column m holds key Sk-1-m
    skewed = flipped.as_strided(
        (bsz, heads, c, sk), (heads * c * width, c * width, width - 1, 1), c - 1
    )  # [..., c, Δ] = values[..., c, q_start + c - Δ], zero where that key would be negative
    # sum over queries per sequence in fp32, then over the batch in fp64 (batch-size invariant)
    return skewed.sum(2).double().sum(0)


def distance_pair_counts(seq_len: int, num_sequences: int) -> torch.Tensor:
    """Causal (query, key) pairs at each distance Δ = 0 .. S-1 over `num_sequences` sequences: (S,)."""
    return num_sequences * (seq_len - torch.arange(seq_len, dtype=torch.float64))


def entropy_sums(probs: torch.Tensor) -> torch.Tensor:
    """Sum of attention-row entropies −Σ_j p log p (nats) over batch and queries: (H,) float64."""
    return (-torch.special.xlogy(probs, probs).sum(-1)).double().sum(dim=(0, 2))


def head_output_gram(out: torch.Tensor, o_weight: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the heads' contributions to the residual stream, summed over batch and queries.

    out (B, H, C, D); o_weight (hidden, H * D). Head h contributes o_h = W_o[:, h] out_h (hidden,) at every
    token; G[h, g] = Σ_tokens o_h · o_g. Returns (H, H) float64.
    """
    heads, d = out.shape[1], out.shape[3]
    w = o_weight.float().view(-1, heads, d)  # (hidden, H, D)
    per_head = torch.einsum("bhcd,ehd->bhce", out.float(), w)  # (B, H, C, hidden)
    return torch.einsum("bhce,bgce->hg", per_head, per_head).double()


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (H, H) from a Gram matrix; a head whose output is always zero gets 0 (diag 1)."""
    norm = gram.diagonal().clamp_min(0).sqrt()
    denom = norm[:, None] * norm[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    cos.fill_diagonal_(1.0)
    return cos.clamp(-1.0, 1.0)


@dataclass
class PowerLawFit:
    """profile(Δ) ≈ amp · Δ^(-alpha) over Δ >= 1; r2 is the (1/Δ-weighted) R² in log-log space."""

    alpha: float
    amp: float
    r2: float


def fit_power_law(
    profile: torch.Tensor | np.ndarray, min_distance: int = 1, floor: float = 1e-30
) -> PowerLawFit:
    """Weighted least-squares line through (log Δ, log profile(Δ)) for Δ >= min_distance.

    Points with profile <= floor (no mass at all, e.g. a previous-token head beyond Δ = 1) carry no log
    and are left out; with fewer than two points left the fit is undefined and every field is NaN.
    Weights 1/Δ give each octave of distance equal say. An exactly flat profile fits alpha = 0, R² = 1.
    """
    y_all = np.asarray(profile, dtype=np.float64)
    delta = np.arange(y_all.shape[0], dtype=np.float64)
    keep = (delta >= max(min_distance, 1)) & np.isfinite(y_all) & (y_all > floor)
    if keep.sum() < 2:
        return PowerLawFit(math.nan, math.nan, math.nan)
    x, y, w = np.log(delta[keep]), np.log(y_all[keep]), 1.0 / delta[keep]
    w = w / w.sum()
    x_mean, y_mean = (w * x).sum(), (w * y).sum()
    sxx = (w * (x - x_mean) ** 2).sum()
    slope = (w * (x - x_mean) * (y - y_mean)).sum() / sxx
    intercept = y_mean - slope * x_mean
    ss_res = (w * (y - intercept - slope * x) ** 2).sum()
    ss_tot = (w * (y - y_mean) ** 2).sum()
    scale = max(1.0, (w * y**2).sum())
    if ss_tot <= 1e-24 * scale:
        r2 = 1.0 if ss_res <= 1e-24 * scale else 0.0
    else:
        r2 = 1.0 - ss_res / ss_tot
    return PowerLawFit(alpha=float(-slope), amp=float(math.exp(intercept)), r2=float(r2))


class LayerFieldAccumulator:
    """Streaming sums of one layer's field; `add` takes chunks, `result` gives the means.

    Holds O(H · (NB² + S + H)) numbers whatever the number of calibration tokens.
    """

    def __init__(self, num_heads: int, seq_len: int, block_size: int, device: torch.device | str):
        self.num_heads, self.seq_len, self.block_size = num_heads, seq_len, block_size
        self.num_blocks = -(-seq_len // block_size)
        zeros = dict(dtype=torch.float64, device=device)
        self.block_mass = torch.zeros(num_heads, self.num_blocks, self.num_blocks, **zeros)
        self.block_cost = torch.zeros_like(self.block_mass)
        self.profile = torch.zeros(num_heads, seq_len, **zeros)
        self.score_profile = torch.zeros(num_heads, seq_len, **zeros)
        self.entropy = torch.zeros(num_heads, **zeros)
        self.gram = torch.zeros(num_heads, num_heads, **zeros)
        self.rows = 0  # attention rows seen (queries × sequences)

    def add(
        self,
        probs: torch.Tensor,
        scores: torch.Tensor,
        q_start: int,
        out: torch.Tensor | None = None,
        o_weight: torch.Tensor | None = None,
    ) -> None:
        """Add one chunk: probs/scores (B, H, C, Sk) of queries q_start.., out (B, H, C, D) optional."""
        sk = probs.shape[-1]
        if sk > self.seq_len:
            raise ValueError(f"{sk} keys, but the field was set up for sequences of {self.seq_len}")
        mass, cost = block_mass_sums(probs, q_start, self.block_size, self.num_blocks)
        self.block_mass += mass
        self.block_cost += cost
        self.profile[:, :sk] += distance_sums(probs, q_start)
        self.score_profile[:, :sk] += distance_sums(scores, q_start)
        self.entropy += entropy_sums(probs)
        if out is not None and o_weight is not None:
            self.gram += head_output_gram(out, o_weight)
        self.rows += probs.shape[0] * probs.shape[2]

    def all_reduce(self) -> None:
        """Add the sums of every rank of a launcher into each rank's (float64 stays float64)."""
        for sums in (
            self.block_mass,
            self.block_cost,
            self.profile,
            self.score_profile,
            self.entropy,
            self.gram,
        ):
            dist.all_reduce_sum(sums)
        self.rows = round(dist.sum_float(self.rows))

    def result(self) -> dict[str, torch.Tensor]:
        """Means over everything added so far (only whole sequences of `seq_len` may have been added)."""
        if self.rows == 0 or self.rows % self.seq_len:
            raise ValueError(f"{self.rows} attention rows is not a whole number of sequences")
        sequences = self.rows // self.seq_len
        per_block = block_query_counts(self.seq_len, self.block_size).to(self.block_mass.device)
        pairs = distance_pair_counts(self.seq_len, sequences).to(self.profile.device)
        return {
            "block_field": (self.block_mass / (sequences * per_block).view(1, -1, 1)).float(),
            "block_cost": (self.block_cost / (sequences * per_block).view(1, -1, 1)).float(),
            "profile": (self.profile / pairs).float(),
            "score_profile": (self.score_profile / pairs).float(),
            "entropy": (self.entropy / self.rows).float(),
            "redundancy": cosine_from_gram(self.gram).float(),
        }


def head_locality(block_field: torch.Tensor) -> torch.Tensor:
    """Mean probability mass a query keeps inside its own block: (..., NB, NB) -> (...)."""
    return block_field.diagonal(dim1=-2, dim2=-1).mean(-1)
