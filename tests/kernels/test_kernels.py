"""Parity of the Triton and FlexAttention gravity kernels with the reference (the spec).

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (see conftest) at tiny shapes in fp32:
forward, backward (dq, dk, dv, d mass_log) and decode, for random / all-kept / diagonal-only masks,
dropped heads, lengths that are not a multiple of the block size, GQA groups of 1, 2 and 8. Tests marked
`gpu` repeat them in bf16 at realistic shapes and are skipped without CUDA.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from gravity_sparse.errors import UserError
from gravity_sparse.kernels import build_block_index, gravity_attention
from gravity_sparse.kernels.block_index import default_kv_groups

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 16
D = 16


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0):
    """Like torch.testing.assert_close but prints max and mean absolute difference on failure."""
    diff = (got.float() - want.float()).abs()
    limit = atol + rtol * want.float().abs()
    ok = bool((diff <= limit).all())
    assert ok, (
        f"{name}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e} "
        f"(atol {atol}, rtol {rtol}, max |ref| {want.abs().max().item():.3e})"
    )


GRAD_NAMES = ("dq", "dk", "dv", "d mass_log")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ over the whole tensor (SQNR = −20·log10 of it, in dB)."""
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def check_grads(label, out, ref, leaves, gen, *, max_rel=1e-5, grad_out=None):
    """Gradient parity with the reference: per tensor, a relative-error floor (SQNR ≥ −20·log10(max_rel)
    dB), not an absolute tolerance scaled by the largest gradient. Returns (got, want)."""
    if grad_out is None:
        grad_out = torch.randn(ref.shape, generator=gen).to(ref.device)
    want = torch.autograd.grad(ref, leaves, grad_out)
    got = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        err = relative_error(g, w)
        assert err <= max_rel, f"{label} {name}: relative error {err:.2e} > {max_rel:.0e}"
    return got, want


def make_mask(kind: str, heads: int, nb: int, gen: torch.Generator) -> torch.Tensor:
    """(heads, nb, nb) lower-triangular block mask with the diagonal kept."""
    diag = torch.eye(nb, dtype=torch.bool).expand(heads, nb, nb)
    if kind == "all":
        mask = torch.ones(heads, nb, nb, dtype=torch.bool)
    elif kind == "diagonal":
        mask = diag.clone()
    elif kind == "random":
        mask = (torch.rand(heads, nb, nb, generator=gen) < 0.5) | diag
    else:
        raise ValueError(kind)
    return mask.tril()


def make_inputs(b, hq, hkv, s, sk, gen, dtype=torch.float32, d=D, device=DEVICE, offset=0.0):
    def rand(*shape):
        return (torch.randn(*shape, generator=gen) + offset).to(device=device, dtype=dtype)

    q, k, v = rand(b, hq, s, d), rand(b, hkv, sk, d), rand(b, hkv, sk, d)
    # masses around 1-3: scores up to ~90, a sharp enough softmax to exercise the online max
    mass_log = (torch.rand(hq, generator=gen) * 2.5 + 0.5).to(device)
    return q, k, v, mass_log


