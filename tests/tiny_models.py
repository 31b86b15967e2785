"""Tiny gravity models built in-process (tests import them from here: `from tiny_models import ...`)."""

import torch

from gravity_sparse.model.configuration_gravity import GravityConfig
from gravity_sparse.model.masks import Masks
from gravity_sparse.model.modeling_gravity import GravityForCausalLM


def tiny_config(**overrides) -> GravityConfig:
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=259,
        max_position_embeddings=512,
        pad_token_id=258,
    )
    kwargs.update(overrides)
    return GravityConfig(**kwargs)


def tiny_model(
    seed: int = 0, *, sharpen: bool = True, random_masses: bool = False, device=None, **overrides
) -> GravityForCausalLM:
    """The one builder of random tiny gravity models for the tests.

    Masses differ across heads and layers (so a wrong head/layer mapping shows): a linspace by default,
    N(1, 1) draws with `random_masses`. `sharpen` scales the q/k projections up, so that attention is far
    from uniform. `overrides` go to the config (`tiny_config`).
    """
    torch.manual_seed(seed)
    model = GravityForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for i, attn in enumerate(model.gravity_layers()):
            if random_masses:
                attn.gravity_mass_log.copy_(torch.randn(attn.num_heads) + 1.0)
            else:
                attn.gravity_mass_log.copy_(torch.linspace(-1.0, 2.0, attn.num_heads) + 0.5 * i)
            if sharpen:
                attn.q_proj.weight.mul_(8.0)
                attn.k_proj.weight.mul_(8.0)
    return model if device is None else model.to(device)


def random_masks(L=2, H=4, nb=4, block=16, seed=0, drop=((0, 1), (1, 0), (1, 1), (1, 2), (1, 3))):
    g = torch.Generator().manual_seed(seed)
    head_keep = torch.ones(L, H, dtype=torch.bool)
    for layer, head in drop:
        head_keep[layer, head] = False
    grid = (torch.rand(L, H, nb, nb, generator=g) < 0.5).tril() | torch.eye(nb, dtype=torch.bool)
    return Masks(head_keep, grid & head_keep[..., None, None], block, nb * block)


def local_masks(layers, heads, nb, block, window=2, drop=(), seed=0, extra=0.15) -> Masks:
    """Sink column + a local band of `window` blocks + a few random blocks; `drop`: (layer, head)."""
    g = torch.Generator().manual_seed(seed)
    qb, kb = torch.arange(nb).view(-1, 1), torch.arange(nb).view(1, -1)
    band = ((qb - kb >= 0) & (qb - kb < window)) | (kb == 0)
    grid = (torch.rand(layers, heads, nb, nb, generator=g) < extra) | band
    grid &= torch.ones(nb, nb, dtype=torch.bool).tril()
    head_keep = torch.ones(layers, heads, dtype=torch.bool)
    for layer, head in drop:
        head_keep[layer, head] = False
    masks = Masks(head_keep, grid & head_keep[..., None, None], block, nb * block)
    masks.check()
    return masks


def attention_inputs(b, hq, hkv, s, d, dtype=torch.float32, seed=0):
    """q, k, v, mass_log for attention kernels, requiring grad; keys off-center (tests centering)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g, dtype=dtype) * 0.7
    k = torch.randn(b, hkv, s, d, generator=g, dtype=dtype) * 0.7 + 0.5
    v = torch.randn(b, hkv, s, d, generator=g, dtype=dtype)
    mass_log = torch.linspace(-0.5, 1.5, hq, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, mass_log)]


def assert_same_output_and_grads(out, ref, inputs, names="q k v mass_log"):
    """out == ref, and the gradients of a random projection of each w.r.t. `inputs` agree."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * weight).sum(), inputs)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    for name, g, g_ref in zip(names.split(), grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
