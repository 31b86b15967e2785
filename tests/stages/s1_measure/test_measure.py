"""measure through the model: closed-form attention, batch/chunk invariance, importance, bad input."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_model as shared_tiny_model

from gravity_sparse.errors import UserError
from gravity_sparse.model.configuration_gravity import GravityConfig
from gravity_sparse.model.modeling_gravity import GravityForCausalLM, gravity_attention_reference
from gravity_sparse.stages.s1_measure.config import MeasureConfig
from gravity_sparse.stages.s1_measure.field import fit_power_law
from gravity_sparse.stages.s1_measure.measure import run_measure

TEXT = (
    "def measure(model, text):\n    return field(model, text)  # the inverse-square law of attention\n"
    * 60
)
TOKENS = torch.tensor(list(TEXT.encode("utf-8")))


def tiny_model(seed: int = 0) -> GravityForCausalLM:
    return shared_tiny_model(seed, sharpen=False, random_masses=True)


def read_field(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# -- a one-layer model whose attention is known in closed form -------------------------------------
#
# q_proj and k_proj have zero weights, so q and k are their biases at every position; RoPE then rotates
# them by the position. Head 0 puts c·e_0 in the first rotary pair (angle = position, frequency 1) and
# its KV head holds the same vector rotated by one step, so q_i = k_{i-1} exactly:
#     ‖q_i − k_j‖² = 2c²(1 − cos(Δ − 1)),  Δ = i − j,
# minimal (0) at Δ = 1, and a large mass makes it a previous-token head. Head 1 has q = 0 and shares
# that KV head: ‖q − k_j‖² = c² for every key, so it attends uniformly whatever its mass.
C, MASS = 2.0, 3.0
SEQ, BLOCK = 32, 8


def closed_form_model() -> GravityForCausalLM:
    config = GravityConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=259,
        max_position_embeddings=64,
    )
    model = GravityForCausalLM(config).eval()
    attn = model.gravity_layers()[0]
    d = attn.head_dim
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        attn.q_proj.bias[0] = C  # head 0, rotary pair (0, d/2)
        attn.k_proj.bias[0], attn.k_proj.bias[d // 2] = C * math.cos(1.0), C * math.sin(1.0)
        attn.gravity_mass_log.copy_(torch.tensor([math.log(math.expm1(MASS)), -10.0]))
    return model


def closed_form_probs() -> tuple[np.ndarray, np.ndarray]:
    """(2, S, S) attention of the closed-form model and (2, S) raw score at each distance, float64."""
    delta = np.arange(SEQ, dtype=np.float64)
    score0 = MASS**2 / (2 * C**2 * (1 - np.cos(delta - 1)) + 0.1)
    score1 = np.full(SEQ, np.log1p(np.exp(-10.0)) ** 2 / (C**2 + 0.1))
    probs = np.zeros((2, SEQ, SEQ))
    for h, score in enumerate((score0, score1)):
        for i in range(SEQ):
            row = score[i - np.arange(i + 1)]
            e = np.exp(row - row.max())
            probs[h, i, : i + 1] = e / e.sum()
    return probs, np.stack([score0, score1])


def test_closed_form_field_through_the_model(tmp_path):
    model = closed_form_model()
    cfg = MeasureConfig(
        seq_len=SEQ,
        block_size=BLOCK,
        num_sequences=3,
        batch_size=2,
        importance="grad",
        plots=False,
        progress=False,
    )
    run_measure(model, TOKENS, cfg, tmp_path)
    got, meta = read_field(tmp_path / "field.safetensors")
    probs, scores = closed_form_probs()
    nb = SEQ // BLOCK
    field = probs.reshape(2, nb, BLOCK, nb, BLOCK).sum(-1).mean(2)
    profile = np.stack(
        [
            [np.mean([probs[h, i, i - d] for i in range(d, SEQ)]) for d in range(SEQ)]
            for h in range(2)
        ]
    )
    entropy = (
        -(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0)).sum(-1).mean(-1)
    )

    torch.testing.assert_close(
        got["block_field"][0], torch.from_numpy(field).float(), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        got["profile"][0], torch.from_numpy(profile).float(), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        got["score_profile"][0], torch.from_numpy(scores).float(), atol=1e-3, rtol=1e-4
    )
    torch.testing.assert_close(
        got["entropy"][0], torch.from_numpy(entropy).float(), atol=1e-4, rtol=0
    )
    assert float(got["profile"][0, 0, 1]) > 0.99  # it really is a previous-token head
    for h in range(2):
        fit = fit_power_law(profile[h])
        assert float(got["alpha"][0, h]) == pytest.approx(fit.alpha, abs=1e-3)
        assert float(got["alpha_r2"][0, h]) == pytest.approx(fit.r2, abs=1e-3)
    torch.testing.assert_close(got["mass"][0], torch.tensor([MASS, math.log1p(math.exp(-10.0))]))
    assert got["kv_groups"].tolist() == [[0, 0]]
    assert meta["seq_len"] == str(SEQ) and meta["block_size"] == str(BLOCK)
    assert meta["num_tokens"] == str(3 * SEQ) and meta["num_kv_heads"] == "1"


def test_batch_size_and_query_chunks_do_not_change_the_field(tmp_path):
    model = tiny_model()
    base = dict(
        seq_len=64,
        block_size=16,
        num_sequences=8,
        ablation_sequences=2,
        plots=False,
        progress=False,
    )
    run_measure(model, TOKENS, MeasureConfig(batch_size=1, **base), tmp_path / "b1")
    # batch 8 with tiny query chunks: 8 sequences × 4 heads × 64 keys → 3 queries per chunk
    run_measure(
        model,
        TOKENS,
        MeasureConfig(batch_size=8, chunk_elements=8 * 4 * 64 * 3, **base),
        tmp_path / "b8",
    )
    one, _ = read_field(tmp_path / "b1" / "field.safetensors")
    eight, _ = read_field(tmp_path / "b8" / "field.safetensors")
    assert set(one) == set(eight)
    for key in one:
        torch.testing.assert_close(
            eight[key], one[key], atol=2e-5, rtol=1e-4, equal_nan=True, msg=key
        )
    assert all(getattr(a, "gravity_kernel", None) is None for a in model.gravity_layers())


def test_ablation_importance_equals_direct_loss_increase(tmp_path):
    model = tiny_model(seed=1)
    cfg = MeasureConfig(
        seq_len=64,
        block_size=16,
        num_sequences=4,
        ablation_sequences=3,
        ablation_group=3,
        importance="both",
        plots=False,
        progress=False,
    )
    summary = run_measure(model, TOKENS, cfg, tmp_path)
    got, meta = read_field(tmp_path / "field.safetensors")
    assert meta["importance_method"] == "ablation"
    ids = TOKENS[: 3 * 64].view(3, 64)

    def loss(layer=None, head=None) -> float:
        attn = model.gravity_layers()[layer] if layer is not None else None
        if attn is not None:
            keep = torch.ones(attn.num_heads, dtype=torch.bool)
            keep[head] = False

            def kernel(module, q, k, v, mask):  # the reference's own head mask zeroes that head
                out, _ = gravity_attention_reference(
                    q,
                    k,
                    v,
                    module.gravity_mass_log,
                    head_keep=keep,
                    attention_mask=mask,
                    kv_groups=module.gravity_kv_groups,
                )
                return out

            attn.gravity_kernel = kernel
        try:
            with torch.no_grad():
                losses = [float(model(input_ids=row[None], labels=row[None]).loss) for row in ids]
            return float(np.mean(losses))
        finally:
            if attn is not None:
                del attn.gravity_kernel

    clean = loss()
    for layer, head in ((0, 1), (1, 3)):
        direct = loss(layer, head) - clean
        assert float(got["importance"][layer, head]) == pytest.approx(direct, abs=2e-5)
    assert torch.isfinite(got["importance_grad"]).all() and (got["importance_grad"] >= 0).all()
    assert summary["importance_method"] == "ablation" and len(summary["heads"]) == 8


def _measure_grad(model, out: Path, **overrides) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Measure `model` on TOKENS with grad importance over one 64-token sequence (blocks of 16)."""
    cfg = MeasureConfig(**{
        "seq_len": 64, "block_size": 16, "num_sequences": 1, "importance": "grad", "plots": False,
        "progress": False, **overrides,
    })  # fmt: skip
    run_measure(model, TOKENS, cfg, out)
    return read_field(out / "field.safetensors")


