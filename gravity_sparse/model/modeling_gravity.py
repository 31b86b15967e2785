"""Gravity attention for transformers: a Qwen2 decoder whose attention score is an inverse-square law.

    score(i, j) = M_h² / (‖q_i − k_j‖² + ε),   M_h = softplus(gravity_mass_log[h]),   attn = softmax_j(score)

over the causal prefix, KV heads expanded to the query heads (GQA), ‖q − k‖² = ‖q‖² + ‖k‖² − 2 q·k clamped
at 0 after centering q and k by a common vector (exact; keeps the cancellation small). Registered as the
attention implementation "gravity" through `AttentionInterface` and `AttentionMaskInterface` (the mask
registration makes transformers build a boolean causal+padding mask; without it padding is silently lost).

A layer may carry a block-sparse pattern (buffers `gravity_head_keep[Hq]`, `gravity_block_mask[Hq, NQB,
NKB]`, block size `config.gravity_block_size`): query i sees key j only if block (i // B, j // B) is kept; a
dropped head outputs zero. Pruned models may have per-layer head counts (`num_attention_heads_per_layer`).

Attention runs through the block path (gravity_block_attention.py: only kept blocks are computed, dropped
heads are skipped; a dense model keeps every causal block); the reference (gravity_reference.py, the
specification) when attention weights or dropout are asked for. `generate()` on a model with block masks
uses `GravityBlockCache` (gravity_cache.py), which frees the key blocks no later query reads.

Self-contained: copied next to every checkpoint with its siblings (configuration_gravity.py,
gravity_reference.py, gravity_blocks.py, gravity_block_stores.py, gravity_block_attention.py,
gravity_cache.py), so a Python with only torch, transformers and safetensors runs it
(`trust_remote_code=True`). On CUDA a sparse layer takes the kernel gravity_sparse's resolver picks when
`gravity_sparse.kernels` is loaded in the process
(`GravityAttention._maybe_use_kernel`); this file never imports gravity_sparse itself.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache
from transformers import initialization as init
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from .configuration_gravity import GravityConfig
from .gravity_block_attention import block_attention, block_size_of, layer_tables
from .gravity_cache import GravityBlockCache
from .gravity_reference import gravity_attention_reference, gravity_scores

ATTN_IMPLEMENTATION = "gravity"
# the model's forward takes the KV cache as `cache` from transformers 5.2x on (`past_key_values` before)
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"
)


def cache_kwarg(cache) -> dict:
    """`{name: cache}` for a model forward, under the name this transformers version uses."""
    return {CACHE_ARG: cache}


def gravity_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function "gravity": returns (B, S, Hq, D) and the probabilities.

    `scaling` is ignored: the gravity score has no 1/√d. Without probabilities or dropout, a kernel
    attached by `gravity_sparse` (attribute `gravity_kernel`) runs, else the block path
    (gravity_block_attention.py: only kept blocks, dropped heads skipped); the reference runs when
    probabilities or dropout are asked for, or for a mask that is not causal ∩ key padding.
    `gravity_view`: the block store of a `GravityBlockCache`; only the block path reads it, so a call
    with one always takes the block path.
    """
    kernel = getattr(module, "gravity_kernel", None)
    view = kwargs.get("gravity_view")
    want_weights = bool(kwargs.get("output_attentions", False))
    plain = not want_weights and not (dropout > 0.0 and module.training)
    if view is not None and not plain:
        raise ValueError(
            "GravityBlockCache frees key blocks: attention weights and dropout need a DynamicCache"
        )
    out = None
    if plain and kernel is not None and view is None:
        out = kernel(module, query, key, value, attention_mask)
    elif plain:
        out = block_attention(module, query, key, value, attention_mask, view)
    if out is not None:
        return out.transpose(1, 2).contiguous(), None
    if view is not None:
        raise ValueError("GravityBlockCache needs a causal (or causal and padding) attention mask")
    out, weights = module.reference_attention(
        query, key, value, attention_mask, return_weights=True
    )
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout, training=module.training)
        out = (weights @ value.float().index_select(1, module.gravity_kv_groups)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


class _OwnBlockPath:  # stands for "no kernel attached": the layer's own block path
    block_path = True


def gravity_mask(*args, **kwargs) -> torch.Tensor:
    """Boolean causal + padding mask (B, 1, S, Sk); never skipped, so padding is always honoured."""
    kwargs["allow_is_causal_skip"] = False
    kwargs.pop("dtype", None)
    return sdpa_mask(*args, **kwargs)


ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, gravity_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, gravity_mask)


