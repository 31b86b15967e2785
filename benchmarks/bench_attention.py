"""Gravity-attention kernel benchmark: Triton block-sparse vs all-kept vs FlexAttention vs reference vs SDPA.

Gravity-2's head layout (16 query / 2 KV heads), S from 1k to 32k, D in {64, 128}, block densities
{1.0, 0.5, 0.3, 0.1} (masks keep the diagonal, a local band, a sink column and a random subset). Modes:
forward, forward+backward, decode (one query against a cache of S). Each time sits next to the max
error of that backend against the reference (on the last rows when the full reference would not fit), and
next to achieved TFLOP/s (only the computed tiles count: 4·B²·D per tile, so a dense causal forward is
2·S²·D per head; forward+backward counts 3.5× the forward) or, for decode, the bandwidth over the bytes of
the kept K/V blocks, against the device's peak.

    python benchmarks/bench_attention.py --out benchmarks/results/2025-01-01-h100   # writes .json + .md
    python benchmarks/bench_attention.py --smoke --out /tmp/smoke                   # CPU, reference only

Needs CUDA (exit 2 without it) unless --smoke.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import provenance  # noqa: E402

from gravity_sparse.kernels import build_block_index, gravity_attention  # noqa: E402
from gravity_sparse.kernels.block_index import BlockIndex, default_kv_groups  # noqa: E402

# dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s), by device-name substring
PEAKS = {
    "H200": (989.0, 4.8),
    "H100 PCIe": (756.0, 2.0),
    "H100 NVL": (835.0, 3.9),
    "H100": (989.0, 3.35),
    "A100": (312.0, 2.0),
    "L40S": (362.0, 0.864),
}
ERROR_ROWS = 256  # rows checked against the reference when the full reference does not fit


def device_peak(name: str) -> tuple[float | None, float | None]:
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    return None, None


def make_block_mask(
    heads: int, nb: int, density: float, gen: torch.Generator, local_share: float = 0.5
) -> torch.Tensor:
    """(heads, nb, nb) causal block mask keeping about `density` of the causal blocks per head.

    The diagonal always; then a local band and the first (sink) column take `local_share` of the rest
    of the budget, random blocks the remainder.
    """
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    budget = max(nb, round(density * nb * (nb + 1) / 2))
    qb = torch.arange(nb).view(-1, 1)
    kb = torch.arange(nb).view(1, -1)
    width = max(1, int(local_share * (budget - nb) / nb))
    local = ((qb - kb) <= width) | (kb == 0)
    masks = []
    for _ in range(heads):
        priority = torch.rand(nb, nb, generator=gen)
        priority = priority + local * 1.0 + (qb == kb) * 10.0
        priority = priority.masked_fill(~causal, -1.0)
        keep = torch.zeros(nb * nb, dtype=torch.bool)
        keep[priority.flatten().topk(budget).indices] = True
        masks.append(keep.view(nb, nb) & causal)
    return torch.stack(masks)


def bench(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() (triton's do_bench on CUDA, wall clock on CPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=iters, return_mode="median"))
    import time

    for _ in range(2):
        fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def reference_fits(
    b: int, hq: int, s: int, sk: int, device: torch.device, limit_gib: float
) -> bool:
    # the reference holds ~6 fp32 (B, Hq, S, Sk) tensors at once (d², scores, probs, masks, grads)
    need = 6 * b * hq * s * sk * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.8 * free and need < limit_gib * 2**30
    return need < limit_gib * 2**30


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max())


class Case:
    """One (S, D, density) problem with its inputs, masks and index lists."""

    def __init__(self, args, s: int, d: int, density: float, device: torch.device, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.b, self.hq, self.hkv, self.s, self.d = args.batch, args.heads, args.kv_heads, s, d
        self.bs = args.block_size
        self.dtype = torch.float32 if args.smoke else torch.bfloat16

        def rand(*shape):
            return (0.3 * torch.randn(*shape, generator=gen)).to(device, self.dtype)

        self.q = rand(self.b, self.hq, s, d)
        self.k, self.v = rand(self.b, self.hkv, s, d), rand(self.b, self.hkv, s, d)
        self.mass_log = (torch.rand(self.hq, generator=gen) + 1.0).to(device)
        self.groups = default_kv_groups(self.hq, self.hkv, device)
        nb = -(-s // self.bs)
        self.block_mask = make_block_mask(self.hq, nb, density, gen).to(device)
        self.all_kept = torch.ones_like(self.block_mask).tril()
        self.index = self._index(self.block_mask, s, s, device)
        self.index_all = self._index(self.all_kept, s, s, device)
        self.decode_index = self._index(self.block_mask, 1, s, device)
        self.decode_index_all = self._index(self.all_kept, 1, s, device)
        self.density = self.index.computed_blocks() / (self.hq * nb * (nb + 1) / 2)

    def _index(self, mask: torch.Tensor, s: int, sk: int, device: torch.device) -> BlockIndex:
        return build_block_index(
            mask, None, self.groups, num_kv_heads=self.hkv, seq_len_q=s, seq_len_k=sk,
            block_size=self.bs, device=device,
        )  # fmt: skip

    def tile_flops(self, index: BlockIndex) -> float:
        return self.b * index.computed_blocks() * 4.0 * self.bs * self.bs * self.d

    def dense_flops(self) -> float:
        return self.b * self.hq * 2.0 * self.s * self.s * self.d

    def decode_bytes(self, index: BlockIndex) -> float:
        # K and V of every kept block, read once per (batch, KV head) group
        blocks = float(index.dec_num.sum())
        return self.b * blocks * self.bs * self.d * 2 * self.q.element_size()


def run_case(case: Case, args, device: torch.device, peaks, rows: list[dict]) -> None:
    peak_tflops, peak_tbs = peaks
    b, hq, s = case.b, case.hq, case.s
    ref_ok = reference_fits(b, hq, s, s, device, args.reference_max_gib)
    q, k, v, ml = case.q, case.k, case.v, case.mass_log

    def attend(backend, mask, index, q_=q, **kw):
        return gravity_attention(
            q_, k, v, ml, block_mask=mask, block_size=case.bs, backend=backend, kv_groups=case.groups,
            block_index=index, **kw,
        )  # fmt: skip

    def reference(mask, rows_only: bool):
        q_ = q[:, :, -ERROR_ROWS:] if rows_only else q
        return gravity_attention(
            q_, k, v, ml, block_mask=mask, block_size=case.bs, backend="reference",
            kv_groups=case.groups,
        )  # fmt: skip

    def record(mode, backend, ms, flops=None, nbytes=None, err=None, note=""):
        row = dict(
            mode=mode, seq_len=s, head_dim=case.d, density_target=args_density, density=case.density,
            backend=backend, ms=ms, max_err=err, note=note,
        )  # fmt: skip
        if flops is not None and ms:
            row["tflops"] = flops / (ms * 1e-3) / 1e12
            row["pct_peak"] = 100 * row["tflops"] / peak_tflops if peak_tflops else None
        if nbytes is not None and ms:
            row["gbps"] = nbytes / (ms * 1e-3) / 1e9
            row["pct_hbm"] = 100 * row["gbps"] / (peak_tbs * 1e3) if peak_tbs else None
        rows.append(row)
        print(json.dumps(row), flush=True)

    args_density = case.density_target
    err_note = "" if ref_ok else f"error on the last {ERROR_ROWS} rows"
    refs = {}
    with torch.no_grad():
        for name, mask in (("sparse", case.block_mask), ("all", case.all_kept)):
            refs[name] = reference(mask, rows_only=not ref_ok)

    def err_of(out, which):
        return max_err(out if ref_ok else out[:, :, -ERROR_ROWS:], refs[which])

    backends = [
        ("triton sparse", "triton", case.block_mask, case.index, "sparse"),
        ("triton all-kept", "triton", case.all_kept, case.index_all, "all"),
        ("flex same mask", "flex", case.block_mask, case.index, "sparse"),
        ("reference", "reference", case.block_mask, None, "sparse"),
    ]
    if args.smoke:
        backends = [x for x in backends if x[1] == "reference"]
    for label, backend, mask, index, which in backends:
        if backend == "reference" and not ref_ok:
            for mode in args.modes:
                record(mode, label, None, note="skipped: would not fit in memory")
            continue
        flops = case.tile_flops(case.index if which == "sparse" else case.index_all)
        if "fwd" in args.modes:
            try:
                with torch.no_grad():
                    out = attend(backend, mask, index)
                    err = err_of(out, which)
                    ms = bench(partial(attend, backend, mask, index), device, args.warmup, args.rep)
                record("fwd", label, ms, flops=flops, err=err, note=err_note)
            except Exception as exc:  # a failing peer must not end the run; the row says why
                record("fwd", label, None, note=f"failed: {type(exc).__name__}: {exc}"[:300])
        if "fwdbwd" in args.modes:
            try:
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, ml)]
                step = partial(
                    fwd_bwd_step, gravity_attention, leaves, torch.randn_like(q), block_mask=mask,
                    block_size=case.bs, backend=backend, kv_groups=case.groups, block_index=index,
                )  # fmt: skip
                ms = bench(step, device, args.warmup, args.rep)
                record("fwdbwd", label, ms, flops=3.5 * flops, note="gradients not compared")
            except Exception as exc:
                record("fwdbwd", label, None, note=f"failed: {type(exc).__name__}: {exc}"[:300])
        if "decode" in args.modes:
            dec_index = case.decode_index if which == "sparse" else case.decode_index_all
            q1 = q[:, :, -1:]
            try:
                with torch.no_grad():
                    ref1 = gravity_attention(
                        q1, k, v, ml, block_mask=mask, block_size=case.bs, backend="reference",
                        kv_groups=case.groups,
                    )  # fmt: skip
                    step = partial(
                        attend, backend, mask, dec_index if backend != "reference" else None, q_=q1
                    )
                    err = max_err(step(), ref1)
                    ms = bench(step, device, args.warmup, args.rep)
                record("decode", label, ms, nbytes=case.decode_bytes(dec_index), err=err)
            except Exception as exc:
                record("decode", label, None, note=f"failed: {type(exc).__name__}: {exc}"[:300])

    if device.type == "cuda" and case.d <= 256:
        run_sdpa(case, args, device, record)


def sdpa_flash(q, k, v, *, is_causal: bool, kind: str = "flash") -> torch.Tensor:
    """torch SDPA pinned to one backend: "flash" (FlashAttention-2) or "cudnn" (cuDNN attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if kind == "flash" else SDPBackend.CUDNN_ATTENTION
    if kind == "cudnn" and k.shape[1] != q.shape[1]:  # cuDNN SDPA wants equal head counts
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, enable_gqa=kind == "flash"
        )