def test_grad_importance_is_the_first_order_loss_change(tmp_path):
    """|d loss / d t| at t = 0 when head (l, h) outputs (1 − t)·out_h, by central differences."""
    model = tiny_model(seed=2)
    got, meta = _measure_grad(model, tmp_path)
    assert meta["importance_method"] == "grad"
    torch.testing.assert_close(got["importance"], got["importance_grad"])
    ids = TOKENS[:64].view(1, 64)
    layer, head = 1, 2
    attn = model.gravity_layers()[layer]

    def loss_at(t: float) -> float:
        scale = torch.ones(attn.num_heads, 1, 1)
        scale[head] = 1 - t

        def kernel(module, q, k, v, mask):
            out, _ = gravity_attention_reference(
                q,
                k,
                v,
                module.gravity_mass_log,
                attention_mask=mask,
                kv_groups=module.gravity_kv_groups,
            )
            return out * scale

        attn.gravity_kernel = kernel
        try:
            with torch.no_grad():
                return float(model(input_ids=ids, labels=ids).loss)
        finally:
            del attn.gravity_kernel

    t = 1e-2
    slope = (loss_at(t) - loss_at(-t)) / (2 * t)
    assert float(got["importance_grad"][layer, head]) == pytest.approx(
        abs(slope), rel=2e-2, abs=1e-5
    )


