"""Launch parameters of the Triton gravity kernels: one function per kernel family, used by the launchers
and by the compile check (`compile_check`), so the check compiles exactly what the product launches.

What the launchers support (anything else is refused up front with a one-line `UserError`):

- mask blocks 16, 32, 64, 128 (a power of two; p @ v has K = the key tile, and a tensor-core dot needs
  K ≥ 16);
- head_dim 1..128 (padded to a power of two ≥ 16 in registers);
- bf16 and fp16 at every supported block; fp32 (IEEE dots, the exact path) only at mask blocks ≤ 64 and
  head_dim ≤ 64, where it fits in registers and shared memory — otherwise cast to bf16/fp16 or use
  backend='reference'.

Every configuration listed by `supported_configs` compiles for sm_90a and sm_80 without register spills at
16-bit for blocks 64 and 128 (checked in tests/kernels/test_compile.py; report in
benchmarks/results/*-sm90-compile.md). The program tile of the prefill kernels is `prefill_tile(block)`
rows (mask blocks 16 and 32 are gathered into 64-row tiles, so every prefill dot is a 64-row wgmma tile on
sm_90a). The inner tile `tile_n` (keys for the forward and dq, queries for dk/dv) may be smaller than the
program tile: a kept tile is then walked in `tile_n`-wide pieces, which keeps the s/p/dS tiles and the
pipelined loads small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

MASK_BLOCKS = (16, 32, 64, 128)
MAX_HEAD_DIM = 128
FP32_MAX_BLOCK = 64
FP32_MAX_HEAD_DIM = 64
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KERNELS = ("fwd", "dq", "dkdv", "decode", "merge")


@dataclass(frozen=True)
class LaunchConfig:
    """num_warps / num_stages of one kernel launch, its program tile (rows: queries for the forward
    and dq, keys for dk/dv) and its inner tile (a divisor of the program tile)."""

    num_warps: int
    num_stages: int
    tile_n: int
    tile_m: int = 0


TILE_MIN = (
    64  # a wgmma warpgroup tile has 64 rows: smaller mask blocks are gathered into 64-row tiles
)


def prefill_tile(block: int) -> int:
    """Hardware tile of the prefill kernels for a mask block: the block itself from 64 rows up, else
    64 rows gathering 64 / block mask blocks (the kernels then apply the mask per element, and only on
    tiles that are not entirely kept)."""
    return max(block, TILE_MIN)


def block_d(head_dim: int) -> int:
    """Head dimension padded to a power of two ≥ 16 (the register tile width)."""
    return max(16, 1 << (max(head_dim, 1) - 1).bit_length())


def check_supported(dtype: torch.dtype, block: int, head_dim: int, gpu: bool = True) -> None:
    """UserError (one line, naming the supported range) for a configuration the kernels cannot launch.

    gpu=False (Triton's CPU interpreter) skips the fp32 resource limit, which only a GPU has.
    """
    if block not in MASK_BLOCKS:
        raise UserError(
            f"the triton backend supports mask blocks {', '.join(map(str, MASK_BLOCKS))}, got {block} "
            "(use backend='reference' for other block sizes)"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise UserError(
            f"the triton backend supports head_dim 1..{MAX_HEAD_DIM}, got {head_dim} "
            "(use backend='reference')"
        )
    if dtype not in DTYPES:
        raise UserError(f"the triton backend supports bf16, fp16 and fp32 inputs, got {dtype}")
    if gpu and dtype == torch.float32 and (block > FP32_MAX_BLOCK or head_dim > FP32_MAX_HEAD_DIM):
        raise UserError(
            f"fp32 inputs run on the triton backend only at mask block <= {FP32_MAX_BLOCK} and "
            f"head_dim <= {FP32_MAX_HEAD_DIM} (got block {block}, head_dim {head_dim}): "
            "cast q, k, v to bf16/fp16 or use backend='reference'"
        )


def device_arch(device: torch.device) -> int:
    """The table a device launches from: 90 for Hopper and newer (and the CPU interpreter), 80 below."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def prefill_launch(
    kernel: str, dtype: torch.dtype, block: int, head_dim: int, arch: int = 90
) -> LaunchConfig:
    """Launch parameters of a prefill kernel ("fwd", "dq" or "dkdv") for one configuration.

    Chosen from the compile report (registers, spills, shared memory) of sm_90a, and of sm_80 where its
    mma.sync register layout needs more warps than wgmma (arch 80).
    """
    check_supported(dtype, block, head_dim, gpu=False)  # the launchers check the GPU limits
    wide = block_d(head_dim) > 64
    tile = prefill_tile(block)
    cfg = _prefill_choice(kernel, dtype, tile, wide, block)
    cfg = LaunchConfig(cfg.num_warps, cfg.num_stages, cfg.tile_n, tile)
    if arch < 90:
        cfg = _sm80_override(kernel, dtype, cfg, wide)
    return cfg


