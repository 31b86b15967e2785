"""Configuration of a gravity-attention decoder (Gravity-2 family).

Self-contained: this file is copied next to every checkpoint `save_model` writes, so it may import only
`transformers` (plus the standard library).
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


@strict
class GravityConfig(Qwen2Config):
    r"""A Qwen2 configuration whose attention score is the inverse-square law

        score(i, j) = M_h² / (‖q_i − k_j‖² + ε),   M_h = softplus(gravity_mass_log[h]).

    gravity_eps: the softening length ε.
    gravity_mass_init: initial value of `gravity_mass_log` (raw, before softplus).
    num_attention_heads_per_layer / num_key_value_heads_per_layer: per-layer head counts of a pruned model
        (None: every layer has `num_attention_heads` / `num_key_value_heads`).
    gravity_head_groups: per layer, the KV head index of every kept query head (pruned models only; it keeps
        the original GQA grouping after heads are removed).
    gravity_block_size / gravity_max_length: block grid of the stored block masks (sparse models only).
    gravity_sparsity: a free-form record of how the model was sparsified (density, heads kept, config).
    """

    model_type = "gravity"

    gravity_eps: float = 0.1
    gravity_mass_init: float = 0.5
    num_attention_heads_per_layer: list | None = None
    num_key_value_heads_per_layer: list | None = None
    gravity_head_groups: list | None = None
    gravity_block_size: int | None = None
    gravity_max_length: int | None = None
    gravity_sparsity: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_hidden_layers:
                raise ValueError(
                    f"{name} has {len(value)} entries, expected {self.num_hidden_layers}"
                )

    def heads_in_layer(self, layer_idx: int) -> tuple[int, int]:
        """(query heads, KV heads) of one layer."""
        hq = (
            self.num_attention_heads_per_layer
            or [self.num_attention_heads] * self.num_hidden_layers
        )[layer_idx]
        hkv = (
            self.num_key_value_heads_per_layer
            or [self.num_key_value_heads] * self.num_hidden_layers
        )[layer_idx]
        return int(hq), int(hkv)

    def head_groups(self, layer_idx: int) -> list[int]:
        """KV head index of each query head of a layer."""
        if self.gravity_head_groups is not None:
            return [int(g) for g in self.gravity_head_groups[layer_idx]]
        hq, hkv = self.heads_in_layer(layer_idx)
        group = max(hq // max(hkv, 1), 1)
        return [h // group for h in range(hq)]


__all__ = ["GravityConfig"]