def test_plots_and_summary(tmp_path):
    cfg = MeasureConfig(
        seq_len=64, block_size=16, num_sequences=2, ablation_sequences=1, progress=False
    )
    summary = run_measure(tiny_model(), TOKENS, cfg, tmp_path)
    assert summary["plots"] and all(
        (tmp_path / name).stat().st_size > 1000 for name in summary["plots"]
    )
    assert {
        "heatmap_mass.png",
        "heatmap_alpha.png",
        "heatmap_importance.png",
        "block_field.png",
        "profiles.png",
    } <= set(summary["plots"])
    assert summary["num_tokens"] == 128 and summary["tokens_per_s"] > 0
    import json

    json.dumps(summary)  # JSON-able


@pytest.mark.parametrize(
    "tokens,overrides,message",
    [
        (TOKENS[:0], {}, "empty"),
        (TOKENS[:40], {}, "fewer than one sequence"),
        (TOKENS, {"seq_len": 1024}, "max_position_embeddings"),
    ],
)
def test_bad_input_is_a_one_line_user_error(tmp_path, tokens, overrides, message):
    cfg = MeasureConfig(**{"seq_len": 64, "plots": False, "progress": False, **overrides})
    with pytest.raises(UserError, match=message) as err:
        run_measure(tiny_model(), tokens, cfg, tmp_path)
    assert "\n" not in str(err.value)


def test_config_validation():
    with pytest.raises(UserError, match="importance"):
        MeasureConfig(importance="taylor")
    with pytest.raises(UserError, match="block_size"):
        MeasureConfig(block_size=0)


def test_ablation_of_a_sample_of_layers_equals_those_rows_of_the_full_ablation():
    from gravity_sparse.stages.s1_measure.measure import (
        _ablation_importance,
        _Kernels,
        calibration_sequences,
    )

    model = tiny_model(seed=1).eval()
    cfg = MeasureConfig(seq_len=64, block_size=16, ablation_sequences=2, progress=False)
    seqs = calibration_sequences(TOKENS, 64, 2, 512)
    with _Kernels(model) as kernels:
        full = _ablation_importance(model, seqs, cfg, kernels)
        some = _ablation_importance(model, seqs, cfg, kernels, only=[1])
    assert torch.isfinite(full).all() and full.abs().sum() > 0
    torch.testing.assert_close(some[1], full[1], atol=1e-6, rtol=0)
    assert torch.isnan(some[0]).all()


def test_grad_importance_keeps_no_layer_graph_from_the_backward_recompute(monkeypatch):
    """The backward recomputes each checkpointed layer; the attention output of that recompute must die
    with the layer's backward. Kept, its graph holds the layer's probabilities: L × (H, T, T) at the peak
    (461 MiB a layer at Gravity-2's shape and 4k tokens, before this was fixed)."""
    import weakref

    from gravity_sparse.stages.s1_measure import attention as attention_mod
    from gravity_sparse.stages.s1_measure import importance as importance_mod

    model = tiny_model(seed=3)
    num_layers = len(model.gravity_layers())
    real = importance_mod.chunked_attention
    outputs: list[weakref.ref] = []
    alive_at_call: list[int] = []

    def spy(*args, **kwargs):
        # how many earlier recompute outputs (calls after the forward's num_layers) are still alive
        alive_at_call.append(sum(r() is not None for r in outputs[num_layers:]))
        out = real(*args, **kwargs)
        outputs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(importance_mod, "chunked_attention", spy)
    cfg = MeasureConfig(
        seq_len=64, block_size=16, num_sequences=1, importance="grad", plots=False, progress=False
    )
    seqs = TOKENS[:64].view(1, 64)
    with attention_mod._Kernels(model) as kernels:
        imp, _, _ = importance_mod._grad_importance(model, seqs, cfg, kernels)
    assert torch.isfinite(imp).all() and imp.abs().max() > 0
    recompute_calls = len(alive_at_call) - num_layers
    assert recompute_calls >= num_layers - 1  # layer 0 may be a leaf (frozen embeddings)
    # when the last recompute starts, the earlier recomputes' outputs are gone
    assert alive_at_call[-1] == 0, alive_at_call


