"""Every Triton kernel compiles for sm_90a / sm_80 without a GPU, at the launch parameters it really gets.

`gravity_sparse.kernels.compile_check` runs `triton.compile(..., target=GPUTarget("cuda", arch, 32))`
down to a cubin with the ptxas of the Triton wheel. It runs in a subprocess: this test directory runs
the kernels under TRITON_INTERPRET=1, whose `triton.jit` functions cannot be compiled.

Fast tier: a representative subset on sm_90a (bf16, head_dim 128 — Gravity-2's shape — at blocks 64 and
128, and the forward of a 16-block gathered into 64-row tiles). Slow tier: the whole matrix (bf16/fp16/fp32,
blocks 16–128, head_dim 64/128, decode tiles for GQA groups 1/3/8 × 1/16 tokens) on sm_90a and sm_80;
`python -m gravity_sparse.kernels.compile_check --full --out benchmarks/results/<date>-sm90-compile.md`
regenerates the committed report.
"""

from __future__ import annotations

import json

import pytest
import torch

from gravity_sparse.errors import UserError
from gravity_sparse.kernels.compile_check import run_subprocess
from gravity_sparse.kernels.launch import check_supported, prefill_launch, supported_configs

pytest.importorskip("triton")


def _compile(args: list[str], timeout: float) -> list[dict]:
    proc = run_subprocess([*args, "--json", "--quiet"], timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert lines, f"compile check printed no results (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def _check(results: list[dict]) -> None:
    failed = [r for r in results if not r["ok"]]
    assert not failed, "cannot launch:\n" + "\n".join(
        f"sm_{r['arch']} {r['kernel']} {r['dtype']} block {r['block']} D {r['head_dim']} "
        f"rows {r['rows']}: {r['error']}"
        for r in failed
    )
    spilling = [
        r for r in results if r["dtype"] != "fp32" and r["block"] >= 64 and r["spill_bytes"] != 0
    ]
    assert not spilling, "16-bit kernels spill at block 64/128:\n" + "\n".join(
        f"sm_{r['arch']} {r['kernel']} {r['dtype']} block {r['block']} D {r['head_dim']} "
        f"rows {r['rows']}: {r['spill_bytes']} B (warps {r['num_warps']}, stages "
        f"{r['num_stages']}, tile {r['tile_n']})"
        for r in spilling
    )
    for r in results:  # prefill tiles are >= 64 rows at every mask block: wgmma on sm_90a
        if r["arch"] == 90 and r["dtype"] != "fp32" and r["kernel"] in ("fwd", "dq", "dkdv"):
            assert r["mma"] == "wgmma", f"{r['kernel']} {r['dtype']} block {r['block']}: {r['mma']}"


def test_representative_kernels_compile_for_sm90_without_spills() -> None:
    results = _compile(["--arch", "90", "--jobs", "2"], timeout=600)
    assert {r["kernel"] for r in results} == {"fwd", "dq", "dkdv", "decode", "merge"}
    _check(results)


@pytest.mark.slow
def test_full_matrix_compiles_for_sm90_and_sm80() -> None:
    results = _compile(["--full", "--arch", "90", "80", "--jobs", "2"], timeout=1500)
    assert {r["arch"] for r in results} == {90, 80}
    assert {r["dtype"] for r in results} == {"bf16", "fp16", "fp32"}
    _check(results)


@pytest.mark.parametrize(
    "dtype,block,d,match",
    [
        (torch.bfloat16, 8, 64, "mask blocks 16, 32, 64, 128, got 8"),
        (torch.bfloat16, 48, 64, "mask blocks 16, 32, 64, 128, got 48"),
        (torch.float16, 256, 128, "got 256"),
        (torch.bfloat16, 64, 256, "head_dim 1..128, got 256"),
        (torch.float32, 128, 64, "fp32 inputs run on the triton backend only at mask block <= 64"),
        (torch.float32, 64, 128, "head_dim <= 64"),
    ],
)
def test_unsupported_configs_are_refused_in_one_line(dtype, block, d, match) -> None:
    with pytest.raises(UserError, match=match) as err:
        check_supported(dtype, block, d)
    assert "\n" not in str(err.value)


def test_launcher_refuses_small_mask_block_before_compiling() -> None:
    from gravity_sparse.kernels import gravity_attention

    q = torch.randn(1, 2, 16, 16)
    k = v = torch.randn(1, 1, 16, 16)
    with pytest.raises(UserError, match="mask blocks 16, 32, 64, 128, got 8"):
        gravity_attention(q, k, v, torch.zeros(2), block_size=8, backend="triton")


def test_every_supported_config_has_launch_parameters() -> None:
    configs = supported_configs()
    assert len(configs) >= 19
    for dtype, block, d in configs:
        for kernel in ("fwd", "dq", "dkdv"):
            cfg = prefill_launch(kernel, dtype, block, d)
            assert cfg.tile_m == max(block, 64) and cfg.tile_m % cfg.tile_n == 0
            assert cfg.tile_n >= 16
            assert cfg.num_warps in (4, 8) and 1 <= cfg.num_stages <= 4


def test_perf_model_counts_and_the_reciprocal_cost() -> None:
    from gravity_sparse.kernels.compile_check import CompileResult
    from gravity_sparse.kernels.perf_model import loop_cost, per_element, perf_section

    # exp + reciprocal per score: MUFU-bound at D = 64 (half the tensor peak), exp-only is not
    e = per_element(64, "fwd")
    assert e["gravity"]["overlap"] == pytest.approx(0.5)
    assert e["flash (exp only)"]["overlap"] == pytest.approx(1.0)
    assert per_element(64, "fwd", "newton")["gravity"]["overlap"] > 0.5
    # a 64 x 64 forward step at D = 128, 4 warps: 32 rcp + 32 exp per thread
    r = CompileResult(
        kernel="fwd", arch=90, dtype="bf16", block=64, head_dim=128, rows=0, num_warps=4,
        num_stages=3, tile_n=64, tile_m=64, ok=True,
        loop_sass={"HGMMA": 12, "MUFU": 64, "FFMA": 32, "FMUL": 64, "ALL": 600},
    )  # fmt: skip
    cost = loop_cost(r)
    assert cost.tensor == pytest.approx(2 * 2 * 64 * 64 * 128 / 4096)
    assert cost.mufu == pytest.approx(64 * 128 / 16)
    assert cost.bound() == "issue" and 0 < cost.overlap() <= 1
    text = "\n".join(perf_section([r]))
    assert "| fwd | bf16 | 64 | 128 | 64 x 64 | 4 |" in text
