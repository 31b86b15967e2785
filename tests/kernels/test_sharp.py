"""Sharp-case accuracy of the 16-bit Triton kernels: tests that could catch a wrong bf16 kernel.

Random q, k of small norm give a nearly uniform softmax, where a wrong d² (e.g. ε = 1 instead of 0.1, or
q − c rounded to bf16 before the dot) hardly shows. Here keys form tight clusters around a large common
offset (‖q‖² ~ 400, as in real models), and each query sits in one cluster: a few near keys at d² ~ 0.3
take most of each softmax row, and their weights depend on d² to a few 1e-2.

The error of the kernel against an fp64 evaluation of the formula must stay within 2x (plus a tiny floor)
of the error of a bf16 PyTorch computation of the same formula: bf16 operands for every dot (q, k, v, dO,
and p and g = ∂L/∂d² rounded before theirs), fp32 accumulation and softmax, outputs rounded to bf16 — the
precision contract of a tensor-core kernel, and the one FlashAttention keeps.

On CPU the kernels run under TRITON_INTERPRET=1, whose bf16 dot is wrong and whose bf16 cast truncates:
the launcher then feeds the kernel fp32 operands holding bf16 values and rounds p, g and the outputs to
bf16 explicitly (round to nearest even), so every rounding of the GPU kernel happens here too. On a GPU
the same tests run the native bf16 kernels (marked gpu, at realistic shapes).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gravity_sparse.kernels import gravity_attention
from gravity_sparse.kernels.block_index import default_kv_groups

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 0.1


def sharp_case(
    b, hq, hkv, s, d, seed, dtype=torch.bfloat16, clusters=6, spread=0.05, offset=20.0, sep=3.0
):
    """q, k, v (dtype), mass_log: clustered keys around a common offset, queries inside the clusters."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    base = base / base.norm() * offset
    centres = base + sep * torch.randn(b, hkv, clusters, d, generator=gen)
    k_cl = torch.randint(0, clusters, (b, hkv, s), generator=gen)
    k = torch.gather(centres, 2, k_cl[..., None].expand(b, hkv, s, d))
    k = k + spread * torch.randn(b, hkv, s, d, generator=gen)
    groups = default_kv_groups(hq, hkv, torch.device("cpu"))
    q_cl = torch.randint(0, clusters, (b, hq, s), generator=gen)
    q_centres = centres[:, groups]  # (b, hq, clusters, d)
    q = torch.gather(q_centres, 2, q_cl[..., None].expand(b, hq, s, d))
    q = q + spread * torch.randn(b, hq, s, d, generator=gen)
    v = torch.randn(b, hkv, s, d, generator=gen)
    mass_log = torch.rand(hq, generator=gen) * 0.8 + 0.8  # M ≈ 1.1-1.9: in-cluster scores ≈ 3-12
    return (*(t.to(DEVICE, dtype) for t in (q, k, v)), mass_log.to(DEVICE))


def formula(q, k, v, mass_log, dout, low: torch.dtype | None, out_for_delta=None):
    """Dense gravity attention forward + backward by hand, causal, standard GQA.

    low=None: fp64 throughout (the truth). low=bf16/fp16: the 16-bit formula — fp32 math on the given
    16-bit values, p and g rounded to `low` before their dots, outputs rounded to `low`.
    out_for_delta: the forward output the backward reads for δ = rowsum(dO ∘ O) (a backward input, as
    in autograd); default this formula's own rounded output. The 16-bit backward's error is dominated by
    that rounding of O in δ (it leaves Σ_j dS_ij ≠ 0), so the kernel's backward is compared with the
    formula's backward given the same O.
    Returns out, dq, dk, dv, d mass_log.
    """
    work = torch.float64 if low is None else torch.float32

    def rnd(x):
        return x if low is None else x.to(low).to(work)

    hq, hkv = q.shape[1], k.shape[1]
    groups = default_kv_groups(hq, hkv, q.device)
    q, k, v, dout = (t.to(work) for t in (q, k, v, dout))
    kf, vf = k[:, groups], v[:, groups]
    s_len, sk = q.shape[2], k.shape[2]
    allowed = torch.ones(s_len, sk, dtype=torch.bool, device=q.device).tril(sk - s_len)
    raw = q.square().sum(-1)[..., None] + kf.square().sum(-1)[..., None, :] - 2 * q @ kf.mT
    r = 1.0 / (raw.clamp_min(0) + EPS)
    mass = F.softplus(mass_log.to(work)).view(1, hq, 1, 1)
    s = (mass.square() * r).masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p_un = torch.exp(s - m)
    l_sum = p_un.sum(-1, keepdim=True)
    out = rnd(rnd(p_un) @ vf / l_sum)
    p = p_un / l_sum
    o_delta = out if out_for_delta is None else out_for_delta.to(work)
    delta = (dout * o_delta).sum(-1, keepdim=True)
    dp = dout @ vf.mT
    ds = p * (dp - delta)
    s_fin = s.masked_fill(~allowed, 0.0)
    g = rnd(torch.where(raw >= 0, -ds * s_fin * r, 0.0))
    dq = 2 * (g.sum(-1, keepdim=True) * q - g @ kf)
    dk_h = 2 * (g.sum(-2)[..., None] * kf - g.mT @ q)
    dv_h = rnd(p).mT @ dout
    bsz, _, _, d = q.shape
    dk = torch.zeros_like(k).index_add_(1, groups, dk_h)
    dv = torch.zeros_like(v).index_add_(1, groups, dv_h)
    ds_s = (ds * s_fin).sum(dim=(0, 2, 3))
    mass1 = mass.flatten()
    dmass = ds_s * 2.0 / mass1 * torch.sigmoid(mass_log.to(work))
    return out, rnd(dq), rnd(dk), rnd(dv), dmass