def _sm80_override(kernel: str, dtype: torch.dtype, cfg: LaunchConfig, wide: bool) -> LaunchConfig:
    """sm_80: mma.sync keeps both dot operands in registers, so the backward needs 8 warps, 16-query
    steps at 128 x 128, and dk/dv programs of 64 keys (half a 128-key tile) at head_dim 128; the fp32
    forward 8 warps and 16-key steps."""
    tile = cfg.tile_m
    if dtype == torch.float32:
        return LaunchConfig(8, 1, 16, tile) if kernel == "fwd" else cfg
    if kernel == "dq":
        tile_n = 16 if (wide and tile == 128) else min(cfg.tile_n, 32)
        return LaunchConfig(8, min(cfg.num_stages, 2), tile_n, tile)
    if kernel == "dkdv":
        keys = 64 if wide else tile
        return LaunchConfig(8, min(cfg.num_stages, 2), min(cfg.tile_n, 32), keys)
    return cfg


def _prefill_choice(
    kernel: str, dtype: torch.dtype, tile: int, wide: bool, block: int
) -> LaunchConfig:
    if dtype == torch.float32:
        # IEEE dots run on the FMA pipe with their operands in registers: small inner tiles, no
        # multi-stage buffers, and 8 warps for the backward (4 warps or 32-wide steps spill 1-3 KB)
        if kernel == "fwd":
            return LaunchConfig(num_warps=4, num_stages=1, tile_n=32)
        return LaunchConfig(num_warps=8, num_stages=1, tile_n=16)
    if kernel == "fwd":
        if tile == 128:
            return LaunchConfig(num_warps=8, num_stages=2, tile_n=64 if wide else 128)
        if wide and block < tile:  # the partial-tile mask words cost registers: 4 warps spill
            return LaunchConfig(num_warps=8, num_stages=3, tile_n=64)
        return LaunchConfig(num_warps=4, num_stages=3, tile_n=64)
    if kernel == "dq":
        if tile == 128:
            return LaunchConfig(num_warps=8, num_stages=2, tile_n=32 if wide else 64)
        return LaunchConfig(num_warps=4, num_stages=2, tile_n=32 if wide else 64)
    if kernel == "dkdv":
        # dk and dv accumulators (tile x D fp32 each) stay in registers: at D = 128 only 16-query
        # steps with 8 warps and no multi-buffering keep ptxas under 255 registers without spills
        if wide:
            return LaunchConfig(num_warps=8, num_stages=1, tile_n=16)
        if tile == 128:
            return LaunchConfig(num_warps=8, num_stages=1, tile_n=32)
        return LaunchConfig(num_warps=4, num_stages=2, tile_n=32)
    raise ValueError(f"unknown prefill kernel {kernel!r}")


def decode_rows(group_width: int, num_tokens: int) -> int:
    """Rows of the decode tile: the group's kept heads × the new tokens, padded to a power of two ≥ 16."""
    return max(16, 1 << (max(group_width * num_tokens, 1) - 1).bit_length())


def decode_launch(
    dtype: torch.dtype, block: int, head_dim: int, rows: int, arch: int = 90
) -> LaunchConfig:
    """Launch parameters of the split-KV decode kernel (tile_n: keys per step, a divisor of block).

    fp32 at 128 rows (8 heads x > 8 tokens) still spills about 1.2 KB per thread: correct, slow.
    """
    check_supported(dtype, block, head_dim, gpu=False)
    if dtype == torch.float32:
        return LaunchConfig(num_warps=8 if rows >= 64 else 4, num_stages=1, tile_n=16)
    if arch < 90 and rows >= 64:  # mma.sync holds p and v in registers
        return LaunchConfig(num_warps=8, num_stages=1 if rows >= 128 else 2, tile_n=min(block, 32))
    if rows >= 128:
        return LaunchConfig(num_warps=8, num_stages=2, tile_n=min(block, 64))
    return LaunchConfig(num_warps=4, num_stages=3, tile_n=min(block, 64))


def merge_launch(head_dim: int, rows: int) -> LaunchConfig:
    """The decode merge kernel: no dots, but a rows x head_dim fp32 accumulator and partial output in
    registers: enough warps for ≤ 32 fp32 values of each per thread."""
    per_warp = 32 * 32  # fp32 values per warp for 32 of each per thread
    warps = min(16, max(4, 1 << (-(-rows * block_d(head_dim) // per_warp) - 1).bit_length()))
    return LaunchConfig(num_warps=warps, num_stages=1, tile_n=0)


def supported_configs(
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    blocks: tuple[int, ...] = MASK_BLOCKS,
    head_dims: tuple[int, ...] = (64, 128),
) -> list[tuple[torch.dtype, int, int]]:
    """(dtype, block, head_dim) triples the launchers accept, in a stable order."""
    out = []
    for dtype in dtypes:
        for block in blocks:
            for d in head_dims:
                try:
                    check_supported(dtype, block, d)
                except UserError:
                    continue
                out.append((dtype, block, d))
    return out
