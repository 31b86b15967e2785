"""The QUBO over head and block keep/drop decisions: pure construction, no solving, no files.

Variables, per layer (all binary, 1 = keep):
    x_h  query head h                          (H,)
    y_g  KV head g                             (G,)
    z_hb off-diagonal causal block b of head h (H, NB), NB = NQB·(NQB−1)/2, blocks (qb, kb) with kb < qb
         in row-major order (`offdiag_blocks`). Diagonal blocks are not variables: they follow their head.

Objective (an estimate of the loss increase, nats/token; lower is better):

    obj = Σ_h I_h (1 − x_h)                             dropping a head loses its ablation importance
        + Σ_h x_h Σ_b c_hb (1 − z_hb)                   a kept head loses the value of its dropped blocks
        + Σ_h x_h Σ_{a<b, one row} γ_hab (1 − z_ha)(1 − z_hb)   optional row coupling (`coupling`)
        + Σ_{h<h'} s_hh' (1 − x_h)(1 − x_h')            a redundant pair must not lose both members
        − κ_c Σ x_h · (adjacent kept blocks in a row)   optional contiguity (the diagonal counts as kept)
        + Σ_g κ_g y_g                                   a kept KV head costs its cache
    energy = obj + λ · computed_blocks + μ · kept_heads + penalties,
    computed_blocks = Σ_h x_h (NQB + Σ_b z_hb)

Block values — why the masses weight them. Dropping key blocks of mass p from a softmax row and
renormalising moves the head's output by p·(v̄_kept − v̄_dropped). How far apart those two value means are
depends on how sharply the head discriminates between keys, and the learned mass bounds exactly that: the
gravity score lies in (0, R_h], R_h = M_h²/ε, so no key can be preferred over another by more than a factor
e^{R_h}. A light head (R_h ≲ 1 nat) averages over many keys, its dropped and kept value means nearly agree,
and dropped mass costs little; a heavy head picks out specific tokens, and mass it loses is mass pointed at
something that matters. Hence a sharpness weight w_h = R_h / (R_h + R_0) ∈ (0, 1), R_0 = `mass_scale` × the
median R_h of the model — relative, because the masses' overall size differs by model (Gravity-2 starts at
M = 0.5, R = 2.5; the tiny model learned M ≈ 4–7, R ≈ 140–460, where a fixed R_0 = 1 left every w_h ≈ 1
and the masses without effect; relative R_0 lowered its unhealed loss at densities 0.2/0.35/0.5) — and

    c_hb = S_h · w_h · f_h[qb, kb] / NQB        (f = a block field whose every row sums to 1)

Which field and which scale S_h (`solve.block_value`, `solve.block_scale`), chosen by held-out loss on the
tiny model (`benchmarks/results/*-tiny-*`):
- f = "profile" (default): the head's distance profile — its mean attention at each token distance Δ, the
  attention-gravitational-field view — integrated over each block, plus the measured sink column. It is
  translation-invariant, so every query row keeps the local context that its own queries need. The raw
  measured block field ("mass") and the row share of the drop cost −log(1 − p) ("kl") value blocks by
  row averages, under-price the previous block for a block's first queries, and lost clearly.
- S_h = mean importance over the model ("flat", default) or the head's own ablation importance
  ("importance"). Ablation zeroes a head; restricting its blocks changes its output instead, and a head that
  is cheap to drop can still need its context: scaling by I_h left cheap heads diagonal-only and lost.
With S_h = I_h, Σ_b c_hb ≤ I_h (a kept head never costs more than dropping it); with "flat" the mass weight
alone differentiates heads' blocks, and head keep/drop is still priced by each head's own I_h.

Pairs. Importance is measured by ablating one head with all others present, so a redundant pair looks
cheap head by head: each covers for the other. Dropping both loses the shared part, charged as
s_hh' = ρ · max(r_hh', 0) · √(I_h I_h') with r the cosine similarity of head outputs.

Constraints, as quadratic penalties sized to be never violated at any local minimum (checked on every
solve): a block needs its head, δ·z_hb(1 − x_h) with δ > 2κ_c (a lone kept block of a dropped head gains
at most 2κ_c from contiguity), and a query head needs its KV head, P·x_h(1 − y_g) with P > κ_g. The block
value enters as the product x_h z_hb (not as a linear term plus a huge penalty): a head variable then sees
its true marginal value, which keeps the annealing landscape tame.

The budget enters linearly through the Lagrange multiplier λ (price of one computed block, nats) — never
as a squared penalty over all blocks, which would couple every pair of blocks.

Shapes: L layers, H query heads, G KV heads, NQB query blocks, NB off-diagonal causal blocks per head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import dimod
import networkx as nx
import numpy as np

from gravity_sparse.qubo import coupling as row
from gravity_sparse.qubo.coupling import offdiag_blocks


def causal_blocks_per_head(nqb: int) -> int:
    return nqb * (nqb + 1) // 2


@dataclass
class Terms:
    """Coefficients of every layer's QUBO (numpy, float64). Built once per field by `build_terms`."""

    value: np.ndarray  # (L, H, NB) c_hb, nats
    importance: np.ndarray  # (L, H) I_h ≥ 0
    pair: np.ndarray  # (L, H, H) s_hh', symmetric, zero diagonal
    kv_groups: np.ndarray  # (L, H) int64
    num_kv: int  # G
    nqb: int
    kv_cost: float  # κ_g (same for every KV head)
    kv_penalty: float  # P
    block_penalty: float  # δ
    contiguity: float  # κ_c
    weight: np.ndarray  # (L, H) sharpness weight w_h
    coupling: np.ndarray | None = None  # (L, H, P) γ_hab over `row_pairs(nqb)`, nats; None: none
    _priced: dict = field(default_factory=dict, repr=False, compare=False)  # values_at's last λ

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.value.shape  # type: ignore[return-value]

    def values_at(self, lam: float) -> np.ndarray:
        """(L, H, NB) what dropping each block costs at block price λ: c_hb, plus with row coupling
        Σ γ_hab over the blocks b of its row that λ drops on their own (c_hb ≤ λ). The relaxation,
        the multiplier search and the repair price blocks by this; the BQM holds the exact pairs."""
        if self.coupling is None:
            return self.value
        if lam not in self._priced:
            drop = (self.value <= lam).astype(np.float64)
            self._priced.clear()  # one λ at a time: the search moves λ on every step
            self._priced[lam] = self.value + row.marginals(self.coupling, drop, self.nqb)
        return self._priced[lam]

    def coupled_marginals(self, blocks: np.ndarray) -> np.ndarray:
        """(L, H, NB) the objective change of dropping each block, the others as in `blocks`."""
        if self.coupling is None:
            return self.value
        drop = 1.0 - blocks.astype(np.float64)
        return self.value + row.marginals(self.coupling, drop, self.nqb)


