"""Shared fixtures: tiny gravity models built in-process, so tests run offline in seconds."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton decides whether to interpret when a kernel is decorated, and torch imports Triton early: without a
# GPU, the Triton kernels run under its CPU interpreter (set before anything imports torch).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gravity_sparse.configuration_gravity import GravityConfig  # noqa: E402
from gravity_sparse.modeling_gravity import GravityForCausalLM  # noqa: E402


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


@pytest.fixture
def model() -> GravityForCausalLM:
    return tiny_model()
