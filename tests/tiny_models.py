"""Tiny gravity models built in-process (tests import them from here: `from tiny_models import ...`)."""

import torch

from gravity_sparse.configuration_gravity import GravityConfig
from gravity_sparse.masks import Masks
from gravity_sparse.modeling_gravity import GravityForCausalLM


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


def tiny_model(seed: int = 0, **overrides) -> GravityForCausalLM:
    """A random tiny gravity model with non-uniform masses (so a wrong head/layer mapping shows)."""
    torch.manual_seed(seed)
    model = GravityForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for i, attn in enumerate(model.gravity_layers()):
            attn.gravity_mass_log.copy_(torch.linspace(-1.0, 2.0, attn.num_heads) + 0.5 * i)
            # larger projections than the default init, so attention is far from uniform
            attn.q_proj.weight.mul_(8.0)
            attn.k_proj.weight.mul_(8.0)
    return model


def random_masks(L=2, H=4, nb=4, block=16, seed=0, drop=((0, 1), (1, 0), (1, 1), (1, 2), (1, 3))):
    g = torch.Generator().manual_seed(seed)
    head_keep = torch.ones(L, H, dtype=torch.bool)
    for layer, head in drop:
        head_keep[layer, head] = False
    grid = (torch.rand(L, H, nb, nb, generator=g) < 0.5).tril() | torch.eye(nb, dtype=torch.bool)
    return Masks(head_keep, grid & head_keep[..., None, None], block, nb * block)