CASES = {
    # name: (batch, query heads, kv heads, seq, mask kind, dropped heads)
    "random-gqa2-S40": (2, 4, 2, 40, "random", ()),
    "all-kept-gqa1-S48": (1, 2, 2, 48, "all", ()),
    "diagonal-gqa8-S33": (1, 8, 1, 33, "diagonal", ()),
    "random-dropped-gqa2-S64": (1, 4, 2, 64, "random", (1, 2)),
    "random-dropped-gqa8-S25": (1, 8, 1, 25, "random", (0, 5, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_forward_and_backward_match_reference(case: str) -> None:
    b, hq, hkv, s, kind, dropped = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    nb = (
        -(-s // BLOCK) + 1
    )  # the mask grid may be larger than the sequence (top-left corner applies)
    mask = make_mask(kind, hq, nb, gen).to(DEVICE)
    keep = torch.ones(hq, dtype=torch.bool)
    keep[list(dropped)] = False
    keep = keep.to(DEVICE)
    q, k, v, mass_log = make_inputs(b, hq, hkv, s, s, gen)
    leaves = [t.requires_grad_() for t in (q, k, v, mass_log)]
    args = dict(block_mask=mask, head_keep=keep, block_size=BLOCK)

    ref = gravity_attention(*leaves, backend="reference", **args)
    out = gravity_attention(*leaves, backend="triton", **args)
    assert_close(f"{case} forward", out, ref, atol=2e-5)
    if kind == "random":  # the mask must matter, or this test could not fail
        dense = gravity_attention(*leaves, backend="reference", head_keep=keep)
        assert (dense - ref).abs().max() > 1e-3
    if dropped:
        assert out[:, list(dropped)].abs().max() == 0

    got, want = check_grads(case, out, ref, leaves, gen)
    assert want[3].abs().max() > 0  # mass gradients are exercised, not trivially zero


def test_all_kept_mask_equals_dense_gravity_attention() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v, mass_log = make_inputs(1, 4, 2, 37, 37, gen)
    dense = gravity_attention(q, k, v, mass_log, backend="reference")  # no mask at all
    mask = torch.ones(4, 3, 3, dtype=torch.bool, device=DEVICE)
    sparse = gravity_attention(
        q, k, v, mass_log, block_mask=mask, block_size=BLOCK, backend="triton"
    )
    no_mask = gravity_attention(q, k, v, mass_log, block_size=BLOCK, backend="triton")
    assert_close("all-kept", sparse, dense, atol=2e-5)
    assert_close("no mask", no_mask, dense, atol=2e-5)


def test_chunked_prefill_with_unaligned_offset() -> None:
    """S < Sk with more queries than decode takes: the prefill kernel with a query offset of 50."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, mass_log = make_inputs(1, 4, 2, 20, 70, gen)
    mask = make_mask("random", 4, 5, gen).to(DEVICE)
    leaves = [t.requires_grad_() for t in (q, k, v, mass_log)]
    args = dict(block_mask=mask, block_size=BLOCK)
    ref = gravity_attention(*leaves, backend="reference", **args)
    out = gravity_attention(*leaves, backend="triton", **args)
    assert_close("chunked forward", out, ref, atol=2e-5)
    check_grads("chunked", out, ref, leaves, gen)


def test_irregular_kv_groups_of_a_pruned_layer() -> None:
    """Pruned layers keep arbitrary query→KV maps; KV head 2 has no query head left."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, mass_log = make_inputs(1, 3, 3, 30, 30, gen)
    groups = torch.tensor([1, 0, 1], device=DEVICE)
    mask = make_mask("random", 3, 2, gen).to(DEVICE)
    leaves = [t.requires_grad_() for t in (q, k, v, mass_log)]
    args = dict(block_mask=mask, block_size=BLOCK, kv_groups=groups)
    ref = gravity_attention(*leaves, backend="reference", **args)
    out = gravity_attention(*leaves, backend="triton", **args)
    assert_close("irregular forward", out, ref, atol=2e-5)
    got, want = check_grads("irregular", out, ref, leaves, gen)
    assert got[1][:, 2].abs().max() == 0 and got[2][:, 2].abs().max() == 0


def test_large_norms_are_centred() -> None:
    """q and k far from the origin (‖q‖² ~ 1e4): centring keeps ‖q‖² + ‖k‖² − 2q·k accurate."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, mass_log = make_inputs(1, 2, 1, 32, 32, gen, offset=30.0)
    ref = gravity_attention(q, k, v, mass_log, backend="reference")
    out = gravity_attention(q, k, v, mass_log, block_size=BLOCK, backend="triton")
    assert_close("large norms", out, ref, atol=1e-4)


DECODE_CASES = {
    # name: (batch, query heads, kv heads, new tokens, cache length, mask kind, dropped, splits)
    "gqa2-T1-split2": (2, 4, 2, 1, 75, "random", (), 2),
    "gqa8-T3-split3-dropped": (1, 8, 1, 3, 80, "random", (2, 7), 3),
    "gqa1-T2-diagonal": (1, 2, 2, 2, 47, "diagonal", (), None),
    "gqa2-T5-cross-block-all": (1, 4, 2, 5, 66, "all", (3,), 2),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_reference(case: str) -> None:
    b, hq, hkv, t, sk, kind, dropped, splits = DECODE_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    mask = make_mask(kind, hq, 5, gen).to(DEVICE)
    keep = torch.ones(hq, dtype=torch.bool)
    keep[list(dropped)] = False
    keep = keep.to(DEVICE)
    q, k, v, mass_log = make_inputs(b, hq, hkv, t, sk, gen)
    args = dict(block_mask=mask, head_keep=keep, block_size=BLOCK)
    ref = gravity_attention(q, k, v, mass_log, backend="reference", **args)
    with torch.no_grad():
        out = gravity_attention(q, k, v, mass_log, backend="triton", num_splits=splits, **args)
    assert_close(f"decode {case}", out, ref, atol=2e-5)
    if dropped:
        assert out[:, list(dropped)].abs().max() == 0


def test_compiles_fullgraph_with_prebuilt_index() -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v, mass_log = make_inputs(1, 4, 2, 24, 24, gen)
    mask = make_mask("random", 4, 2, gen).to(DEVICE)
    groups = default_kv_groups(4, 2, DEVICE)
    index = build_block_index(
        mask, None, groups, num_kv_heads=2, seq_len_q=24, seq_len_k=24, block_size=BLOCK
    )

    def attend(q, k, v, mass_log):
        return gravity_attention(
            q,
            k,
            v,
            mass_log,
            block_mask=mask,
            block_size=BLOCK,
            backend="triton",
            block_index=index,
        )

    leaves = [t.requires_grad_() for t in (q, k, v, mass_log)]
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    ref = gravity_attention(*leaves, block_mask=mask, block_size=BLOCK, backend="reference")
    out = compiled(*leaves)
    assert_close("compiled forward", out, ref, atol=2e-5)
    check_grads("compiled", out, ref, leaves, None, grad_out=2 * ref.detach())  # d/dx of Σ out²


@pytest.mark.parametrize("s,sk", [(40, 40), (3, 45)])
def test_flex_forward_matches_reference(s: int, sk: int) -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, v, mass_log = make_inputs(1, 4, 2, s, sk, gen)
    mask = make_mask("random", 4, 3, gen).to(DEVICE)
    keep = torch.tensor([True, True, False, True], device=DEVICE)
    args = dict(block_mask=mask, head_keep=keep, block_size=BLOCK)
    ref = gravity_attention(q, k, v, mass_log, backend="reference", **args)
    with torch.no_grad():
        try:
            out = gravity_attention(q, k, v, mass_log, backend="flex", **args)
        except NotImplementedError as err:  # pragma: no cover - depends on the torch build
            pytest.skip(f"FlexAttention does not run here: {err}")
    assert_close(f"flex S={s} Sk={sk}", out, ref, atol=2e-5)


def test_user_errors_name_the_problem() -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v, mass_log = make_inputs(1, 2, 1, 40, 40, gen)
    short_mask = torch.ones(2, 2, 2, dtype=torch.bool)
    with pytest.raises(UserError, match="sequence of 40 tokens is longer than the block mask"):
        gravity_attention(q, k, v, mass_log, block_mask=short_mask, block_size=BLOCK)
    with pytest.raises(UserError, match="unknown attention backend"):
        gravity_attention(q, k, v, mass_log, backend="cuda")
    with pytest.raises(UserError, match="mass_log has shape"):
        gravity_attention(q, k, v, mass_log[:1])
    with pytest.raises(UserError, match="keys for 40 queries"):
        gravity_attention(q, k[:, :, :10], v[:, :, :10], mass_log)


# ---------------------------------------------------------------- GPU: bf16 at realistic shapes

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bf16_case(s: int, sk: int, density_keep: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, bs = 16, 2, 128, 64
    q, k, v, mass_log = make_inputs(1, hq, hkv, s, sk, gen, dtype=torch.bfloat16, d=d)
    q, k = q * 0.3, k * 0.3  # distances of order 10: a softmax that is neither flat nor one-hot
    nb = -(-sk // bs)
    diag = torch.eye(nb, dtype=torch.bool).expand(hq, nb, nb)
    mask = ((torch.rand(hq, nb, nb, generator=gen) < density_keep) | diag).tril().cuda()
    keep = torch.ones(hq, dtype=torch.bool, device="cuda")
    keep[3] = False
    return q, k, v, mass_log, dict(block_mask=mask, head_keep=keep, block_size=bs)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("s", [1000, 2048])
def test_gpu_bf16_prefill_forward_backward(s: int) -> None:
    q, k, v, mass_log, args = _bf16_case(s, s, 0.4, seed=s)
    leaves = [t.requires_grad_() for t in (q, k, v, mass_log)]
    ref = gravity_attention(
        *(t.float() for t in leaves[:3]), leaves[3], backend="reference", **args
    )
    out = gravity_attention(*leaves, backend="triton", **args)
    assert_close("bf16 forward", out, ref, atol=2e-2, rtol=2e-2)
    check_grads("bf16", out, ref, leaves, None, max_rel=2e-2, grad_out=torch.randn_like(ref))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("t,sk", [(1, 4097), (4, 8192)])
def test_gpu_bf16_decode(t: int, sk: int) -> None:
    q, k, v, mass_log, args = _bf16_case(t, sk, 0.3, seed=sk)
    ref = gravity_attention(q.float(), k.float(), v.float(), mass_log, backend="reference", **args)
    with torch.no_grad():
        out = gravity_attention(q, k, v, mass_log, backend="triton", **args)
    assert_close("bf16 decode", out, ref, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.gpu
def test_gpu_bf16_flex_compiled_forward() -> None:
    q, k, v, mass_log, args = _bf16_case(1024, 1024, 0.4, seed=11)
    ref = gravity_attention(q.float(), k.float(), v.float(), mass_log, backend="reference", **args)
    with torch.no_grad():
        out = gravity_attention(q, k, v, mass_log, backend="flex", **args)
    assert_close("bf16 flex", out, ref, atol=3e-2, rtol=3e-2)


def test_benchmark_script_smoke_and_refusal(tmp_path, monkeypatch) -> None:
    """The benchmark runs its CPU smoke config and refuses a real run without CUDA (exit 2)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke"
    assert bench.main(["--smoke", "--out", str(out), "--modes", "fwd", "decode"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"torch", "triton", "command", "device_name"} <= set(result["meta"])
    assert {r["mode"] for r in result["rows"]} == {"fwd", "decode"}
    assert all(r["max_err"] < 1e-5 for r in result["rows"])
    assert "| S | D |" in out.with_suffix(".md").read_text()
    if not torch.cuda.is_available():
        assert bench.main(["--out", str(tmp_path / "gpu")]) == 2


@pytest.mark.parametrize("block", [16, 32])
def test_small_mask_blocks_run_in_64_row_tiles(block: int) -> None:
    """Mask blocks 16/32 are gathered into 64-row hardware tiles: full tiles skip the block mask,
    partial ones apply it per element; forward and backward still match the reference."""
    gen = torch.Generator().manual_seed(block)
    s, hq, hkv = 200, 2, 1
    nb = -(-s // block)
    mask = make_mask("random", hq, nb, gen)
    mask[0] = torch.ones(nb, nb, dtype=torch.bool).tril()  # head 0 all kept: every tile full
    mask = mask.to(DEVICE)
    groups = default_kv_groups(hq, hkv, DEVICE)
    index = build_block_index(
        mask, None, groups, num_kv_heads=hkv, seq_len_q=s, seq_len_k=s, block_size=block
    )
    assert index.tile == 64
    kv_num, kv_idx, kv_bits, *_ = index.tile_lists()
    nt = -(-s // 64)
    assert kv_num.shape == (hq, nt)
    head0 = [kv_idx[0, t, : kv_num[0, t]].tolist() for t in range(nt)]
    assert head0 == [list(range(t + 1)) for t in range(nt)]  # all kept: every tile full (>= 0)
    assert (kv_idx[1][kv_idx[1] < 0]).numel() > 0  # the random head has partial tiles
    r = 64 // block
    for t in range(nt):  # each listed tile's bits are its kept (query block, key block) pairs
        for j in range(int(kv_num[1, t])):
            e = int(kv_idx[1, t, j])
            kt = -e - 1 if e < 0 else e
            for qs in range(r):
                for ks in range(r):
                    qb, kb = t * r + qs, kt * r + ks
                    kept = qb < nb and kb < nb and bool(index.mask[1, qb, kb])
                    assert bool(int(kv_bits[1, t, j]) >> (qs * r + ks) & 1) == kept

    q, k, v, mass_log = make_inputs(1, hq, hkv, s, s, gen)
    leaves = [t.requires_grad_() for t in (q, k, v, mass_log)]
    args = dict(block_mask=mask, block_size=block)
    ref = gravity_attention(*leaves, backend="reference", **args)
    out = gravity_attention(*leaves, backend="triton", block_index=index, **args)
    assert_close(f"block {block} forward", out, ref, atol=2e-5)
    check_grads(f"block {block}", out, ref, leaves, gen)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("d", [64, 128])
def test_flex_kernel_options_divide_the_mask_block(block: int, d: int) -> None:
    """torch rejects FlexAttention tiles that do not divide the BlockMask's block (its sm_90 default
    forward tile is 128 rows, which a 64-row mask block rejects)."""
    from gravity_sparse.kernels.flex import flex_kernel_options

    opts = flex_kernel_options(block, d)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
        assert block % opts[key] == 0 and opts[key] >= 16, (key, opts[key])
    assert opts["BLOCK_N1"] % opts["BLOCK_M1"] == 0 and opts["BLOCK_M2"] % opts["BLOCK_N2"] == 0