def fwd_bwd_step(attention: Callable, leaves: list[torch.Tensor], grad: torch.Tensor, **kw) -> None:
    out = attention(*leaves, **kw)
    torch.autograd.grad(out, leaves, grad)


def run_sdpa(case: Case, args, device, record) -> None:
    """torch SDPA flash and cuDNN (standard softmax attention): speed-of-light references, not gravity."""
    q, k, v = case.q, case.k, case.v
    note = "standard attention (not gravity): no error column"
    flops = case.dense_flops()
    for kind in ("flash", "cudnn"):
        label = f"sdpa {kind}"
        attn = partial(sdpa_flash, kind=kind)
        for mode in args.modes:
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        ms = bench(partial(attn, q, k, v, is_causal=True), device, args.warmup,
                                   args.rep)  # fmt: skip
                    record("fwd", label, ms, flops=flops, note=note)
                elif mode == "fwdbwd":
                    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                    step = partial(fwd_bwd_step, attn, leaves, torch.randn_like(q), is_causal=True)
                    ms = bench(step, device, args.warmup, args.rep)
                    record("fwdbwd", label, ms, flops=3.5 * flops, note=note)
                elif mode == "decode":
                    q1 = q[:, :, -1:]
                    with torch.no_grad():
                        ms = bench(partial(attn, q1, k, v, is_causal=False), device, args.warmup,
                                   args.rep)  # fmt: skip
                    nbytes = case.b * case.hkv * case.s * case.d * 2 * q.element_size()
                    record("decode", label, ms, nbytes=nbytes, note=note)
            except Exception as exc:
                record(mode, label, None, note=f"failed: {type(exc).__name__}: {exc}"[:300])


