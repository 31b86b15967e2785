"""Gravity attention for transformers: a Qwen2 decoder whose attention score is an inverse-square law.

    score(i, j) = M_h² / (‖q_i − k_j‖² + ε),   M_h = softplus(gravity_mass_log[h]),   attn = softmax_j(score)

over the causal prefix, KV heads expanded to the query heads (GQA), ‖q − k‖² = ‖q‖² + ‖k‖² − 2 q·k clamped
at 0 after centering q and k by a common vector (exact; keeps the cancellation small). Registered as the
attention implementation "gravity" through `AttentionInterface` and `AttentionMaskInterface` (the mask
registration makes transformers build a boolean causal+padding mask; without it padding is silently lost).

A layer may carry a block-sparse pattern (buffers `gravity_head_keep[Hq]`, `gravity_block_mask[Hq, NQB,
NKB]`, block size `config.gravity_block_size`): query i sees key j only if block (i // B, j // B) is kept; a
dropped head outputs zero. Pruned models may have per-layer head counts (`num_attention_heads_per_layer`).

Self-contained: copied next to every checkpoint, so a Python with only torch, transformers and safetensors
runs it (`trust_remote_code=True`); it imports only those and `configuration_gravity`. On CUDA a sparse layer
takes the kernel gravity_sparse's resolver picks when `gravity_sparse.kernels` is loaded in the process
(`GravityAttention._maybe_use_kernel`); this file never imports gravity_sparse itself.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
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

ATTN_IMPLEMENTATION = "gravity"
# the model's forward takes the KV cache as `cache` from transformers 5.2x on (`past_key_values` before)
CACHE_ARG = (
    "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"
)


def cache_kwarg(cache) -> dict:
    """`{name: cache}` for a model forward, under the name this transformers version uses."""
    return {CACHE_ARG: cache}


def gravity_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    mass_log: torch.Tensor,
    eps: float,
    kv_groups: torch.Tensor,
) -> torch.Tensor:
    """The score formula, for the reference and measure: raw M² / (‖q_i − k_j‖² + ε), no mask, fp32.

    q (B, Hq, S, D), k (B, Hkv, Sk, D), kv_groups (Hq,); centred by the mean key. -> (B, Hq, S, Sk).
    """
    kf = k.float().index_select(1, kv_groups.to(k.device))  # (B, Hq, Sk, D)
    center = kf.mean(dim=2, keepdim=True)
    qc, kc = q.float() - center, kf - center
    d2 = (
        qc.pow(2).sum(-1, keepdim=True)  # (B, Hq, S, 1)
        + kc.pow(2).sum(-1).unsqueeze(-2)  # (B, Hq, 1, Sk)
        - 2.0 * qc @ kc.transpose(-1, -2)  # (B, Hq, S, Sk)
    ).clamp_min(0.0)
    mass = F.softplus(mass_log.float()).view(1, -1, 1, 1)
    return mass.square() / (d2 + eps)


def gravity_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mass_log: torch.Tensor,
    *,
    eps: float = 0.1,
    block_mask: torch.Tensor | None = None,
    head_keep: torch.Tensor | None = None,
    block_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    kv_groups: torch.Tensor | None = None,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense gravity attention with an optional block mask and head mask: the specification.

    q (B, Hq, S, D); k, v (B, Hkv, Sk, D) with Sk ≥ S: the S queries are the last S positions of the Sk
    keys (prefill: Sk == S; cached decode: Sk = past + S). mass_log (Hq,). block_mask (Hq, NQB, NKB) bool,
    indexed by absolute positions (i // block_size, j // block_size); head_keep (Hq,) bool.
    attention_mask: (B, 1|Hq, S, Sk) bool (True = attend) or additive float, as transformers builds it;
    without it a plain causal mask applies. kv_groups (Hq,) long: KV head of each query head (default
    h // (Hq // Hkv)). Computed in fp32; returns out (B, Hq, S, D) in q's dtype and, if asked, the
    attention probabilities (B, Hq, S, Sk) fp32.
    """
    bsz, hq, s, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if sk < s:
        raise ValueError(f"gravity attention: {sk} keys for {s} queries")
    if kv_groups is None:
        if hkv == 0 or hq % hkv:
            raise ValueError(
                f"gravity attention: {hq} query heads do not split into {hkv} KV groups"
            )
        kv_groups = torch.arange(hq, device=q.device) // (hq // hkv)
    kv_groups = kv_groups.to(q.device)
    vf = v.float().index_select(1, kv_groups)
    scores = gravity_scores(q, k, mass_log, eps, kv_groups)

    q_pos = torch.arange(sk - s, sk, device=q.device)
    k_pos = torch.arange(sk, device=q.device)
    if attention_mask is None:
        allowed = (k_pos[None, :] <= q_pos[:, None]).view(1, 1, s, sk)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., -sk:]
    else:
        allowed = attention_mask[..., -sk:] > torch.finfo(attention_mask.dtype).min / 2
    if block_mask is not None:
        if block_size is None:
            raise ValueError("gravity attention: a block mask needs its block size")
        nqb, nkb = block_mask.shape[-2:]
        if (sk - 1) // block_size >= min(nqb, nkb):
            raise ValueError(
                f"sequence of {sk} tokens is longer than the block mask "
                f"({min(nqb, nkb)} blocks of {block_size} = {min(nqb, nkb) * block_size} tokens)"
            )
        qb, kb = q_pos // block_size, k_pos // block_size
        blocks = block_mask.to(q.device)[:, qb][:, :, kb]  # (Hq, S, Sk)
        allowed = allowed & blocks.unsqueeze(0)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = (
        torch.softmax(scores, dim=-1) * allowed
    )  # a row with nothing allowed yields zeros, not NaN
    if head_keep is not None:
        probs = probs * head_keep.to(q.device, torch.float32).view(1, hq, 1, 1)
    out = (probs @ vf).to(q.dtype)
    return out, (probs if return_weights else None)


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

    `scaling` is ignored: the gravity score has no 1/√d. A kernel attached to the module by
    `gravity_sparse` (attribute `gravity_kernel`) takes over when present and no probabilities are asked.
    """
    kernel = getattr(module, "gravity_kernel", None)
    want_weights = bool(kwargs.get("output_attentions", False))
    if kernel is not None and not want_weights:
        out = kernel(module, query, key, value, attention_mask)
        return out.transpose(1, 2).contiguous(), None
    out, weights = module.reference_attention(
        query, key, value, attention_mask, return_weights=True
    )
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout, training=module.training)
        out = (weights @ value.float().index_select(1, module.gravity_kv_groups)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


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
        if cache is not None:
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


__all__ = [
    "GravityAttention",
    "GravityForCausalLM",
    "GravityModel",
    "GravityPreTrainedModel",
    "gravity_attention_forward",
    "gravity_attention_reference",
    "gravity_scores",
    "cache_kwarg",
]
