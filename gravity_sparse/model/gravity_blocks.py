"""Which blocks a block-skipping gravity attention computes: static tables per layer, plans per call.

Self-contained (copied next to every checkpoint with modeling_gravity.py): imports only torch.

A layer's block mask (Hq, NB, NB) says which key block each query block of each query head reads. The
block path (gravity_block_attention.py) cuts the work into *units*: one unit is (lane, query block qb),
where a lane is a KV head with some of its kept query heads (G of them), and the unit computes those heads
× the rows of qb against the union of the key blocks they read in row qb, the diagonal block first. A
block that another head of the lane reads but this one does not gets probability 0 (an additive −∞ bias).
Decode uses one lane per KV head (its K/V blocks gathered once for all its heads). Prefill also has one
lane per query head, and chooses per unit: a KV head's unit is split into its heads' own units when the
union would cost more than 1 / `SPLIT_GAIN` times their own blocks (heads of one KV head that read
different blocks), and stays one unit otherwise (dense, or heads that agree). Units of equal width are
sorted by their number of key blocks and cut into *buckets* by a small dynamic programme (padding waste
against a fixed cost per bucket); each bucket is one set of batched matmuls, split into chunks of at most
`MAX_ELEMENTS` scores.

`BlockTables` (static, per layer and mask) also gives, per (KV head g, key block kb), the last query block
that reads kb (−1: none), by which the evicting cache (gravity_cache.py) frees blocks. A layer without a
mask uses the causal all-kept grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# scores (and gathered key/value floats) per chunk: 4 MiB in fp32, so that glibc serves the chunk's tensors
# from its heap; from 32 MiB on it maps fresh pages for each, and page faults then cost more than the work
MAX_ELEMENTS = 1 << 20
BUCKET_NS = 60_000.0  # fixed cost of one bucket (its dozen ops), ns
GATHER_NS = 0.25  # cost of gathering one float, ns
FLOP_NS = 1.0 / 30.0  # one matmul flop, ns
ELEMENT_NS = 1.2  # elementwise work per score (distance, division, softmax), ns
# a unit is split into one unit per head when the heads' own key blocks add up to at most this share of
# (heads × the union's blocks): smaller matmuls and a gather per head cost more than the flops say
SPLIT_GAIN = 0.8


class LaneTables:
    """Per lane and query block: key blocks (diagonal first, then ascending; −1 pads), how many, and
    which of the lane's heads read each. order (L, NB, KM) int32, count (L, NB), reads (L, NB, G, KM)."""

    def __init__(self, grid: torch.Tensor, lanes: list[tuple[int, list[int]]]):
        nb = grid.shape[-1]
        self.kv = [g for g, _ in lanes]
        self.heads = [h for _, h in lanes]
        width = max([len(h) for h in self.heads] + [1])
        per_head = torch.zeros(len(lanes), width, nb, nb, dtype=torch.bool)
        for i, heads in enumerate(self.heads):
            per_head[i, : len(heads)] = grid[heads]
        union = per_head.any(1)
        kb = torch.arange(nb)
        diagonal = kb.view(1, -1) == kb.view(-1, 1)
        key = torch.where(
            diagonal, -1, kb.view(1, -1)
        )  # the diagonal first, even if nobody reads it
        listed = union | diagonal
        key = torch.where(listed, key, nb + 1)
        self.count = listed.sum(-1)
        km = max(int(self.count.max()) if self.count.numel() else 0, 1)
        order = key.argsort(dim=-1, stable=True)[..., :km]
        order = torch.where(torch.arange(km) < self.count.unsqueeze(-1), order, -1)
        idx = order.clamp_min(0).unsqueeze(1).expand(-1, width, -1, -1)
        reads = per_head.gather(3, idx) & (order >= 0).unsqueeze(1)
        self.reads = reads.transpose(1, 2).contiguous()  # (L, NB, G, KM)
        self.order = order.to(torch.int32)
        self.union = union