def environment(device: torch.device) -> dict:
    info = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name, sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
        )  # fmt: skip
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True, timeout=30,
            ).stdout.strip().splitlines()[0]  # fmt: skip
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    else:
        info.update(device_name=platform.processor() or "cpu", driver=None)
    peak_tflops, peak_tbs = device_peak(info["device_name"])
    info.update(peak_bf16_tflops=peak_tflops, peak_hbm_tbs=peak_tbs)
    return info


def fmt(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Gravity attention kernel benchmark",
        "",
        f"- device: {meta['device_name']} (driver {meta.get('driver')}, CUDA {meta.get('cuda')})",
        f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}",
        f"- peak: {meta['peak_bf16_tflops']} TFLOP/s bf16, {meta['peak_hbm_tbs']} TB/s HBM",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- layout: batch {meta['batch']}, {meta['heads']} query / {meta['kv_heads']} KV heads, "
        f"block {meta['block_size']}, {meta['dtype']}",
        "",
        "TFLOP/s count only computed tiles (4·B²·D each; dense causal forward = 2·S²·D per head; "
        "forward+backward = 3.5× forward). Decode GB/s is over the bytes of the kept K/V blocks. "
        "max err: against the reference (fp32 math) on the same inputs.",
        "",
    ]
    for mode in ("fwd", "fwdbwd", "decode"):
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        lines += [f"## {mode}", ""]
        rate = "GB/s | % HBM" if mode == "decode" else "TFLOP/s | % peak"
        lines += [
            f"| S | D | density (target / actual) | backend | ms | {rate} | max err | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mode_rows:
            speed = (r.get("gbps"), r.get("pct_hbm")) if mode == "decode" else (
                r.get("tflops"), r.get("pct_peak"))  # fmt: skip
            lines.append(
                f"| {r['seq_len']} | {r['head_dim']} | {fmt(r['density_target'])} / "
                f"{fmt(r['density'])} | {r['backend']} | {fmt(r['ms'])} | {fmt(speed[0])} | "
                f"{fmt(speed[1])} | {fmt(r['max_err'])} | {r['note']} |"
            )
        lines.append("")
    lines += ["## Ratios (same S, D, density)", "", *ratios(rows), ""]
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """Issue targets: sparse/all-kept vs density, all-kept vs SDPA, triton vs flex."""
    out = [
        "| mode | S | D | density | sparse / all-kept time | ÷ density | all-kept vs SDPA speed "
        "| triton vs flex speed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["mode"], r["seq_len"], r["head_dim"], r["density_target"]) for r in rows})
    for mode, s, d, dens in keys:
        by = {
            r["backend"]: r["ms"]
            for r in rows
            if (r["mode"], r["seq_len"], r["head_dim"], r["density_target"]) == (mode, s, d, dens)
        }
        sp, al, fl, sd = (
            by.get(x) for x in ("triton sparse", "triton all-kept", "flex same mask", "sdpa flash")
        )
        frac = sp / al if sp and al else None
        dens_actual = next(
            r["density"]
            for r in rows
            if (r["seq_len"], r["head_dim"], r["density_target"]) == (s, d, dens)
        )
        out.append(
            f"| {mode} | {s} | {d} | {fmt(dens_actual)} | {fmt(frac)} | "
            f"{fmt(frac / dens_actual if frac else None)} | {fmt(sd / al if sd and al else None)} | "
            f"{fmt(fl / sp if fl and sp else None)} |"
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", required=True, help="output path without suffix: writes OUT.json, OUT.md"
    )
    p.add_argument(
        "--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768]
    )
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.1])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd", "decode"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16, help="query heads (Gravity-2: 16)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (Gravity-2: 2)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    p.add_argument("--reference-max-gib", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="one tiny CPU config through the reference")
    args = p.parse_args(argv)
    bad = [m for m in args.modes if m not in ("fwd", "fwdbwd", "decode")]
    if bad:
        p.error(f"unknown modes {bad}; choose from fwd fwdbwd decode")
    if args.smoke:
        args.seq_lens, args.head_dims, args.densities = [128], [16], [0.5]
        args.heads, args.kv_heads, args.block_size, args.batch = 4, 2, 16, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print(
            "error: bench_attention.py needs a CUDA GPU (the Triton and FlexAttention kernels); "
            "use --smoke to check the script itself on CPU",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    meta = environment(device)
    meta.update(
        batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, block_size=args.block_size,
        dtype="float32" if args.smoke else "bfloat16", smoke=args.smoke,
    )  # fmt: skip
    meta["provenance"] = provenance(vars(args))  # git revision and the config of this run
    peaks = (meta["peak_bf16_tflops"], meta["peak_hbm_tbs"])
    rows: list[dict] = []
    for s in args.seq_lens:
        for d in args.head_dims:
            for density in args.densities:
                case = Case(args, s, d, density, device, seed=args.seed + s + d)
                case.density_target = density
                run_case(case, args, device, peaks, rows)
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    json_path, md_path = Path(f"{args.out}.json"), Path(f"{args.out}.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md_path.write_text(markdown(meta, rows))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
