"""The structured QUBO: each kept head chooses a window of the w nearest key blocks, with or without the
sink column (key block 0), instead of choosing free blocks.

Why. On gravity-smol the free-block QUBO picks good heads but loses to a plain window on its own heads:
window blocks on the QUBO's heads gave 2.845 (2k-distilled model) and 3.033 (shipped model) at density
0.15 where the QUBO's own blocks gave 3.031 and 3.242 (`benchmarks/results/2026-12-07-smol*-heads-vs-blocks-*`).
Scattered, row-averaged block values miss what each query needs: its own recent context. Here a head's
blocks are a structure, and the QUBO chooses the structure of every head (how wide, whether to keep the
sink, or to drop the head) under the budget. A choice is one-hot, so its cost can be any function of the
field: it is the exact nonlinear row cost, not a sum of block values.

Cost of a structure (`structure_costs`). The head's distance profile (mean attention at token distance Δ)
gives every query i = qb·B + t the mass it puts on each key block at block offset d: m[t, 0] = C[t],
m[t, d] = C[t + dB] − C[t + (d − 1)B] (C the profile's prefix sum), the same for every query row. The
sink block (d = qb) takes the measured block field's row share where that is larger. A window w keeps
offsets d ≤ w, the sink keeps d = qb; the kept share k_i of query i's row costs

    kl:   −log k_i       the KL divergence between the renormalised and the full attention row
    mass: 1 − k_i        the dropped mass: the size of the head's output change (1 − k)·(v̄_kept − v̄_drop)
    sq:   (1 − k_i)²     its square: a trained model's loss is flat to first order in a small output
                         change, so the loss grows with the change squared, and spreading a cut evenly
                         over heads and queries costs less than concentrating it

averaged over all queries, times the head's scale S_h·w_h (`formulation.build_terms`: flat mean
importance and the mass sharpness weight). Queries whose row fits in the window cost nothing.

Variables, per layer (binary): d_h (head h dropped), u_hs (head h kept with structure s), y_g (KV head g
kept). Energy at block price λ and head price μ:

    Σ_h I_h d_h + Σ_{h,s} (cost_hs + λ·blocks_s + μ) u_hs + Σ_{h<h'} s_hh' d_h d_h'
    + Σ_g κ_g y_g + P Σ_h (1 − d_h)(1 − y_g(h)) + Σ_h A_h (d_h + Σ_s u_hs − 1)²

The exactly-one penalty (dimod's `add_linear_equality_constraint`) has A_h above any gain a second or a
missing choice could bring, so every feasible state beats its violations. Solved by simulated annealing
(dwave-samplers), then polished by exact moves of one or two heads (their best options given the
others) and checked against the exact optimum (`exact_layer`: all drop sets, each kept head at its
best structure).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import dimod
import numpy as np

from gravity_sparse.qubo.coupling import offdiag_blocks
from gravity_sparse.qubo.registry import STRUCTURE_SINKS


def structures(nqb: int, sink: str = "always") -> tuple[np.ndarray, np.ndarray]:
    """(widths (S,), sinks (S,) bool) of the structures a head may take.

    sink "choose": w = 0..NQB−1 without the sink, then w = 0..NQB−3 with it (wider windows already hold
    the sink of every row). "always": w = 0..NQB−3 with the sink, and the full causal pattern.
    """
    if sink not in STRUCTURE_SINKS:
        raise ValueError(f"sink must be one of {STRUCTURE_SINKS}, got {sink!r}")
    with_sink = np.arange(max(nqb - 2, 0))
    if sink == "always":
        widths = np.concatenate([with_sink, [nqb - 1]])
        return widths, np.concatenate([np.ones(len(with_sink), bool), [False]])
    widths = np.concatenate([np.arange(nqb), with_sink])
    return widths, np.concatenate([np.zeros(nqb, bool), np.ones(len(with_sink), bool)])


def structure_masks(nqb: int, widths: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """(S, NB) bool off-diagonal blocks (`offdiag_blocks` order) kept by each structure."""
    qb, kb = offdiag_blocks(nqb)
    return ((qb - kb)[None, :] <= widths[:, None]) | (sinks[:, None] & (kb == 0)[None, :])


def structure_blocks(nqb: int, widths: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """(S,) computed causal blocks of each structure, diagonal included."""
    return nqb + structure_masks(nqb, widths, sinks).sum(-1)


@dataclass
class RowModel:
    """One layer's per-query row masses from the distance profile (see the module docstring)."""

    prefix: np.ndarray  # (H, NQB·B + B) C[x] = Σ_{Δ ≤ x} profile, clamped past the sequence
    offsets: np.ndarray  # (H, B, NQB) m[t, d]
    sink: (
        np.ndarray
    )  # (H, NQB, B) mass of key block 0 for row qb, query offset t (row 0: its diagonal)
    total: np.ndarray  # (H, NQB, B) the row's total mass with that sink, > 0
    valid: np.ndarray  # (NQB, B) query qb·B + t exists
    block: int