class BlockTables:
    """Static block tables of one layer (CPU tensors; see the module docstring).

    block_mask (Hq, NB, NB) bool or None (causal, every block kept, on a grid of `num_blocks`);
    head_keep (Hq,) bool or None; kv_groups (Hq,) long. `by_group`: one lane per KV head; `mixed`: those
    lanes and one per head, with the units prefill computes (None when no KV head has two kept heads);
    last_reader (Hkv, NB) long: the last query block that reads (g, kb); −1 if none, NB if every later
    block does (no mask: nothing is ever freed).
    """

    def __init__(
        self,
        block_mask: torch.Tensor | None,
        head_keep: torch.Tensor | None,
        kv_groups: torch.Tensor,
        num_kv_heads: int,
        block_size: int,
        num_blocks: int,
    ):
        groups = kv_groups.detach().to("cpu", torch.long)
        hq = groups.numel()
        keep = torch.ones(hq, dtype=torch.bool) if head_keep is None else head_keep.cpu().bool()
        nb = num_blocks if block_mask is None else int(block_mask.shape[-1])
        tril = torch.ones(nb, nb, dtype=torch.bool).tril()
        grid = tril.expand(hq, nb, nb) if block_mask is None else block_mask.cpu().bool() & tril
        self.block_size, self.num_blocks, self.num_kv_heads = block_size, nb, num_kv_heads
        heads = [[h for h in range(hq) if keep[h] and groups[h] == g] for g in range(num_kv_heads)]
        group_lanes = [(g, h) for g, h in enumerate(heads) if h]
        self.by_group = LaneTables(grid, group_lanes)
        self.mixed: tuple[LaneTables, torch.Tensor] | None = None
        if max([len(h) for h in heads] + [0]) > 1:
            self.mixed = _mixed_lanes(grid, group_lanes, self.by_group.count)
        self.last_reader = torch.full((num_kv_heads, nb), -1, dtype=torch.long)
        rows = torch.arange(nb).view(1, -1, 1)
        for i, g in enumerate(self.by_group.kv):
            self.last_reader[g] = torch.where(self.by_group.union[i : i + 1], rows, -1).amax(1)[0]
        if block_mask is None:  # every later query reads every block
            self.last_reader = torch.where(self.last_reader >= 0, nb, -1)

    def check_length(self, seq_len: int) -> None:
        if (seq_len - 1) // self.block_size >= self.num_blocks:
            raise ValueError(
                f"sequence of {seq_len} tokens is longer than the block mask ({self.num_blocks} blocks "
                f"of {self.block_size} = {self.num_blocks * self.block_size} tokens)"
            )


def _mixed_lanes(grid, group_lanes, union_count) -> tuple[LaneTables, torch.Tensor]:
    """Lanes for prefill: the KV-head lanes, then one lane per head; and for each (lane, query block) unit
    whether it is split, i.e. runs as its heads' own lanes (the union wastes too much) or as one unit.
    Returns (tables, use (L, NB) bool: which of the lanes' units the plan computes)."""
    head_lanes = [(g, [h]) for g, hs in group_lanes for h in hs]
    lanes = LaneTables(grid, group_lanes + head_lanes)
    ng = len(group_lanes)
    use = torch.zeros(len(lanes.kv), union_count.shape[-1], dtype=torch.bool)
    j = ng
    for i, (_, hs) in enumerate(group_lanes):
        own = lanes.count[j : j + len(hs)]
        split = (own.sum(0) <= SPLIT_GAIN * len(hs) * union_count[i]) & (len(hs) > 1)
        use[i] = ~split
        use[j : j + len(hs)] = split
        j += len(hs)
    return lanes, use


