"""Compile every Triton gravity kernel for a GPU that is not there: sm_90a (H100/H200) and sm_80 (A100).

    python -m gravity_sparse.kernels.compile_check [--full] [--arch 90 80] [--out benchmarks/results/X.md]

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs Triton's whole pipeline down to
a cubin with the ptxas shipped in the Triton wheel; no driver or GPU is needed. For each configuration the
product launches (`launch.py` picks num_warps, num_stages and the inner tile; the kernels' launchers use
the same functions) it records registers, spill bytes, shared memory, the tensor-core instruction family
(wgmma on sm_90a, mma.sync otherwise) and per-kernel SASS instruction counts for the performance model
(`perf_model.py`). A configuration that cannot launch (shared memory over the limit, a compile error)
is a failure in the report and in tests/kernels/test_compile.py.

Triton's interpreter (TRITON_INTERPRET=1, set by the kernel tests on CPU) replaces `triton.jit` functions
by interpreted ones that cannot be compiled, so run this in a process without it: the tests call it in a
subprocess (`run_subprocess`), which clears the variable.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .launch import DTYPES, MASK_BLOCKS, LaunchConfig, supported_configs
from .launch import KERNELS as KERNEL_NAMES

SHARED_LIMIT = {90: 232_448, 80: 166_912}  # opt-in dynamic shared memory per block (bytes)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
GQA_GROUPS = (1, 3, 8)
DECODE_TOKENS = (1, 16)  # new tokens per decode step (rows = group x tokens; decode takes <= 16)


@dataclass
class CompileResult:
    """One compiled (kernel, configuration, arch)."""

    kernel: str
    arch: int
    dtype: str
    block: int
    head_dim: int
    rows: int  # decode tile rows (group x tokens), 0 for prefill
    num_warps: int
    num_stages: int
    tile_n: int
    tile_m: int = 0  # program tile (prefill; mask blocks < 64 are gathered into 64-row tiles)
    ok: bool = False
    error: str = ""
    regs: int = 0
    spill_bytes: int = 0  # spill stores + loads reported by ptxas (0 when unknown, see stack)
    stack: int = 0  # per-thread stack frame (spills live here)
    shared: int = 0  # dynamic shared memory Triton allocates (bytes)
    mma: str = ""  # wgmma / mma.sync / none
    seconds: float = 0.0
    sass: dict[str, int] = field(default_factory=dict)  # instruction counts (whole kernel)
    loop_sass: dict[str, int] = field(default_factory=dict)  # counts inside the hottest loop body


def _tools_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


# strides of contiguous (B, H, S|rows, D) tensors: multiples of D (and of 16 for D = 64, 128)
_ALIGNED_STRIDE = re.compile(r"^s(q|k|v|o|do|dq|dk|dv)[bhsr]$")


def _signature(fn, io_dtype: str, pointers: dict[str, str], constexprs: dict, floats=("eps",)):
    """Triton signature + divisibility attributes of a kernel from its argument names.

    pointers: name -> element type ("io" for the input dtype). Every other argument is an i32 scalar
    (strides, sizes) or an fp32 (eps). Pointers are 16-byte aligned (torch allocations are) and so are
    the strides of contiguous (B, H, S, D) tensors with D a multiple of 16, as the launcher's runtime
    specialisation would see them; sequence lengths get no divisibility hint (they are arbitrary).
    """
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            ty = pointers[name]
            sig[name] = "*" + (io_dtype if ty == "io" else ty)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if _ALIGNED_STRIDE.match(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _specs(kernel: str, dtype: torch.dtype, block: int, head_dim: int, rows: int, arch: int):
    """(jit function, pointer types, constexprs, launch config) of one kernel configuration."""
    from . import triton_decode, triton_gravity

    if kernel in ("fwd", "dq", "dkdv"):
        fn, pointers = triton_gravity.KERNELS[kernel]
        constexprs, cfg = triton_gravity.kernel_meta(kernel, dtype, block, head_dim, arch=arch)
    elif kernel == "decode":
        fn, pointers = triton_decode.KERNELS[kernel]
        constexprs, cfg = triton_decode.kernel_meta(dtype, block, head_dim, rows, arch=arch)
    elif kernel == "merge":
        fn, pointers = triton_decode.KERNELS[kernel]
        constexprs, cfg = triton_decode.merge_meta(head_dim, rows)
    else:
        raise ValueError(kernel)
    return fn, pointers, constexprs, cfg


_SASS_CLASSES = {
    "HGMMA": r"\bHGMMA\b",
    "HMMA": r"\bHMMA\b",
    "MUFU.RCP": r"\bMUFU\.RCP\b",
    "MUFU.EX2": r"\bMUFU\.EX2\b",
    "MUFU": r"\bMUFU\b",
    "FFMA": r"\bFFMA\b",
    "FMUL": r"\bFMUL\b",
    "FADD": r"\bFADD\b",
    "FMNMX": r"\bFMNMX\b",
    "FSEL": r"\bFSEL\b",
    "FSETP": r"\bFSETP\b",
    "F2F": r"\bF2F\b|\bF2FP\b",
    "LDL": r"\bLDL\b",
    "STL": r"\bSTL\b",
    "LDS": r"\bLDS\b|\bLDSM\b",
    "LDG": r"\bLDG\b|\bLDGSTS\b|\bUTMALDG\b",
    "ALL": r"^\s*/\*[0-9a-f]{4,}\*/\s+\S",
}


def _count(lines: list[str]) -> dict[str, int]:
    counts = {}
    for name, pat in _SASS_CLASSES.items():
        rx = re.compile(pat)
        counts[name] = sum(1 for line in lines if rx.search(line))
    return counts


def _hot_loop(lines: list[str]) -> list[str]:
    """The SASS of the loop body that holds the most tensor-core instructions.

    A loop is a backward branch (BRA to an earlier label); take the label..branch span with the most
    HGMMA/HMMA lines (the inner loop over key/query tiles).
    """
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^\s*\.?(L_x_\d+):", line) or re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1).lstrip(".")] = i
    best: list[str] = []
    best_mma = -1
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b[^`]*`?\(?\.?(L_x_\d+)", line)
        if not m:
            continue
        start = labels.get(m.group(1))
        if start is None or start >= i:
            continue
        body = lines[start : i + 1]
        n = sum(1 for b in body if re.search(r"\bH(G)?MMA\b", b))
        if n > best_mma or (n == best_mma and len(body) < len(best)):
            best, best_mma = body, n
    return best


def _ptxas_log(run) -> tuple[object, str]:
    """Run a compile with Triton's ptxas log printed to stdout (Triton >= 3.4 knob), captured."""
    try:
        from triton import knobs

        old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cache hit would print no ptxas log
    except (ImportError, AttributeError):  # older Triton: no log, fall back on the stack frame
        return run(), ""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            result = run()
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    return result, buf.getvalue()