def mass_weight(mass: np.ndarray, eps: float, mass_scale: float) -> np.ndarray:
    """w_h = R_h / (R_h + R_0), R_h = M_h²/ε the score bound, R_0 = mass_scale × the median R_h of the
    model (so w = ½ at the median head for mass_scale 1, whatever the masses' overall size); mass_scale ≤ 0
    switches the weighting off."""
    if mass_scale <= 0 or mass.size == 0:
        return np.ones_like(mass)
    bound = mass**2 / eps
    return bound / (bound + mass_scale * max(float(np.median(bound)), 1e-12))


def scale_of_heads(importance: np.ndarray, block_scale: str) -> np.ndarray:
    """S_h: the head's own importance ("importance"), the model's mean ("flat"), or their geometric
    mean ("sqrt", √(I_h · Ī)): between the two, a head's blocks count more the more the head does."""
    mean = float(importance.mean()) if importance.size else 0.0
    if block_scale == "importance":
        return importance
    if block_scale == "sqrt":
        return np.sqrt(importance * mean)
    return np.full_like(importance, mean)


def build_terms(
    block_field: np.ndarray,
    importance: np.ndarray,
    redundancy: np.ndarray,
    mass: np.ndarray,
    kv_groups: np.ndarray,
    *,
    num_kv: int,
    eps: float = 0.1,
    mass_scale: float = 1.0,
    redundancy_weight: float = 0.5,
    kv_cost: float = 0.01,
    contiguity: float = 0.0,
    penalty_margin: float = 1.0,
    block_scale: str = "importance",
    absolute: bool = False,
    coupling: np.ndarray | None = None,
) -> Terms:
    """Coefficients from a measured field.

    block_field (L, H, NQB, NQB), importance/mass (L, H), redundancy (L, H, H), kv_groups (L, H).
    block_field holds row shares, scaled here by head, mass weight and 1/NQB; with `absolute` it holds
    each block's value in nats already (of either sign: `solve.block_value=grad`) and is used as it is.
    kv_cost, contiguity and penalty_margin are fractions of the mean |block value|, so they mean the same
    thing whatever the scale of the importances. coupling (L, H, P): row-coupling pair costs in the units of
    block_field's row shares (`coupling.pair_cost` over the same row normaliser), scaled here like the
    block values; only for row shares (not `absolute`).
    """
    nqb = block_field.shape[-1]
    qb, kb = offdiag_blocks(nqb)
    imp = np.clip(importance.astype(np.float64), 0.0, None)
    weight = mass_weight(mass.astype(np.float64), eps, mass_scale)
    if absolute:
        value = block_field[..., qb, kb].astype(np.float64)
    else:
        # block values scale with the head's ablation importance, the model's mean importance ("flat":
        # restricting a head is not ablating it, and a head that is cheap to drop may still need its
        # context), or their geometric mean
        head_scale = scale_of_heads(imp, block_scale)
        value = (head_scale * weight)[..., None] * block_field[..., qb, kb].astype(np.float64) / nqb
        if coupling is not None:
            coupling = (head_scale * weight)[..., None] * coupling.astype(np.float64) / nqb
    size = float(np.abs(value).mean()) if value.size else 0.0
    scale = size if size > 0 else 1.0
    red = np.clip(redundancy.astype(np.float64), 0.0, None)
    pair = redundancy_weight * red * np.sqrt(imp[..., :, None] * imp[..., None, :])
    idx = np.arange(pair.shape[-1])
    pair[..., idx, idx] = 0.0
    pair = 0.5 * (pair + np.swapaxes(pair, -1, -2))
    kappa_c = contiguity * scale
    kappa_g = kv_cost * scale
    margin = max(penalty_margin, 1e-6) * scale
    return Terms(
        value=value,
        importance=imp,
        pair=pair,
        kv_groups=kv_groups.astype(np.int64),
        num_kv=num_kv,
        nqb=nqb,
        kv_cost=kappa_g,
        kv_penalty=kappa_g + margin,
        block_penalty=2.0 * kappa_c + margin,
        contiguity=kappa_c,
        weight=weight,
        coupling=None if absolute else coupling,
    )


