"""Llama / Qwen2 dot-product checkpoints → gravity models: the config and the weights, nothing learned yet.

The gravity model is a Qwen2 decoder (`GravityForCausalLM`), so a Qwen2 checkpoint maps one to one, and a
Llama checkpoint maps with zero q/k/v biases (Llama has none). Only the attention score changes: the
projections, MLPs, norms, embeddings and RoPE are copied as they are, and every head gets a mass
(`gravity_mass_log`, raw, before softplus) and the softening length ε. `scale_qk` then rescales q/k per
layer so that query–key distances start O(1), which matters more for the fit than the step count.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from ..errors import UserError
from ..model.configuration_gravity import GravityConfig
from ..model.modeling_gravity import GravityForCausalLM

SUPPORTED = ("llama", "qwen2")
_COPIED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def gravity_config_from(source: PretrainedConfig, *, eps: float, mass_init: float) -> GravityConfig:
    """The gravity config of a Llama/Qwen2 config; other architectures are a one-line UserError."""
    kind = getattr(source, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(
            f"cannot gravitize a {kind!r} model: supported architectures are {', '.join(SUPPORTED)}"
        )
    if getattr(source, "mlp_bias", False) or (
        kind == "llama" and getattr(source, "attention_bias", False)
    ):
        raise UserError("cannot gravitize a Llama model with MLP or o_proj biases (not in Qwen2)")
    if getattr(source, "use_sliding_window", False):
        raise UserError("cannot gravitize a model with sliding-window attention")
    fields = {k: getattr(source, k) for k in _COPIED if getattr(source, k, None) is not None}
    head_dim = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    return GravityConfig(
        **fields, head_dim=head_dim, gravity_eps=float(eps), gravity_mass_init=float(mass_init)
    )


@torch.no_grad()
def gravity_from_pretrained(
    source: torch.nn.Module,
    *,
    eps: float = 0.1,
    mass_init: float = 0.5,
    config: GravityConfig | None = None,
) -> GravityForCausalLM:
    """A gravity model carrying every weight of a Llama/Qwen2 causal LM (fp32, eval mode).

    `config` (default: derived from the source's) is the gravity config to build, e.g. a shipped one.
    """
    if config is None:
        config = gravity_config_from(source.config, eps=eps, mass_init=mass_init)
    model = GravityForCausalLM(config).float().eval()
    state = {k: v.float() for k, v in source.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "gravity_mass_log", "lm_head")
    bad = [k for k in missing if not k.endswith(allowed_missing)]
    bad += [k for k in unexpected if "rotary_emb" not in k]
    if bad:
        raise UserError(f"weights do not map onto the gravity model: {', '.join(sorted(bad)[:4])}")
    for attn in model.gravity_layers():
        attn.gravity_mass_log.fill_(config.gravity_mass_init)
    for key in missing:
        if key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            model.get_parameter(key).zero_()
    if config.tie_word_embeddings:
        model.tie_weights()
    elif any(k.startswith("lm_head") for k in missing):
        raise UserError("the source model has no lm_head weights and does not tie its embeddings")
    return model


@torch.no_grad()
def scale_qk(attn: torch.nn.Module, factor: float) -> None:
    """Multiply one layer's q and k projections (weights and biases) by `factor`."""
    for proj in (attn.q_proj, attn.k_proj):
        proj.weight.mul_(factor)
        if proj.bias is not None:
            proj.bias.mul_(factor)
