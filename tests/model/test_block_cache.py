"""The evicting KV cache (`GravityBlockCache`): generate with eviction equals generate without it, token for
token, on the bundled tiny model and on the Gravity-2 head layout (9 q / 3 kv heads, head_dim 64); blocks no
later query reads are really freed; the bytes held follow the mask, not the context."""

import pytest
import torch
from test_generate import gqa_model
from tiny_models import local_masks, tiny_model
from transformers import DynamicCache

from gravity_sparse import load_model
from gravity_sparse.model import gravity_blocks
from gravity_sparse.model.data import split_text
from gravity_sparse.model.gravity_cache import GravityBlockCache
from gravity_sparse.model.masks import Masks, attach_masks, extend_masks
from gravity_sparse.model.modeling_gravity import cache_kwarg
from gravity_sparse.stages.s5_export.export import prune_model


@torch.no_grad()
def greedy(model, x, steps, cache, attention_mask=None):
    out = model(x, attention_mask=attention_mask, use_cache=True, **cache_kwarg(cache))
    seq, mask = x, attention_mask
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        seq = torch.cat([seq, nxt], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(nxt, attention_mask=mask, use_cache=True, **cache_kwarg(cache))
    return seq


def _dynamic_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@pytest.fixture(scope="module")
def tiny_sparse():
    """The bundled tiny model (4 layers, 8 q / 2 kv heads), pruned with local masks (blocks of 16)."""
    model, tok = load_model()
    masks = local_masks(4, 8, 32, 16, drop=((0, 3), (1, 0), (2, 5), (2, 6), (3, 1)), extra=0.0)
    return prune_model(model, masks), tok


def test_tiny_model_generates_the_same_with_and_without_eviction(tiny_sparse):
    model, tok = tiny_sparse
    x = tok(split_text("heldout")[1000:1300], return_tensors="pt").input_ids[:, :200]
    keep = DynamicCache(config=model.config)
    evict = GravityBlockCache(config=model.config)
    want = greedy(model, x, 60, keep)
    got = greedy(model, x, 60, evict)
    assert len(set(want[0, x.shape[1] :].tolist())) > 3
    assert torch.equal(got, want)
    # most blocks are gone: a window of 2 blocks, a sink and a few others per KV head
    assert evict.held_bytes() < 0.4 * _dynamic_bytes(keep), (
        evict.held_bytes(),
        _dynamic_bytes(keep),
    )
    # and generate() picks the evicting cache by itself, with the same tokens
    out = model.generate(x, max_new_tokens=60, do_sample=False, return_dict_in_generate=True)
    cache = out.get("cache", out.get("past_key_values"))
    assert isinstance(cache, GravityBlockCache)
    assert torch.equal(out.sequences, want)


def _gqa_sparse():
    model = gqa_model()  # 2 layers, 9 q / 3 kv heads, head_dim 64, sharp attention
    masks = local_masks(2, 9, 16, 4, window=2, drop=((0, 4), (1, 0), (1, 1), (1, 2)), seed=1)
    return model, masks


def test_gqa_layout_generates_the_same_with_and_without_eviction():
    model, masks = _gqa_sparse()
    x = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(5))
    for m in (prune_model(model, masks), attach_masks(model, masks, kernel="cpu")):
        want = greedy(m, x, 30, DynamicCache(config=m.config))
        cache = GravityBlockCache(config=m.config)
        got = greedy(m, x, 30, cache)
        assert torch.equal(got, want)
        uncached = m.generate(x, max_new_tokens=30, do_sample=False, use_cache=False)
        assert torch.equal(uncached, want)
        assert cache.get_seq_length() == 51
    # the in-pipeline model keeps the KV head of the dropped group: it stores nothing for it
    layer = cache.layers[1]
    assert int((layer.slots[0] >= 0).sum()) == 0 and int((layer.slots[1] >= 0).sum()) > 0


def test_left_padded_batch_generates_the_same_with_and_without_eviction():
    model, masks = _gqa_sparse()
    model = prune_model(model, masks)
    x = torch.randint(0, 256, (3, 19), generator=torch.Generator().manual_seed(6))
    attention_mask = torch.ones_like(x)
    attention_mask[0, :6] = 0
    attention_mask[2, :1] = 0
    kw = dict(max_new_tokens=25, do_sample=False, pad_token_id=258, attention_mask=attention_mask)
    want = model.generate(x, cache=DynamicCache(config=model.config), **kw)
    got = model.generate(x, **kw)  # the evicting cache
    assert torch.equal(got, want)
    alone = model.generate(x[1:2], max_new_tokens=25, do_sample=False, pad_token_id=258)
    assert torch.equal(got[1:2], alone)


def test_chunked_prefill_through_the_evicting_cache_matches_one_forward():
    model, masks = _gqa_sparse()
    model = prune_model(model, masks)
    x = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(7))
    cache = GravityBlockCache(config=model.config)
    with torch.no_grad():
        full = model(x).logits
        parts = [model(x[:, a:b], use_cache=True, **cache_kwarg(cache)).logits
                 for a, b in ((0, 13), (13, 14), (14, 33), (33, 50))]  # fmt: skip
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_beam_search_with_the_evicting_cache_equals_the_dynamic_cache():
    model, masks = _gqa_sparse()
    model = prune_model(model, masks)
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=12, do_sample=False, num_beams=3, pad_token_id=258)
    want = model.generate(x, cache=DynamicCache(config=model.config), **kw)
    assert torch.equal(model.generate(x, **kw), want)


