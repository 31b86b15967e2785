"""A KV cache that forgets what no query will read: `GravityBlockCache`, a transformers `Cache`.

Self-contained (copied next to every checkpoint with modeling_gravity.py): imports only torch,
transformers and the sibling gravity_blocks.py.

A block-sparse layer's mask is static, so the cache knows in advance which key blocks every later query
reads: key block kb of KV head g is read last by query block `last_reader[g, kb]` (the largest row of
the mask where any kept query head of g keeps kb; masks extended beyond their length by the "diagonal"
rule carry that rule in their rows). Once the queries have passed that row, no present or future row of
any query head of g reads the block, and the cache frees it. A KV head whose query heads are all dropped
stores nothing. A model without masks keeps everything (every later query reads every block).

Storage per layer: one block store per K and V, (B, Hkv · capacity + 1, block, D), where (g, slot)
lives at g · capacity + slot and the last block is all zeros (padding); `slot_of_block[g, kb]` says where
block kb of head g is (−1: not held). Freed slots are reused by new blocks; the store grows by an eighth
when a head has no free slot and is compacted when at most half of it is in use, so the bytes held follow
the blocks held. `held_bytes()` is what the cache holds in memory (K and V stores), `live_bytes()` the
blocks in use.

Filled by GravityAttention through `update_blocks` (a prefill into an empty cache keeps only the blocks
later rows read; later calls write their tokens, attend through the store, then free); `generate()` uses
it as any other cache (`get_seq_length`, `get_mask_sizes` count every position seen). Beam search and
batch selection index the batch dimension; `crop` (assisted decoding) is not supported, since freed
blocks cannot come back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.cache_utils import Cache, DynamicLayer

from .gravity_blocks import BlockTables

_VERSIONS = itertools.count(1)  # mapping versions, unique across caches (plans are cached by them)


@dataclass
class BlockView:
    """The store as one attention call sees it (the mapping before this call's frees)."""

    keys: torch.Tensor  # (B, Hkv · capacity + 1, block, D)
    values: torch.Tensor
    slot_of_block: torch.Tensor  # (Hkv, NB) long: flat store index of (g, kb); −1 = not held
    zero_slot: int
    length: int  # positions seen, this call's included
    version: int  # changes whenever the mapping does
    num_kv_heads: int


class GravityBlockLayer(DynamicLayer):
    """One layer of `GravityBlockCache` (see the module docstring)."""

    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.length, self.version, self.capacity, self.freed_upto = 0, next(_VERSIONS), 0, 0
        self.slots: torch.Tensor | None = None  # (Hkv, NB) long: slot of (g, kb) (not flat), −1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        bsz, hkv, _, d = key_states.shape
        self.device, self.dtype, self.num_kv_heads = key_states.device, key_states.dtype, hkv
        self.keys = key_states.new_zeros(bsz, 1, 1, d)
        self.values = value_states.new_zeros(bsz, 1, 1, d)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "GravityBlockCache is filled by gravity attention layers (update_blocks), not by update()"
        )

    # ---- bookkeeping ------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("GravityBlockCache cannot be cropped: freed blocks are gone")

    def _index_batch(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices, ...])

    def held_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def live_bytes(self) -> int:
        if self.slots is None:
            return 0
        per_block = self.keys[:, :1].nbytes + self.values[:, :1].nbytes
        return int((self.slots >= 0).sum()) * per_block

    # ---- the store --------------------------------------------------------------------------------
    def _flat(self) -> torch.Tensor:
        """(Hkv, NB) long: flat store index of every held block, −1 elsewhere (kept per version)."""
        if self.__dict__.get("_flat_version") != self.version:
            base = torch.arange(self.num_kv_heads).view(-1, 1) * self.capacity
            self._flat_cache = torch.where(self.slots >= 0, base + self.slots, -1)
            self._flat_version = self.version
        return self._flat_cache

    def _resize(self, capacity: int) -> None:
        """New stores of `capacity` slots per head; held blocks keep their order, packed from slot 0."""
        bsz, _, bs, d = self.keys.shape
        hkv = self.num_kv_heads
        held = self.slots >= 0
        rank = held.long().cumsum(1) - 1  # new slot of each held block, in block order
        new_slots = torch.where(held, rank, -1)
        src = self._flat()[held]
        dst = (torch.arange(hkv).view(-1, 1) * capacity + rank)[held]
        stores = []
        for old in (self.keys, self.values):
            new = old.new_zeros(bsz, hkv * capacity + 1, bs, d)
            if src.numel():
                new.index_copy_(1, dst.to(self.device), old.index_select(1, src.to(self.device)))
            stores.append(new)
        self.keys, self.values = stores
        self.capacity, self.slots = capacity, new_slots
        self.free = [
            sorted(set(range(capacity)) - set(new_slots[g][held[g]].tolist()), reverse=True)
            for g in range(hkv)
        ]
        self.version = next(_VERSIONS)

    def _allocate(self, g: int, kb: int) -> None:
        if not self.free[g]:
            self._resize(self.capacity + max(2, self.capacity // 8))
        slot = self.free[g].pop()
        self.slots[g, kb] = slot
        flat = g * self.capacity + slot
        self.keys[:, flat].zero_()
        self.values[:, flat].zero_()
        self.version = next(_VERSIONS)

    def update_blocks(
        self, key_states: torch.Tensor, value_states: torch.Tensor, tables: BlockTables
    ) -> BlockView | None:
        """Store this call's keys/values (B, Hkv, s, D) and free what no later row reads.

        Returns None when the cache was empty (the call attends to its own keys/values directly and the
        cache keeps only the blocks later rows read), else the store as this call's queries see it.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        bsz, hkv, s, d = key_states.shape
        bs, nb = tables.block_size, tables.num_blocks
        l0, l1 = self.length, self.length + s
        tables.check_length(l1)
        if self.slots is None:
            self.slots = torch.full((hkv, nb), -1, dtype=torch.long)
            self.free = [[] for _ in range(hkv)]
            self.keys = key_states.new_zeros(bsz, 1, bs, d)
            self.values = value_states.new_zeros(bsz, 1, bs, d)
        elif nb > self.slots.shape[1]:  # a layer without a mask: its all-kept grid grew
            self.slots = F.pad(self.slots, (0, nb - self.slots.shape[1]), value=-1)
            self.version = next(_VERSIONS)
        reader = tables.last_reader
        self.length = l1
        if l0 == 0:
            self._prefill(key_states, value_states, reader, bs, l1)
            return None
        for kb in range(-(-l0 // bs), (l1 - 1) // bs + 1):  # blocks this call opens
            for g in range(hkv):
                if reader[g, kb] >= kb and self.slots[g, kb] < 0:
                    self._allocate(g, kb)
        slot_flat = self._flat()
        pos = torch.arange(l0, l1)
        flat = slot_flat[:, pos // bs]  # (Hkv, s)
        dst = (flat * bs + pos % bs).flatten()
        keep = flat.flatten() >= 0
        if not bool(keep.all()):  # a KV head that stores nothing (all its query heads dropped)
            src, dst = keep.nonzero().squeeze(1).to(self.device), dst[keep]
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            new = new.reshape(bsz, hkv * s, d)
            store.view(bsz, -1, d).index_copy_(
                1, dst.to(self.device), new if bool(keep.all()) else new[:, src]
            )
        view = BlockView(
            self.keys, self.values, slot_flat, hkv * self.capacity, l1, self.version, hkv
        )
        self._free(reader, l1 // bs)
        return view

    def _prefill(self, k, v, reader, bs, l1) -> None:
        bsz, hkv, _, d = k.shape
        nbk = -(-l1 // bs)
        need = (reader[:, :nbk] >= l1 // bs) & (reader[:, :nbk] >= 0)  # (Hkv, nbk)
        self.freed_upto = l1 // bs
        count = need.sum(1)
        capacity = int(count.max()) + 1  # room for the next block; growth is by an eighth
        rank = need.long().cumsum(1) - 1
        self.slots[:, :nbk] = torch.where(need, rank, -1)
        self.capacity, self.version = capacity, next(_VERSIONS)
        self.free = [list(range(capacity - 1, int(count[g]) - 1, -1)) for g in range(hkv)]
        src = (torch.arange(hkv).view(-1, 1) * nbk + torch.arange(nbk))[need].to(self.device)
        dst = (torch.arange(hkv).view(-1, 1) * capacity + rank)[need].to(self.device)
        stores = []
        for x in (k, v):
            blocks = F.pad(x, (0, 0, 0, nbk * bs - l1)).reshape(bsz, hkv * nbk, bs, d)
            new = x.new_zeros(bsz, hkv * capacity + 1, bs, d)
            new.index_copy_(1, dst, blocks.index_select(1, src))
            stores.append(new)
        self.keys, self.values = stores

    def _free(self, reader: torch.Tensor, first_row: int) -> None:
        """Free the blocks whose last reader is before query block `first_row`; compact if half empty."""
        if first_row <= self.freed_upto:
            return
        self.freed_upto = first_row
        gone = (self.slots >= 0) & (reader[:, : self.slots.shape[1]] < first_row)
        if not bool(gone.any()):
            return
        for g, kb in gone.nonzero().tolist():
            self.free[g].append(int(self.slots[g, kb]))
        self.slots[gone] = -1
        self.version = next(_VERSIONS)
        live = int((self.slots >= 0).sum(1).max())
        if self.capacity > 8 and live <= self.capacity // 2:
            self._resize(live + max(2, live // 8))

    def skip(self, num_tokens: int) -> None:
        """A layer without query heads stores nothing but counts the positions."""
        self.length += num_tokens


class GravityBlockCache(Cache):
    """The evicting KV cache of gravity models with block masks; `generate()` uses it unchanged.

    `GravityForCausalLM.generate` picks it by default for a model with block masks (pass a
    `DynamicCache` to keep everything). `held_bytes()`: bytes the cache holds (K and V stores, all
    layers); `live_bytes()`: the part in use.
    """

    def __init__(self, config=None, num_layers: int | None = None, **kwargs):
        if num_layers is None and config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is None:
            super().__init__(layer_class_to_replicate=GravityBlockLayer)
        else:
            super().__init__(layers=[GravityBlockLayer() for _ in range(num_layers)])

    def layer(self, layer_idx: int) -> GravityBlockLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(GravityBlockLayer())
        return self.layers[layer_idx]

    def held_bytes(self) -> int:
        return sum(layer.held_bytes() for layer in self.layers)

    def live_bytes(self) -> int:
        return sum(layer.live_bytes() for layer in self.layers)
