"""Masks (format, density, validation, extension), attaching them, pruning heads, exporting."""

import pytest
import torch
from tiny_models import random_masks, tiny_model

from gravity_sparse import load_model, save_model
from gravity_sparse.errors import UserError
from gravity_sparse.model.masks import (
    attach_masks,
    dense_masks,
    detach_masks,
    extend_masks,
    read_masks,
    write_masks,
)
from gravity_sparse.stages.s5_export.export import model_costs, prune_model


def test_density_by_hand():
    m = dense_masks(2, 3, block_size=8, max_length=32)  # 4 blocks → 10 causal blocks per head
    assert m.density() == 1.0
    m.block_mask[0, 0, 3, 0] = False
    m.head_keep[1, 2] = False
    m.block_mask[1, 2] = False
    assert m.density() == pytest.approx((60 - 1 - 10) / 60)


def test_write_read_round_trip(tmp_path):
    m = random_masks()
    write_masks(m, tmp_path / "m.safetensors")
    r = read_masks(tmp_path / "m.safetensors")
    assert torch.equal(r.head_keep, m.head_keep) and torch.equal(r.block_mask, m.block_mask)
    assert (r.block_size, r.max_length) == (16, 64) and r.density() == pytest.approx(m.density())


@pytest.mark.parametrize(
    "breaking,message",
    [
        (lambda m: m.block_mask[0, 0, 0, 2].fill_(True), "above the diagonal"),
        (lambda m: m.block_mask[0, 0, 2, 2].fill_(False), "misses a diagonal"),
        (lambda m: m.block_mask[0, 1, 1, 1].fill_(True), "dropped head still has"),
    ],
)
def test_invalid_masks_are_refused(tmp_path, breaking, message):
    m = random_masks()
    breaking(m)
    with pytest.raises(UserError, match=message):
        write_masks(m, tmp_path / "bad.safetensors")


def test_corrupt_masks_file(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read masks file"):
        read_masks(p)


def test_extension_keeps_offsets_and_anchors():
    m = random_masks(nb=4)
    m.block_mask[0, 0, 3] = torch.tensor([True, False, True, True])  # anchor col 0, offsets 0 and 1
    ext = extend_masks(m, 7 * 16)
    assert ext.block_mask.shape[-1] == 7
    assert torch.equal(ext.block_mask[..., :4, :4], m.block_mask)
    for r in range(4, 7):
        assert ext.block_mask[0, 0, r].nonzero().flatten().tolist() == [0, r - 1, r]
    assert not ext.block_mask[1].any()  # dropped heads stay empty
    ext.check()


def test_attach_changes_output_and_detach_restores(model):
    x = torch.randint(0, 256, (2, 60))
    dense = model(x).logits
    attach_masks(model, random_masks())
    sparse = model(x).logits
    assert (sparse - dense).abs().max() > 1e-3
    detach_masks(model)
    assert torch.equal(model(x).logits, dense)


def test_masks_of_another_shape(model):
    with pytest.raises(UserError, match="masks are for a model of 3 layers × 4 heads"):
        attach_masks(model, dense_masks(3, 4, 16, 64))


def test_sequence_longer_than_masks(model):
    attach_masks(model, random_masks())
    with pytest.raises(ValueError, match="longer than the block mask"):
        model(torch.randint(0, 256, (1, 65)))


def test_prune_matches_sparse_model_and_generates(tmp_path):
    model = tiny_model(seed=1)
    masks = random_masks()  # layer 1 keeps no head at all; layer 0 keeps 3 of 4
    attach_masks(model, masks)
    pruned = prune_model(model, masks)
    cfg = pruned.config
    assert cfg.num_attention_heads_per_layer == [3, 0]
    assert cfg.num_key_value_heads_per_layer == [2, 0]  # KV head 0 keeps head 0, KV 1 keeps 2 and 3
    assert cfg.gravity_head_groups == [[0, 1, 1], []]
    x = torch.randint(0, 256, (2, 50))
    with torch.no_grad():
        assert torch.allclose(pruned(x).logits, model(x).logits, atol=1e-5)
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=258)
        cached = pruned.generate(x[:, :5], use_cache=True, **kw)
        assert torch.equal(cached, pruned.generate(x[:, :5], use_cache=False, **kw))
        assert torch.equal(cached, model.generate(x[:, :5], use_cache=True, **kw))
    out = save_model(pruned, None, tmp_path / "pruned")
    again, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(again(x).logits, pruned(x).logits)
    dense_cost, pruned_cost = model_costs(tiny_model(seed=1), 64), model_costs(again, 64)
    assert pruned_cost["parameters"] < dense_cost["parameters"]
    assert pruned_cost["kv_cache_bytes_per_token"] == dense_cost["kv_cache_bytes_per_token"] // 2
    assert pruned_cost["attention_flops_per_token"] < dense_cost["attention_flops_per_token"]


def test_prune_builds_the_new_model_in_the_models_dtype(monkeypatch):
    """A bf16 model is pruned into a model built in bf16 (no fp32 copy: 12 GB at Gravity-2), and the
    default dtype is restored afterwards."""
    from gravity_sparse.model.modeling_gravity import GravityForCausalLM
    from gravity_sparse.stages.s5_export import export as export_mod

    model = tiny_model(seed=1).to(torch.bfloat16)
    masks = random_masks()
    seen = []
    real_init = GravityForCausalLM.__init__

    def init(self, config):
        seen.append(torch.get_default_dtype())
        real_init(self, config)

    monkeypatch.setattr(GravityForCausalLM, "__init__", init)
    pruned = export_mod.prune_model(model, masks)
    assert seen == [torch.bfloat16]
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