@dataclass
class Bucket:
    """One batched piece of work: n units of G heads × R rows against K key blocks of `block` keys."""

    heads: torch.Tensor  # (n, G) long: query heads
    rows: torch.Tensor  # (n, R) long: query rows (index into the call's queries; S = padding row)
    blocks: torch.Tensor  # (n, K) long: key block ids (logical; num_blocks = padding)
    slots: (
        torch.Tensor
    )  # (n, K) long: where those blocks sit in the key store (padding: the zero block)
    hidden: torch.Tensor | None  # (n, G, 1, K · block) bool: this head does not read this key
    block_start: torch.Tensor  # (n, 1) long: first position of the unit's query block (= slot 0)
    empty_rows: bool = False  # a head skips its diagonal block: a row may have nothing allowed
    # the query heads of `heads`, host-side (read without a device sync)
    head_ids: frozenset = frozenset()
    memo: dict = field(default_factory=dict)

    def causal(self, q_start: int, seq_len_q: int, block_size: int, dtype) -> torch.Tensor:
        """(n or 1, 1, R, block): −∞ on the keys of the diagonal block (slot 0) after each row, else 0
        (padding rows: 0). An additive bias: cheaper on CPU than a broadcast masked_fill."""
        if seq_len_q == 1:  # decode: one row, all units in one query block; one bias per offset
            rows = self.memo.get(("decode", dtype))
            if rows is None:
                tri = torch.full((block_size, block_size), float("-inf"), dtype=dtype).triu(1)
                rows = [r.view(1, 1, 1, -1).to(self.rows.device) for r in tri]
                self.memo[("decode", dtype)] = rows
            return rows[q_start % block_size]
        key = ("causal", q_start, seq_len_q, dtype)
        if key not in self.memo:
            in_block = (q_start + self.rows - self.block_start).unsqueeze(-1)
            cols = torch.arange(block_size, device=self.rows.device)
            tri = (cols > in_block) & (self.rows < seq_len_q).unsqueeze(-1)  # (n, R, block)
            if bool((tri == tri[:1]).all()):  # aligned blocks: one pattern for every unit
                tri = tri[:1]
            bias = torch.zeros(tri.shape, dtype=dtype, device=tri.device)
            self.memo = {k: v for k, v in self.memo.items() if k[0] != "causal"}
            self.memo[key] = bias.masked_fill_(tri, float("-inf")).unsqueeze(1)
        return self.memo[key]

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(1, n, G, 1, K · block): −∞ where the head does not read the key, else 0 (None: all read)."""
        if self.hidden is None:
            return None
        key = ("bias", dtype)
        if key not in self.memo:
            zero = torch.zeros(self.hidden.shape, dtype=dtype, device=self.hidden.device)
            self.memo[key] = zero.masked_fill_(self.hidden, float("-inf")).unsqueeze(0)
        return self.memo[key]


def _cut(counts: list[int], weight: float, fixed: float) -> list[int]:
    """Bucket ends over ascending `counts`: minimise Σ (units × max count × weight + fixed)."""
    distinct = sorted(set(counts))
    mult = [counts.count(c) for c in distinct]
    d = len(distinct)
    best, cut = [0.0] * (d + 1), [0] * (d + 1)
    for j in range(1, d + 1):
        units, best[j] = 0, float("inf")
        for i in range(j, 0, -1):
            units += mult[i - 1]
            cost = best[i - 1] + units * distinct[j - 1] * weight + fixed
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    ends, j = [], d
    while j > 0:
        ends.append(distinct[j - 1])
        j = cut[j]
    return sorted(ends)


def _layout(lanes: LaneTables, units: list, r: int, bs: int, batch: int, head_dim: int):
    """[(width, units sorted by count, counts, bucket ends)] and the estimated cost, ns."""
    by_width: dict[int, list] = {}
    for u in units:
        by_width.setdefault(len(lanes.heads[u[0]]), []).append(u)
    layout, total = [], 0.0
    for width, members in sorted(by_width.items()):
        counts = [int(lanes.count[i, qb]) for i, qb in members]
        pairs = sorted(zip(counts, members, strict=True))
        counts, members = [c for c, _ in pairs], [m for _, m in pairs]
        scores = width * r * bs * batch  # per key block of one unit
        per_block = scores * (4 * head_dim * FLOP_NS + ELEMENT_NS) + 2 * bs * head_dim * GATHER_NS
        ends = _cut(counts, per_block, BUCKET_NS)
        lo = 0
        for top in ends:
            hi = lo
            while hi < len(counts) and counts[hi] <= top:
                hi += 1
            total += (hi - lo) * top * per_block + BUCKET_NS
            lo = hi
        layout.append((width, members, counts, ends))
    return layout, total


def make_plan(
    tables: BlockTables,
    q_start: int,
    seq_len_q: int,
    slot_of_block: torch.Tensor,
    zero_slot: int,
    batch: int,
    head_dim: int,
    device: torch.device,
    max_elements: int = MAX_ELEMENTS,
) -> list[Bucket]:
    """Buckets for the queries at positions q_start … q_start + seq_len_q − 1.

    slot_of_block (Hkv, NB) long: index of (g, kb) in the flattened key store (−1: not held; every
    block a query reads must be held). zero_slot: an all-zero block of the store.
    """
    bs, nb = tables.block_size, tables.num_blocks
    end = q_start + seq_len_q
    qbs = range(q_start // bs, (end - 1) // bs + 1)
    r = min(bs, seq_len_q, max(min((qb + 1) * bs, end) - max(qb * bs, q_start) for qb in qbs))
    lanes = tables.by_group
    units = [(i, qb) for i in range(len(lanes.kv)) for qb in qbs]
    if tables.mixed is not None and r > 1:  # decode reads each K/V block once per KV head
        lanes, use = tables.mixed
        units = [(i, qb) for i in range(len(lanes.kv)) for qb in qbs if use[i, qb]]
    layout, _ = _layout(lanes, units, r, bs, batch, head_dim)
    slot_map = torch.cat([slot_of_block.cpu(), torch.full((tables.num_kv_heads, 1), -1)], 1)
    buckets = []
    for width, members, counts, ends in layout:
        lo = 0
        for top in ends:
            hi = lo
            while hi < len(counts) and counts[hi] <= top:
                hi += 1
            per_unit = max(width * r, 2 * head_dim) * top * bs * batch  # scores, gathered K and V
            step = max(1, max_elements // per_unit)
            for a in range(lo, hi, step):
                chunk = members[a : min(a + step, hi)]
                buckets.append(_bucket(lanes, nb, bs, chunk, top, r, slot_map, q_start, seq_len_q))
            lo = hi
    for b in buckets:
        if bool(((b.slots < 0) & b.read).any()):
            raise RuntimeError(
                "gravity block attention: a key block that a query reads was evicted"
            )
        b.slots = torch.where(b.read, b.slots, zero_slot)
    return [_to(b, device) for b in buckets]


def _bucket(lanes, nb, bs, chunk, k, r, slot_map, q_start, s) -> Bucket:
    lane = torch.tensor([i for i, _ in chunk])
    qb = torch.tensor([q for _, q in chunk])
    heads = torch.tensor([lanes.heads[i] for i, _ in chunk], dtype=torch.long)
    order = lanes.order[lane, qb, :k].long()
    blocks = torch.where(order >= 0, order, nb)
    kv = torch.tensor(lanes.kv)[lane]
    slots = slot_map[kv.view(-1, 1), blocks]
    reads = lanes.reads[lane, qb, : heads.shape[1], :k]  # (n, G, K)
    hidden = ~reads
    first = (torch.clamp(qb * bs, min=q_start) - q_start).view(-1, 1)
    n_rows = (torch.clamp((qb + 1) * bs, max=q_start + s) - q_start).view(-1, 1) - first
    offs = torch.arange(r).view(1, -1)
    rows = torch.where(offs < n_rows, first + offs, s)  # s: the zero padding row
    if bool(hidden.any()):
        n, g = heads.shape
        hidden = hidden.unsqueeze(-1).expand(n, g, k, bs).reshape(n, g, 1, k * bs)
    else:
        hidden = None
    b = Bucket(
        heads, rows, blocks, slots, hidden, qb.view(-1, 1) * bs, not bool(reads[:, :, 0].all())
    )
    b.read = reads.any(1)  # some head of the unit reads the block: it must be held
    return b


def _to(b: Bucket, device: torch.device) -> Bucket:
    def move(t):
        return None if t is None else t.to(device)

    return Bucket(
        move(b.heads), move(b.rows), move(b.blocks), move(b.slots), move(b.hidden),
        move(b.block_start), b.empty_rows, frozenset(b.heads.flatten().tolist()),
    )  # fmt: skip