class GravityAttention(nn.Module):
    """Qwen2 attention with the gravity score and one learned mass per query head; the sparsity buffers
    (`gravity_head_keep`, `gravity_block_mask`) are set on sparse models or by `set_sparsity`."""

    def __init__(self, config: GravityConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.num_heads, self.num_key_value_heads = config.heads_in_layer(layer_idx)
        self.is_causal = True
        self.attention_dropout = config.attention_dropout
        self.scaling = 1.0
        hidden, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * d, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * d, bias=True)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False)
        self.gravity_mass_log = nn.Parameter(
            torch.full((self.num_heads,), config.gravity_mass_init)
        )
        self.register_buffer(
            "gravity_kv_groups",
            torch.tensor(config.head_groups(layer_idx), dtype=torch.long),
            persistent=False,
        )
        # attributes or buffers: None on a dense model, stored buffers on a sparse one
        self.register_buffer("gravity_head_keep", None)
        self.register_buffer("gravity_block_mask", None)
        if config.gravity_block_size is not None:
            nb = -(-int(config.gravity_max_length) // int(config.gravity_block_size))
            self.register_buffer("gravity_head_keep", torch.ones(self.num_heads, dtype=torch.bool))
            self.register_buffer(
                "gravity_block_mask", torch.ones(self.num_heads, nb, nb, dtype=torch.bool).tril()
            )

    def set_sparsity(self, head_keep: torch.Tensor | None, block_mask: torch.Tensor | None) -> None:
        """Attach (or, with None, remove) this layer's head mask (Hq,) and block mask (Hq, NQB, NKB)."""
        device = self.q_proj.weight.device
        for name, value in (("gravity_head_keep", head_keep), ("gravity_block_mask", block_mask)):
            if value is not None:
                if value.shape[0] != self.num_heads:
                    raise ValueError(
                        f"layer {self.layer_idx}: {name} has {value.shape[0]} heads, layer has {self.num_heads}"
                    )
                value = value.to(device=device, dtype=torch.bool)
            self.register_buffer(name, value)

    def reference_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`gravity_attention_reference` with this layer's masses, ε, GQA groups and sparsity."""
        return gravity_attention_reference(
            q,
            k,
            v,
            self.gravity_mass_log,
            eps=self.config.gravity_eps,
            block_mask=self.gravity_block_mask,
            head_keep=self.gravity_head_keep,
            block_size=self.config.gravity_block_size,
            attention_mask=attention_mask,
            kv_groups=self.gravity_kv_groups,
            return_weights=return_weights,
        )

    def _maybe_use_kernel(self, device: torch.device) -> None:
        """On CUDA: the kernel of gravity_sparse's resolver, if `gravity_sparse.kernels` is loaded (once)."""
        if self.__dict__.get("_kernel_probed") or getattr(self, "gravity_kernel", None) is not None:
            return
        self._kernel_probed = True
        kernels = sys.modules.get("gravity_sparse.kernels")
        if kernels is not None:
            kernel = kernels.model_kernel(device)
            if kernel is not None:
                self.gravity_kernel = kernel

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # transformers ≥ 5.2x hands the cache over as `cache`; older 5.x releases as `past_key_values`
        if cache is None:
            cache = past_key_values
        input_shape = hidden_states.shape[:-1]
        # explicit head counts (not -1): a pruned layer may have zero heads
        q_shape = (*input_shape, self.num_heads, self.head_dim)
        kv_shape = (*input_shape, self.num_key_value_heads, self.head_dim)
        query_states = self.q_proj(hidden_states).view(q_shape).transpose(1, 2)  # (B, Hq, S, D)
        key_states = self.k_proj(hidden_states).view(kv_shape).transpose(1, 2)  # (B, Hkv, S, D)
        value_states = self.v_proj(hidden_states).view(kv_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        view = None
        if isinstance(cache, GravityBlockCache):  # stores only blocks some later query reads
            layer = cache.layer(self.layer_idx)
            if self.num_heads == 0:
                layer.skip(input_shape[-1])
                return torch.zeros_like(hidden_states), None
            tables = layer_tables(self, block_size_of(self), layer.length + input_shape[-1])
            view = layer.update_blocks(key_states, value_states, tables)
        elif cache is not None:
            # also for an empty layer, so the cache keeps counting this layer's length
            kv = cache.update(key_states, value_states, self.layer_idx)
            key_states, value_states = kv
        if self.num_heads == 0:
            return torch.zeros_like(hidden_states), None
        if self.gravity_block_mask is not None and query_states.is_cuda:
            self._maybe_use_kernel(query_states.device)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, gravity_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **({"gravity_view": view} if view is not None else {}),
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class GravityDecoderLayer(Qwen2DecoderLayer):
    def __init__(self, config: GravityConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = GravityAttention(config, layer_idx)


class GravityPreTrainedModel(Qwen2PreTrainedModel):
    config_class = GravityConfig
    config: GravityConfig
    _no_split_modules = ["GravityDecoderLayer"]
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _can_record_outputs = {"hidden_states": GravityDecoderLayer, "attentions": GravityAttention}

    def __init__(self, config: GravityConfig, *args, **kwargs):
        # gravity is the default after every (re)load; an explicitly registered kernel variant may replace it
        if not str(getattr(config, "_attn_implementation", None) or "").startswith(
            ATTN_IMPLEMENTATION
        ):
            config._attn_implementation = ATTN_IMPLEMENTATION
        # PreTrainedModel directly: the Qwen2 classes later in the MRO would build Qwen2 submodules
        PreTrainedModel.__init__(self, config, *args, **kwargs)

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        if attn_implementation is None or attn_implementation in ("eager", "sdpa"):
            attn_implementation = ATTN_IMPLEMENTATION
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GravityAttention):
            # buffers too: from_pretrained builds modules on the meta device and only fills what it loads
            init.constant_(module.gravity_mass_log, self.config.gravity_mass_init)
            groups = torch.tensor(self.config.head_groups(module.layer_idx), dtype=torch.long)
            init.copy_(module.gravity_kv_groups, groups)
            if module.gravity_head_keep is not None:
                init.ones_(module.gravity_head_keep)
                init.copy_(
                    module.gravity_block_mask, torch.ones_like(module.gravity_block_mask).tril()
                )


class GravityModel(GravityPreTrainedModel, Qwen2Model):
    def __init__(self, config: GravityConfig):
        GravityPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [GravityDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in self.config.layer_types
        self.post_init()


class GravityForCausalLM(GravityPreTrainedModel, Qwen2ForCausalLM):
    def __init__(self, config: GravityConfig):
        GravityPreTrainedModel.__init__(self, config)
        self.model = GravityModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def gravity_layers(self) -> list[GravityAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate(): a model with block masks gets a `GravityBlockCache` (it frees the key blocks no
        later query reads) instead of the default DynamicCache; a cache passed in is used as given."""
        out = super()._prepare_cache_for_generation(
            generation_config, model_kwargs, *args, **kwargs
        )
        cache = model_kwargs.get(CACHE_ARG)
        layers = self.gravity_layers()
        for attn in layers:  # on CUDA, a kernel gravity_sparse picks keeps the DynamicCache
            if attn.gravity_block_mask is not None and attn.gravity_block_mask.is_cuda:
                attn._maybe_use_kernel(attn.gravity_block_mask.device)
        if (
            type(cache) is DynamicCache
            and not getattr(cache, "_is_user_defined", False)
            and generation_config.cache_implementation is None
            and any(a.gravity_block_mask is not None for a in layers)
            and all(
                getattr(a.__dict__.get("gravity_kernel", _OwnBlockPath), "block_path", False)
                for a in layers
            )
        ):
            model_kwargs[CACHE_ARG] = GravityBlockCache(config=self.config)
        return out


__all__ = [
    "GravityAttention",
    "GravityForCausalLM",
    "GravityModel",
    "GravityPreTrainedModel",
    "GravityBlockCache",
    "gravity_attention_forward",
    "gravity_attention_reference",
    "gravity_scores",
    "cache_kwarg",
]