def head_components(terms: Terms, layer: int) -> list[list[int]]:
    """Query heads of a layer grouped into independent subproblems (networkx connected components).

    Blocks hang off their own head only (contiguity stays inside a head), so the components of the full
    interaction graph are those of the head graph: heads joined by a pair term or a shared KV head.
    """
    num_heads = terms.value.shape[1]
    graph = nx.Graph()
    graph.add_nodes_from(range(num_heads))
    rows, cols = np.nonzero(np.triu(terms.pair[layer], k=1))
    graph.add_edges_from(zip(rows.tolist(), cols.tolist(), strict=True))
    groups = terms.kv_groups[layer]
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g).tolist()
        graph.add_edges_from(zip(members[:-1], members[1:], strict=True))
    return sorted(sorted(c) for c in nx.connected_components(graph))


@dataclass
class Subproblem:
    """One BQM: a set of heads of one layer, with its variables in a fixed order.

    Labels 0..n-1: heads (in `heads` order), then KV heads (`kv` order), then blocks head by head in
    `offdiag_blocks` order.
    """

    variables_doc: ClassVar[str] = (
        "labels 0..n-1: query heads (heads order), KV heads (kv_heads order), then off-diagonal "
        "blocks head by head in numpy.tril_indices(NQB, -1) order"
    )
    layer: int
    heads: list[int]
    kv: list[int]
    linear: np.ndarray  # (n,)
    rows: np.ndarray  # (m,)
    cols: np.ndarray  # (m,)
    quad: np.ndarray  # (m,)
    offset: float

    @property
    def num_variables(self) -> int:
        return len(self.linear)

    def bqm(self) -> dimod.BinaryQuadraticModel:
        return dimod.BinaryQuadraticModel.from_numpy_vectors(
            self.linear, (self.rows, self.cols, self.quad), self.offset, dimod.BINARY
        )

    def energy(self, states: np.ndarray) -> np.ndarray:
        """Energies of states (R, n) {0,1}: the same numbers dimod gives for `self.bqm()`."""
        s = states.astype(np.float64)
        return self.offset + s @ self.linear + (s[:, self.rows] * s[:, self.cols]) @ self.quad