def row_model(profile: np.ndarray, sink_share: np.ndarray, block: int) -> RowModel:
    """profile (H, T) mean attention at distance Δ; sink_share (H, NQB) the measured block field's key
    block 0 column (row shares)."""
    num_heads, seq = profile.shape
    nqb = sink_share.shape[-1]
    length = (nqb + 1) * block
    prefix = np.zeros((num_heads, length))
    prefix[:, :seq] = np.cumsum(np.clip(profile, 0.0, None), axis=-1)
    prefix[:, seq:] = prefix[:, seq - 1 : seq]
    t = np.arange(block)
    d = np.arange(nqb)
    upper = prefix[:, t[:, None] + d[None, :] * block]  # C[t + dB]
    lower = np.concatenate([np.zeros((num_heads, block, 1)), upper[..., :-1]], axis=-1)
    offsets = upper - lower  # (H, B, NQB)
    qb = np.arange(nqb)
    row_total = prefix[:, qb[:, None] * block + t[None, :]]  # (H, NQB, B) C[t + qb·B]
    model_sink = offsets[:, t[None, :], qb[:, None]]  # m[t, qb]
    share = np.clip(sink_share, 0.0, 0.999)[..., None]
    rest = row_total - model_sink
    sink = np.where(
        qb[None, :, None] > 0, np.maximum(model_sink, share * rest / (1 - share)), model_sink
    )
    total = np.maximum(rest + sink, 1e-12)
    valid = (qb[:, None] * block + t[None, :]) < seq
    return RowModel(prefix, offsets, sink, total, valid, block)


def _phi(kept: np.ndarray, kind: str) -> np.ndarray:
    kept = np.clip(kept, 1e-12, 1.0)
    if kind == "kl":
        return -np.log(kept)
    return 1.0 - kept if kind == "mass" else (1.0 - kept) ** 2


def structure_costs(
    model: RowModel, widths: np.ndarray, sinks: np.ndarray, kind: str
) -> np.ndarray:
    """(H, S) mean over all queries of φ(kept share) for each structure (closed form by prefix sums)."""
    nqb, block = model.valid.shape
    qb = np.arange(nqb)[:, None, None]
    t = np.arange(block)[None, :, None]
    w = widths[None, None, :]
    window = model.prefix[:, np.minimum(t + w * block, model.prefix.shape[-1] - 1)]  # (H, 1, B, S)
    window = np.broadcast_to(window, (window.shape[0], nqb, block, len(widths)))
    outside = qb > w  # (NQB, 1, S): the row reaches past the window
    kept = (window + (sinks[None, None, :] & outside) * model.sink[..., None]) / model.total[
        ..., None
    ]
    kept = np.where(outside, kept, 1.0)
    cost = _phi(kept, kind) * model.valid[None, :, :, None]
    return cost.sum((1, 2)) / model.valid.sum()