def compile_one(kernel: str, dtype: torch.dtype, block: int, head_dim: int, arch: int,
                rows: int = 0, cfg: LaunchConfig | None = None) -> CompileResult:  # fmt: skip
    """Compile one kernel configuration for sm_<arch> (sm_90a for 90) and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, pointers, constexprs, picked = _specs(kernel, dtype, block, head_dim, rows, arch)
    cfg = cfg or picked
    res = CompileResult(
        kernel=kernel, arch=arch, dtype=DTYPE_NAMES[dtype], block=block, head_dim=head_dim,
        rows=rows, num_warps=cfg.num_warps, num_stages=cfg.num_stages, tile_n=cfg.tile_n,
        tile_m=cfg.tile_m,
    )  # fmt: skip
    if cfg is not picked:
        constexprs = dict(constexprs, TILE_N=cfg.tile_n) if "TILE_N" in constexprs else constexprs
    sig, attrs = _signature(fn, DTYPE_NAMES[dtype], pointers, constexprs)
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn, sig, constexprs, attrs)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

        def run():
            return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)

        compiled, log = _ptxas_log(run)
    except Exception as err:  # noqa: BLE001 - every failure is a report row
        res.seconds = time.perf_counter() - t0
        res.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
        return res
    res.seconds = time.perf_counter() - t0
    md = compiled.metadata
    res.shared = int(getattr(md, "shared", 0) or 0)
    ptx = compiled.asm.get("ptx", "")
    res.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if spills:
        res.spill_bytes = sum(int(a) + int(b) for a, b in spills)
    regs = re.findall(r"Used (\d+) registers", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    res.regs = int(regs[-1]) if regs else 0
    res.stack = int(stack[-1]) if stack else 0
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tools = _tools_dir()
        if not regs:
            usage = subprocess.run(
                [str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                capture_output=True, text=True, check=False,
            ).stdout  # fmt: skip
            m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            if m:
                res.regs, res.stack = int(m.group(1)), int(m.group(2))
        sass = subprocess.run(
            [str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=False
        ).stdout.splitlines()
    res.sass = _count(sass)
    res.loop_sass = _count(_hot_loop(sass))
    if not spills and res.sass.get("STL", 0):
        res.spill_bytes = -1  # spills present, size unknown
    limit = SHARED_LIMIT[arch]
    if res.shared > limit:
        res.error = f"OutOfResources: shared memory {res.shared} B > {limit} B"
        return res
    res.ok = True
    return res


def matrix(full: bool, archs: tuple[int, ...] = (90, 80)) -> list[tuple]:
    """(kernel, dtype, block, head_dim, arch, rows) of the check: the full product matrix, or the
    representative subset the fast test tier compiles."""
    jobs = []
    if full:
        configs = supported_configs()
    else:  # Gravity-2's shape (bf16, head_dim 128) at blocks 64/128, and a gathered 16-block tile
        configs = supported_configs((torch.bfloat16,), (16, 64, 128), (128,))
    for arch in archs:
        for dtype, block, d in configs:
            for kernel in ("fwd", "dq", "dkdv"):
                if full or block >= 64 or kernel == "fwd":
                    jobs.append((kernel, dtype, block, d, arch, 0))
            for rows in _decode_rows(full, block) if full or block >= 64 else []:
                jobs.append(("decode", dtype, block, d, arch, rows))
        for d in (64, 128) if full else (128,):
            for rows in sorted({r for b in MASK_BLOCKS for r in _decode_rows(full, b)}):
                jobs.append(("merge", torch.bfloat16, 64, d, arch, rows))
        if not full:
            break  # the fast tier: sm_90a only
    return jobs


def _decode_rows(full: bool, block: int) -> list[int]:
    from .launch import decode_rows

    if not full:
        return [decode_rows(8, 1)]
    return sorted({decode_rows(g, t) for g in GQA_GROUPS for t in DECODE_TOKENS})


def _compile_job(job: tuple) -> CompileResult:
    kernel, dtype, block, d, arch, rows = job
    return compile_one(kernel, dtype, block, d, arch, rows)


def run_matrix(jobs: list[tuple], progress: bool = False, workers: int = 1) -> list[CompileResult]:
    """Compile every job (in `workers` processes; results in job order)."""
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_compile_job, jobs))
    else:
        results = []
        for job in jobs:
            results.append(_compile_job(job))
            if progress:
                _print_progress(len(results), len(jobs), results[-1])
    return results


def _print_progress(i: int, n: int, res: CompileResult) -> None:
    state = "ok" if res.ok else "FAIL"
    print(
        f"[{i}/{n}] sm_{res.arch} {res.kernel} {res.dtype} block {res.block} D {res.head_dim} "
        f"rows {res.rows}: {state} regs {res.regs} spill {res.spill_bytes} smem {res.shared} "
        f"({res.seconds:.1f}s) {res.error}",
        file=sys.stderr,
        flush=True,
    )


def refused_rows() -> list[str]:
    """The configurations the launchers refuse, with the one-line message the user sees."""
    from ..errors import UserError
    from .launch import check_supported

    rows = []
    for dtype in DTYPES:
        for block in (8, 16, 48, 64, 128, 256):
            for d in (64, 128, 256):
                try:
                    check_supported(dtype, block, d)
                except UserError as err:
                    rows.append(f"| {DTYPE_NAMES[dtype]} | {block} | {d} | {err} |")
    return rows


def markdown(results: list[CompileResult], command: str) -> str:
    import triton

    from .perf_model import perf_section

    lines = [
        "# Triton gravity kernels compiled for sm_90a / sm_80 without a GPU",
        "",
        f"Command: `{command}`  ",
        f"triton {triton.__version__}, torch {torch.__version__}; compiled with "
        "`triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))` and the ptxas of the "
        "Triton wheel. Launch parameters are the ones `gravity_sparse/kernels/launch.py` picks (the "
        "launchers call the same functions). regs: registers per thread; spill: ptxas spill stores + "
        "loads in bytes per thread; smem: dynamic shared memory (limit 232,448 B on sm_90a, "
        "166,912 B on sm_80); mma: tensor-core instruction family in the PTX. rows: decode tile rows "
        "(kept heads of a KV group x new tokens, padded to >= 16); tile_m: rows of a prefill program "
        "(mask blocks 16/32 are gathered into 64-row tiles); tile_n: keys (queries for dkdv) per "
        "inner step. No GPU ran anything here.",
        "",
    ]
    bad = [r for r in results if not r.ok]
    spill16 = [
        r for r in results
        if r.ok and r.dtype != "fp32" and r.block >= 64 and r.spill_bytes and r.kernel != "merge"
    ]  # fmt: skip
    lines += [
        f"{len(results)} compiles: {len(results) - len(bad)} fit, {len(bad)} cannot launch; "
        f"{len(spill16)} 16-bit configurations at block 64/128 spill.",
        "",
        "| arch | kernel | dtype | block | D | rows | tile_m | warps | stages | tile_n | regs | "
        "spill B | smem B | mma | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        status = "ok" if r.ok else r.error.replace("|", "/")
        lines.append(
            f"| sm_{r.arch} | {r.kernel} | {r.dtype} | {r.block} | {r.head_dim} | {r.rows or ''} | "
            f"{r.tile_m or ''} | {r.num_warps} | {r.num_stages} | {r.tile_n or ''} | {r.regs} | {r.spill_bytes} | "
            f"{r.shared} | {r.mma} | {status} |"
        )
    lines += [
        "",
        "## Refused up front",
        "",
        "The launchers raise these one-line errors before any compile:",
        "",
        "| dtype | block | D | message |",
        "|---|---|---|---|",
        *refused_rows(),
        "",
    ]
    lines += perf_section(results)
    return "\n".join(lines) + "\n"


def run_subprocess(args: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run this module in a fresh Python without TRITON_INTERPRET (tests use it from the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "gravity_sparse.kernels.compile_check", *args]
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole product matrix")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[90, 80])
    parser.add_argument("--out", type=Path, help="write the markdown report here (+ .json beside)")
    parser.add_argument(
        "--kernels", nargs="+", choices=list(KERNEL_NAMES), help="only these kernels"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument(
        "--render", type=Path, help="no compiling: rewrite --out from the results of this .json"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.render:
        saved = json.loads(args.render.read_text())
        results = [CompileResult(**r) for r in saved["results"]]
        command = saved["command"]
    else:
        jobs = matrix(args.full, tuple(args.arch))
        if args.kernels:
            jobs = [j for j in jobs if j[0] in args.kernels]
        results = run_matrix(jobs, progress=not args.quiet, workers=args.jobs)
        command = "python -m gravity_sparse.kernels.compile_check " + " ".join(argv or sys.argv[1:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(results, command.strip()))
        saved = {"command": command.strip(), "results": [asdict(r) for r in results]}
        args.out.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