def build_subproblem(
    terms: Terms, layer: int, heads: list[int], lam: float, mu: float = 0.0
) -> Subproblem:
    """The BQM of `heads` of `layer` at block price λ and head price μ (see the module docstring)."""
    _, _, nb = terms.value.shape
    nqb = terms.nqb
    qb, kb = offdiag_blocks(nqb)
    hs = np.asarray(heads, dtype=np.int64)
    k = len(hs)
    groups = terms.kv_groups[layer, hs]
    kv = sorted(set(groups.tolist()))
    kv_pos = {g: k + i for i, g in enumerate(kv)}
    first_block = k + len(kv)
    value = terms.value[layer, hs]  # (k, NB)
    pair = terms.pair[layer][np.ix_(hs, hs)]  # (k, k)
    imp = terms.importance[layer, hs]
    delta, pen, kap = terms.block_penalty, terms.kv_penalty, terms.contiguity

    gamma = terms.coupling[layer, hs] if terms.coupling is not None else None  # (k, P)
    lost = value.sum(1) + (gamma.sum(1) if gamma is not None else 0.0)  # every block dropped
    head_lin = -imp + lost + lam * nqb + mu + pen - pair.sum(1)
    linear = np.concatenate(
        [head_lin, np.full(len(kv), terms.kv_cost), np.full(k * nb, delta)]
    ).astype(np.float64)

    block_ids = first_block + np.arange(k * nb).reshape(k, nb)
    rows = [np.arange(k), np.repeat(np.arange(k), nb)]
    cols = [np.array([kv_pos[g] for g in groups.tolist()], dtype=np.int64), block_ids.reshape(-1)]
    # head–block product: price λ minus value, minus the contiguity reward with the diagonal block
    hb = lam - value - delta - kap * (kb == qb - 1)[None, :]
    if gamma is not None:
        # γ(1 − z_a)(1 − z_b) for a kept head: γ goes to the head, −γ to each head–block product, +γ to
        # the block pair (both blocks are 0 in a dropped head, so the pair needs no head factor)
        hb = hb - row.marginals(gamma, np.ones_like(value), nqb)
    quad = [np.full(k, -pen), hb.reshape(-1)]
    iu, ju = np.triu_indices(k, k=1)
    nz = pair[iu, ju] != 0
    rows.append(iu[nz])
    cols.append(ju[nz])
    quad.append(pair[iu, ju][nz])
    if kap != 0.0:
        # horizontal neighbours (qb, kb)–(qb, kb+1), both off-diagonal
        nxt = np.flatnonzero(kb + 1 < qb)
        left = block_ids[:, nxt].reshape(-1)
        right = block_ids[:, nxt + 1].reshape(-1)
        rows.append(left)
        cols.append(right)
        quad.append(np.full(left.size, -kap))
    if gamma is not None:
        pa, pb = row.row_pairs(nqb)
        nz = gamma != 0
        rows.append(block_ids[:, pa][nz])
        cols.append(block_ids[:, pb][nz])
        quad.append(gamma[nz])
    offset = float(imp.sum() + np.triu(pair, k=1).sum())
    return Subproblem(
        layer=layer,
        heads=hs.tolist(),
        kv=kv,
        linear=linear,
        rows=np.concatenate(rows).astype(np.int64),
        cols=np.concatenate(cols).astype(np.int64),
        quad=np.concatenate(quad).astype(np.float64),
        offset=offset,
    )