def mask_costs(model: RowModel, masks: np.ndarray, kind: str) -> np.ndarray:
    """(H,) mean over all queries of φ(kept share) for arbitrary block masks (H, NQB, NQB) bool (the
    diagonal is always computed): the same cost as `structure_costs` for any pattern."""
    nqb, block = model.valid.shape
    qb, kb = np.tril_indices(nqb, -1)
    per_offset = np.zeros((masks.shape[0], nqb, block))  # kept mass per row, sink aside
    body = kb > 0
    gathered = model.offsets[:, :, (qb - kb)[body]]  # (H, B, n)
    kept_blocks = masks[:, qb[body], kb[body]].astype(np.float64)  # (H, n)
    np.add.at(
        per_offset, (slice(None), qb[body]), np.swapaxes(gathered * kept_blocks[:, None, :], 1, 2)
    )
    per_offset += model.offsets[:, None, :, 0]  # the diagonal block
    rows = np.arange(1, nqb)
    per_offset[:, rows] += masks[:, rows, 0][..., None] * model.sink[:, rows]
    kept = per_offset / model.total
    kept[:, 0] = 1.0
    cost = _phi(kept, kind) * model.valid[None]
    return cost.sum((1, 2)) / model.valid.sum()


def _field_kept(field: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Kept share of every query block's row: field (..., NQB, NQB) measured row shares, keep
    (..., NQB, NQB) bool, broadcast together (the diagonal block is always kept)."""
    keep = keep | np.eye(field.shape[-1], dtype=bool)
    return (field * keep).sum(-1) / np.maximum(field.sum(-1), 1e-12)


def field_structure_costs(
    field: np.ndarray, widths: np.ndarray, sinks: np.ndarray, kind: str
) -> np.ndarray:
    """(H, S) `structure_rows: field`: mean over query blocks of φ(kept share of the row) in the measured
    block field (H, NQB, NQB), instead of per query from the distance profile. Coarser within a row,
    but exact in position: a head whose attention changes along the sequence is priced row by row."""
    nqb = field.shape[-1]
    qb, kb = offdiag_blocks(nqb)
    full = np.zeros((len(widths), nqb, nqb), dtype=bool)
    full[:, qb, kb] = structure_masks(nqb, widths, sinks)
    return _phi(_field_kept(field[:, None], full[None]), kind).mean(-1)


def field_mask_costs(field: np.ndarray, masks: np.ndarray, kind: str) -> np.ndarray:
    """(H,) the cost of `field_structure_costs` for arbitrary block masks (H, NQB, NQB) bool."""
    return _phi(_field_kept(field, masks), kind).mean(-1)


@dataclass
class LayerProblem:
    """One layer's structured QUBO at (λ, μ). Labels: d_h (0..k−1), u_hs (k + h·S + s), y_g (after)."""

    variables_doc: ClassVar[str] = (
        "labels 0..n-1: head dropped d_h (k), head h with structure s u_hs (k + h·S + s, structures "
        "as in gravity_sparse.qubo.structured.structures), then KV heads (kv_heads order)"
    )
    layer: int
    heads: list[int]
    kv: list[int]
    option: np.ndarray  # (k, S) cost_hs + λ·blocks_s + μ
    importance: np.ndarray  # (k,)
    pair: np.ndarray  # (k, k)
    groups: np.ndarray  # (k,) index into kv
    kv_cost: float
    kv_penalty: float
    onehot: np.ndarray  # (k,) A_h

    @property
    def num_structures(self) -> int:
        return self.option.shape[1]

    @property
    def num_variables(self) -> int:
        k, s = self.option.shape
        return k * (s + 1) + len(self.kv)

    def bqm(self) -> dimod.BinaryQuadraticModel:
        k, s = self.option.shape
        bqm = dimod.BinaryQuadraticModel(dimod.BINARY)
        first_kv = k * (s + 1)
        for h in range(k):
            u = k + h * s + np.arange(s)
            bqm.add_linear(h, self.importance[h] - self.kv_penalty)
            bqm.add_linear_from(zip(u.tolist(), self.option[h].tolist(), strict=True))
            y = first_kv + int(self.groups[h])
            bqm.add_quadratic(h, y, self.kv_penalty)
            bqm.add_linear(y, -self.kv_penalty)
            bqm.offset += self.kv_penalty
            bqm.add_linear_equality_constraint(
                [(h, 1.0), *((int(v), 1.0) for v in u)], float(self.onehot[h]), -1.0
            )
        for g in range(len(self.kv)):
            bqm.add_linear(first_kv + g, self.kv_cost)
        iu, ju = np.triu_indices(k, 1)
        for a, b in zip(iu.tolist(), ju.tolist(), strict=True):
            if self.pair[a, b]:
                bqm.add_quadratic(a, b, float(self.pair[a, b]))
        return bqm

    def energy(self, states: np.ndarray) -> np.ndarray:
        """BQM energies of states (R, n) {0,1} (the interface the BQM files use)."""
        bqm = self.bqm()
        return np.asarray(bqm.energies((states, list(range(self.num_variables)))))

    def choice_energy(self, choice: np.ndarray) -> float:
        """Energy of a feasible state: choice (k,) structure index per head, −1 = dropped; KV heads
        kept exactly when needed."""
        drop = choice < 0
        kept_opt = self.option[np.flatnonzero(~drop), choice[~drop]].sum()
        pairs = float(np.triu(self.pair, 1)[np.ix_(drop, drop)].sum())
        kv = self.kv_cost * len(set(self.groups[~drop].tolist()))
        return float(self.importance[drop].sum() + kept_opt + pairs + kv)

    def state(self, choice: np.ndarray) -> np.ndarray:
        """The BQM state (n,) of a feasible choice."""
        k, s = self.option.shape
        out = np.zeros(self.num_variables, dtype=np.int8)
        for h, c in enumerate(choice.tolist()):
            out[h if c < 0 else k + h * s + c] = 1
        for g in set(self.groups[choice >= 0].tolist()):
            out[k * (s + 1) + g] = 1
        return out

    def decode(self, state: np.ndarray) -> tuple[np.ndarray, int]:
        """(choice (k,), violations) of an annealer state. A head with no option set, or with several,
        is decoded as dropped or as its first structure set; `polish` then moves it to its best option."""
        k, s = self.option.shape
        drop = state[:k].astype(bool)
        u = state[k : k * (s + 1)].reshape(k, s).astype(bool)
        bad = drop.astype(int) + u.sum(1) != 1
        choice = np.where(drop | ~u.any(1), -1, u.argmax(1))
        return choice, int(bad.sum())


def polish(problem: LayerProblem, choice: np.ndarray, max_sweeps: int = 50) -> np.ndarray:
    """Exact moves of one head, then of two heads together: each head (pair of heads) in turn takes its
    best options (dropped, or its cheapest structure) given the others, until nothing changes. A pair
    move is what a redundant pair (drop both or neither) and a shared KV head need. Never raises the
    energy."""
    choice = choice.copy()
    best_of = problem.option.argmin(1)
    k = len(choice)
    groups = [(h,) for h in range(k)] + [(a, b) for a in range(k) for b in range(a + 1, k)]
    for _ in range(max_sweeps):
        changed = False
        for group in groups:
            best, best_e = choice.copy(), problem.choice_energy(choice)
            for drops in itertools.product((True, False), repeat=len(group)):
                trial = choice.copy()
                for h, drop in zip(group, drops, strict=True):
                    trial[h] = -1 if drop else best_of[h]
                e = problem.choice_energy(trial)
                if e < best_e - 1e-15:
                    best, best_e = trial, e
            changed |= not np.array_equal(best, choice)
            choice = best
        if not changed:
            break
    return choice


def exact_layer(problem: LayerProblem, max_heads: int = 16) -> tuple[np.ndarray, float] | None:
    """The exact optimum over feasible states: every drop set (2^k), each kept head at its cheapest
    structure (given the drop set a kept head's option is independent of the others). None if k >
    max_heads."""
    k = len(problem.heads)
    if k > max_heads:
        return None
    codes = np.arange(1 << k)
    drop = ((codes[:, None] >> np.arange(k)) & 1).astype(bool)  # (2^k, k)
    best_opt = problem.option.min(1)
    kept = ~drop
    energy = (drop * problem.importance).sum(1) + (kept * best_opt).sum(1)
    energy += np.einsum(
        "ra,ab,rb->r", drop.astype(float), np.triu(problem.pair, 1), drop.astype(float)
    )
    groups = np.zeros((len(codes), len(problem.kv)), dtype=bool)
    for g in range(len(problem.kv)):
        groups[:, g] = (kept & (problem.groups == g)).any(1)
    energy += problem.kv_cost * groups.sum(1)
    i = int(np.argmin(energy))
    choice = np.where(drop[i], -1, problem.option.argmin(1))
    return choice, float(energy[i])