def test_bytes_held_follow_the_mask_not_the_context():
    """A sliding pattern extended past its length (the diagonal rule): the cache stops growing."""
    torch.manual_seed(0)
    model = tiny_model(seed=2, max_position_embeddings=1024)
    masks = local_masks(2, 4, 8, 16, window=2, drop=((1, 3),), extra=0.0)
    masks = extend_masks(masks, 1024)
    model = prune_model(model, masks)
    cache = GravityBlockCache(config=model.config)
    held = {}
    x = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in range(1, 700):
            model(x, use_cache=True, **cache_kwarg(cache))
            if n in (256, 400, 699):
                held[n] = cache.held_bytes()
    block_bytes = 16 * 16 * 4 * 2  # block × head_dim × fp32 × (K and V), per KV head
    assert held[699] == held[400]  # a sink, a window of 2 blocks, the open block: no growth
    assert held[699] <= 2 * 2 * 6 * block_bytes  # 2 layers × 2 KV heads × a few blocks
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.zeros(1, 699, dtype=torch.long), use_cache=True, **cache_kwarg(dense))
    assert held[699] < _dynamic_bytes(dense) / 8


def test_a_block_freed_too_early_is_caught(monkeypatch):
    model, masks = _gqa_sparse()
    model = prune_model(model, masks)
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(9))
    real = gravity_blocks.BlockTables.__init__

    def early(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.last_reader = self.last_reader - 1  # frees every block one query block too soon

    monkeypatch.setattr(gravity_blocks.BlockTables, "__init__", early)
    with pytest.raises(RuntimeError, match="evicted"):
        greedy(model, x, 10, GravityBlockCache(config=model.config))


def test_generate_keeps_a_cache_it_is_given_and_dense_models_keep_the_dynamic_cache():
    model, masks = _gqa_sparse()
    sparse = prune_model(model, masks)
    x = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=258)
    given = DynamicCache(config=sparse.config)
    out = sparse.generate(x, cache=given, **kw)
    assert out.get("cache", out.get("past_key_values")) is given
    out = model.generate(x, **kw)
    assert type(out.get("cache", out.get("past_key_values"))) is DynamicCache
    attach_masks(model, masks, kernel="reference")  # a kernel that cannot read block stores
    out = model.generate(x, **kw)
    assert type(out.get("cache", out.get("past_key_values"))) is DynamicCache


def test_two_caches_on_one_model_do_not_mix():
    """Plans are cached per mapping version; versions are unique across caches."""
    model, masks = _gqa_sparse()
    model = prune_model(model, masks)
    # different histories (a short prompt decoded far, a long prompt) reach the same query blocks
    xs = [
        torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in (13, 37)
    ]
    want = [greedy(model, x, 24, DynamicCache(config=model.config)) for x in xs]
    caches = [GravityBlockCache(config=model.config) for _ in xs]
    seqs, outs = list(xs), []
    with torch.no_grad():
        for x, c in zip(xs, caches, strict=True):
            outs.append(model(x, use_cache=True, **cache_kwarg(c)))
        for _ in range(24):  # one step of each, in turn
            for i, c in enumerate(caches):
                nxt = outs[i].logits[:, -1:].argmax(-1)
                seqs[i] = torch.cat([seqs[i], nxt], 1)
                outs[i] = model(nxt, use_cache=True, **cache_kwarg(c))
    assert all(torch.equal(s, w) for s, w in zip(seqs, want, strict=True))


def test_new_masks_on_a_model_take_effect():
    """Tables are rebuilt when a layer's masks change (a new tensor, or the same one changed in place)."""
    model = tiny_model(seed=3)
    x = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    first = local_masks(2, 4, 4, 16, window=1, extra=0.0)
    second = local_masks(2, 4, 4, 16, window=4, extra=0.0)
    outs = {}
    with torch.no_grad():
        for kernel in ("reference", "cpu"):
            for name, masks in (("first", first), ("second", second)):
                copy = Masks(
                    masks.head_keep.clone(), masks.block_mask.clone(), 16, masks.max_length
                )
                attach_masks(model, copy, kernel=kernel)
                outs[kernel, name] = model(x).logits
            attn = model.gravity_layers()[0]
            attn.gravity_block_mask[:, 3, 0] = False  # in place
            outs[kernel, "changed"] = model(x).logits
    for name in ("first", "second", "changed"):
        torch.testing.assert_close(outs["cpu", name], outs["reference", name], rtol=1e-4, atol=1e-4)
    assert (outs["cpu", "first"] - outs["cpu", "second"]).abs().max() > 1e-3
    assert (outs["cpu", "changed"] - outs["cpu", "second"]).abs().max() > 1e-4


def test_bf16_generates_the_same_with_and_without_eviction():
    model, masks = _gqa_sparse()
    model = prune_model(model, masks).to(torch.bfloat16)
    x = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(12))
    cache = GravityBlockCache(config=model.config)
    got = greedy(model, x, 20, cache)
    assert cache.layers[0].keys.dtype == torch.bfloat16  # the store keeps the model's dtype
    assert torch.equal(got, greedy(model, x, 20, DynamicCache(config=model.config)))


def test_decode_steps_give_the_same_numbers_with_and_without_eviction():
    """A decode step shifts by the mean of the blocks it reads, which are the same in a full cache and in
    an evicting one (unwritten rows zero in both): the logits are equal, not just close."""
    model, masks = _gqa_sparse()
    model = prune_model(model, masks)
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(13))
    caches = (DynamicCache(config=model.config), GravityBlockCache(config=model.config))
    with torch.no_grad():
        for c in caches:
            model(x[:, :9], use_cache=True, **cache_kwarg(c))
        for i in range(9, 30):
            keep, evict = (
                model(x[:, i : i + 1], use_cache=True, **cache_kwarg(c)).logits for c in caches
            )
            assert torch.equal(keep, evict), i