def split_state(sub: Subproblem, nb: int, state: np.ndarray) -> tuple[np.ndarray, ...]:
    """A subproblem state (n,) → heads (k,), KV (|kv|,), blocks (k, NB), as bools."""
    k, g = len(sub.heads), len(sub.kv)
    s = state.astype(bool)
    return s[:k], s[k : k + g], s[k + g :].reshape(k, nb)


def join_state(heads: np.ndarray, kv: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    return np.concatenate([heads.reshape(-1), kv.reshape(-1), blocks.reshape(-1)]).astype(np.int8)


def violations(sub: Subproblem, nb: int, state: np.ndarray, kv_groups: np.ndarray) -> int:
    """Blocks kept in a dropped head plus query heads kept with their KV head dropped."""
    x, y, z = split_state(sub, nb, state)
    kv_of = np.array([sub.kv.index(g) for g in kv_groups[sub.layer, sub.heads].tolist()], dtype=int)
    return int((z & ~x[:, None]).sum() + (x & ~y[kv_of]).sum())


def canonical(sub: Subproblem, nb: int, state: np.ndarray, kv_groups: np.ndarray) -> np.ndarray:
    """Clear blocks of dropped heads and keep exactly the KV heads some kept query head needs.

    Never raises the energy: each cleared block saves δ − (contiguity lost) > 0, each fixed KV pair saves
    P − κ_g > 0, and a KV head without kept query heads saves κ_g ≥ 0.
    """
    x, _, z = split_state(sub, nb, state)
    z = z & x[:, None]
    groups = kv_groups[sub.layer, sub.heads]
    y = np.array([bool(x[groups == g].any()) for g in sub.kv])
    return join_state(x, y, z)


def objective(terms: Terms, heads: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Objective (nats, per layer (L,)) of canonical masks: heads (L, H) bool, blocks (L, H, NB) bool.

    KV heads are taken as kept exactly when one of their query heads is; penalties are then zero.
    """
    x = heads.astype(np.float64)
    z = blocks.astype(np.float64) * x[..., None]
    num_layers = x.shape[0]
    lost_heads = (terms.importance * (1.0 - x)).sum(-1)
    lost_blocks = (x * (terms.value * (1.0 - z)).sum(-1)).sum(-1)
    if terms.coupling is not None:
        lost_blocks = lost_blocks + (x * row.energy(terms.coupling, 1.0 - z, terms.nqb)).sum(-1)
    drop = 1.0 - x
    pairs = 0.5 * np.einsum("lh,lhk,lk->l", drop, terms.pair, drop)
    kv_kept = np.zeros(num_layers)
    for layer in range(num_layers):
        kv_kept[layer] = len(set(terms.kv_groups[layer][heads[layer].astype(bool)].tolist()))
    contig = np.zeros(num_layers)
    if terms.contiguity:
        qb, kb = offdiag_blocks(terms.nqb)
        nxt = np.flatnonzero(kb + 1 < qb)
        adjacent = (z[..., nxt] * z[..., nxt + 1]).sum(-1) + (z[..., kb == qb - 1]).sum(-1)
        contig = terms.contiguity * adjacent.sum(-1)
    return lost_heads + lost_blocks + pairs + terms.kv_cost * kv_kept - contig


def computed_blocks(nqb: int, heads: np.ndarray, blocks: np.ndarray) -> int:
    """Causal blocks computed: diagonal of every kept head plus its kept off-diagonal blocks."""
    x = heads.astype(bool)
    return int(x.sum() * nqb + (blocks.astype(bool) & x[..., None]).sum())