def _loss_with_block_gate(model, ids, layer: int, head: int, qb: int, kb: int, t: float) -> float:
    """Loss of `model` on ids with log-gate t on block (qb, kb) of head `head` in `layer` (blocks of 16):
    that block's probabilities times e^t, the row renormalised (written out here, not measure's code)."""
    attn = model.gravity_layers()[layer]

    def kernel(module, q, k, v, mask):
        _, probs = gravity_attention_reference(
            q, k, v, module.gravity_mass_log, attention_mask=mask,
            kv_groups=module.gravity_kv_groups, return_weights=True,
        )  # fmt: skip
        gate = torch.ones_like(probs)
        gate[:, head, qb * 16 : (qb + 1) * 16, kb * 16 : (kb + 1) * 16] = math.exp(t)
        gated = probs * gate
        gated = gated / gated.sum(-1, keepdim=True)
        return (gated @ v.float().index_select(1, module.gravity_kv_groups)).to(q.dtype)

    attn.gravity_kernel = kernel
    try:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)
    finally:
        del attn.gravity_kernel


def test_block_grad_is_the_loss_sensitivity_to_a_block_gate(tmp_path):
    """block_grad[l, h, qb, kb] = d loss / d β at β = 0, β a log-gate on that block's probabilities,
    by central differences through the reference attention; every query row sums to zero."""
    model = tiny_model(seed=4)
    got, _ = _measure_grad(model, tmp_path, block_grad=True)
    grad = got["block_grad"]
    num_layers, heads = got["importance"].shape
    assert grad.shape == (num_layers, heads, 4, 4)
    assert grad.abs().max() > 0
    assert torch.triu(grad, diagonal=1).abs().max() == 0  # future blocks are never read
    torch.testing.assert_close(grad.sum(-1), torch.zeros(num_layers, heads, 4), atol=1e-6, rtol=0)
    ids = TOKENS[:64].view(1, 64)
    off = torch.tril(torch.ones(4, 4, dtype=torch.bool), diagonal=-1)
    # the off-diagonal block the loss is most sensitive to, and one of another head and layer
    top = np.unravel_index(int((grad.abs() * off).flatten().argmax()), grad.shape)
    other = (1 - min(int(top[0]), 1), (int(top[1]) + 1) % heads, 3, 1)
    t = 1e-2
    for block in (tuple(int(x) for x in top), other):
        slope = (
            _loss_with_block_gate(model, ids, *block, t)
            - _loss_with_block_gate(model, ids, *block, -t)
        ) / (2 * t)
        assert float(grad[block]) == pytest.approx(slope, rel=2e-2, abs=1e-5), block


def test_zero_block_bias_leaves_the_attention_unchanged():
    from gravity_sparse.stages.s1_measure.measure import chunked_attention

    model = tiny_model(seed=5)
    attn = model.gravity_layers()[0]
    torch.manual_seed(0)
    q = torch.randn(2, attn.num_heads, 40, 32)
    k = torch.randn(2, attn.num_key_value_heads, 40, 32)
    v = torch.randn(2, attn.num_key_value_heads, 40, 32)
    ref = chunked_attention(attn, q, k, v, None, 1 << 20)
    bias = torch.zeros(attn.num_heads, 3, 3)
    got = chunked_attention(
        attn, q, k, v, None, 2 * attn.num_heads * 40 * 7, block_bias=bias, block_size=16
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_block_grad_abs_is_the_mean_magnitude_of_each_sequences_gradient(tmp_path):
    """Two sequences in one batch: block_grad is the mean of their gradients, block_grad_abs the mean of
    their magnitudes, each equal to what each sequence measured alone gives."""
    model = tiny_model(seed=6)
    cfg = MeasureConfig(
        seq_len=64, block_size=16, num_sequences=2, batch_size=2, importance="grad",
        block_grad=True, plots=False, progress=False,
    )  # fmt: skip
    run_measure(model, TOKENS[:128], cfg, tmp_path / "both")
    both, _ = read_field(tmp_path / "both" / "field.safetensors")
    alone = []
    for i in range(2):
        one = MeasureConfig(**{**cfg.__dict__, "num_sequences": 1, "batch_size": 1})
        run_measure(model, TOKENS[64 * i : 64 * (i + 1)], one, tmp_path / str(i))
        alone.append(read_field(tmp_path / str(i) / "field.safetensors")[0]["block_grad"])
    assert (alone[0] - alone[1]).abs().max() > 1e-6  # the two sequences differ
    torch.testing.assert_close(both["block_grad"], (alone[0] + alone[1]) / 2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        both["block_grad_abs"], (alone[0].abs() + alone[1].abs()) / 2, rtol=1e-4, atol=1e-7
    )


def test_block_grad_is_opt_in_and_needs_a_gradient_pass(tmp_path):
    got, _ = _measure_grad(tiny_model(seed=7), tmp_path)
    assert "block_grad" not in got and "block_grad_abs" not in got
    with pytest.raises(UserError, match="block_grad needs measure.importance grad or both"):
        MeasureConfig(importance="ablation", block_grad=True)