def _errors(got, truth):
    return [(g.double() - t.double()).abs().max().item() for g, t in zip(got, truth, strict=True)]


def check_sharp(b, hq, hkv, s, d, block, seed, dtype=torch.bfloat16) -> dict:
    """Kernel vs fp64 truth against the 16-bit formula vs fp64 truth; returns the errors."""
    q, k, v, mass_log = sharp_case(b, hq, hkv, s, d, seed, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE, dtype)
    truth = formula(q, k, v, mass_log, dout, None)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, mass_log)]
    out = gravity_attention(*leaves, block_size=block, backend="triton")
    grads = torch.autograd.grad(out, leaves, dout)
    got = (out.detach(), *grads)
    ideal_fwd = formula(q, k, v, mass_log, dout, dtype)
    ideal_bwd = formula(q, k, v, mass_log, dout, dtype, out_for_delta=got[0])
    ideal = (ideal_fwd[0], *ideal_bwd[1:])
    return {
        "kernel": _errors(got, truth),
        "formula": _errors(ideal, truth),
        "scale": [t.abs().max().item() for t in truth],
    }


NAMES = ("out", "dq", "dk", "dv", "d mass_log")


def assert_within_2x(errs: dict, label: str) -> None:
    for i, name in enumerate(NAMES):
        kern, ideal, scale = errs["kernel"][i], errs["formula"][i], errs["scale"][i]
        floor = 2e-3 * scale  # a few bf16 ulps of the largest entry
        assert kern <= 2.0 * ideal + floor, (
            f"{label} {name}: kernel error {kern:.3e} > 2 x bf16-formula error {ideal:.3e} "
            f"+ {floor:.1e} (max |truth| {scale:.3e})"
        )


def test_sharp_case_is_peaked_and_sensitive() -> None:
    """The case is what it claims: peaked rows, and a lossy d² (centring in bf16) is visibly worse."""
    q, k, v, mass_log = sharp_case(1, 2, 1, 64, 64, seed=0)
    qf, kf = q.double(), k.double()
    d2 = torch.cdist(qf, kf).square()
    s = F.softplus(mass_log.double()).view(1, -1, 1, 1).square() / (d2 + EPS)
    s = s.masked_fill(~torch.ones(64, 64, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    p = s.softmax(-1)
    assert p.amax(-1).median() > 0.3  # one near key takes a large share of a typical row
    # centring q and k by the mean key and rounding to bf16 (the removed scheme) is visibly worse than
    # the bf16 formula: > 4x its output error
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE, q.dtype)
    truth = formula(q, k, v, mass_log, dout, None)[0]
    ideal = formula(q, k, v, mass_log, dout, torch.bfloat16)[0]
    c = kf.mean(2, keepdim=True)
    qc, kc = (qf - c).bfloat16(), (kf - c).bfloat16()
    lossy = formula(qc, kc, v, mass_log, dout, torch.bfloat16)[0]
    assert (lossy - truth).abs().max() > 4 * (ideal - truth).abs().max()


@pytest.mark.parametrize(
    "hq,hkv,s,block",
    [(4, 2, 96, 32), (3, 1, 80, 16)],
    ids=["gqa2-S96-block32", "gqa3-S80-block16-ragged"],
)
def test_bf16_sharp_case_within_2x_of_bf16_formula(hq: int, hkv: int, s: int, block: int) -> None:
    errs = check_sharp(1, hq, hkv, s, 64, block, seed=s + hq)
    assert_within_2x(errs, f"bf16 sharp Hq={hq} S={s} block={block}")


def test_fp16_sharp_case_within_2x_of_fp16_formula() -> None:
    errs = check_sharp(1, 2, 1, 64, 32, 32, seed=9, dtype=torch.float16)
    assert_within_2x(errs, "fp16 sharp")


@pytest.mark.parametrize("d", [64, 128])  # 128: the merge runs in two 64-wide head-dim chunks
def test_sharp_decode_within_2x_of_bf16_formula(d: int) -> None:
    q, k, v, mass_log = sharp_case(1, 4, 2, 70, d, seed=3)
    q = q[:, :, -2:]  # two new tokens against a 70-token cache
    zero = torch.zeros_like(q)
    truth = formula(q, k, v, mass_log, zero, None)[0]
    ideal = formula(q, k, v, mass_log, zero, torch.bfloat16)[0]
    with torch.no_grad():
        out = gravity_attention(q, k, v, mass_log, block_size=32, backend="triton", num_splits=2)
    kern = (out.double() - truth).abs().max().item()
    best = (ideal.double() - truth).abs().max().item()
    assert kern <= 2.0 * best + 2e-3 * truth.abs().max().item(), (kern, best)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_bf16_sharp_case(block: int, d: int) -> None:
    errs = check_sharp(1, 16, 2, 1024 + 37, d, block, seed=block + d)
    assert_within_2x(errs, f"GPU bf16 sharp block={block} D={d}")


def test_sm80_launch_table_bf16_sharp_case(monkeypatch) -> None:
    """The sm_80 table splits 128-key dk/dv tiles into two 64-key programs: run it (interpreted)."""
    from gravity_sparse.kernels import launch, triton_decode, triton_gravity

    if torch.cuda.is_available():
        pytest.skip("the interpreter run of the sm_80 table is for CPU machines")
    monkeypatch.setattr(triton_gravity, "device_arch", lambda device: 80)
    monkeypatch.setattr(triton_decode, "device_arch", lambda device: 80)
    assert launch.prefill_launch("dkdv", torch.bfloat16, 128, 128, arch=80).tile_m == 64
    errs = check_sharp(1, 2, 1, 200, 128, 128, seed=80)
    assert_within_2x(errs, "sm_80 table bf16 sharp block=128 D=128")
