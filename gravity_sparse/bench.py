"""bench: whole-model throughput, dense gravity vs pruned-sparse, same weights, same device, one run.

Prefill tokens/s at each configured length and decode tokens/s with a KV cache (one token per step after a
prefilled context), median of `repeats` timed runs after `warmup` runs, plus peak memory (CUDA: allocator
peak; CPU: not measured). The sparse model is the pruned model `export` writes (dropped heads removed, block
masks kept) built in memory from the model and the masks; on CUDA its attention runs in the Triton kernel,
on CPU (kernel auto) dense and sparse both run the chunked CPU kernel, which computes every causal block
and masks afterwards — CPU numbers therefore show only what head pruning saves and are labelled as CPU.
Lengths beyond the masks' max_length need `bench.extend: diagonal` (see `masks.extend_masks`).

Kernel-level speed (sparse vs dense kernel, FlexAttention, SDPA) is `benchmarks/bench_attention.py`.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configuration_gravity import GravityConfig
from .errors import UserError
from .export import prune_model
from .kernels.causal_cpu import cpu_gravity_kernel, set_training_kernel
from .masks import Masks, extend_masks
from .modeling_gravity import GravityForCausalLM


@dataclass
class BenchConfig:
    prefill_lengths: list[int] = field(
        default_factory=lambda: [128, 256, 512], metadata={"help": "prefill lengths (tokens)"}
    )
    batch_size: int = field(default=1, metadata={"help": "sequences per forward"})
    decode_context: int = field(default=256, metadata={"help": "prefilled tokens before decoding"})
    decode_tokens: int = field(default=32, metadata={"help": "tokens decoded one by one (timed)"})
    repeats: int = field(default=3, metadata={"help": "timed runs per measurement (median)"})
    warmup: int = field(default=1, metadata={"help": "untimed runs first"})
    kernel: str = field(
        default="auto", metadata={"help": "sparse attention: auto | reference | triton"}
    )
    extend: str = field(
        default="none", metadata={"help": "masks beyond max_length: none (error) | diagonal"}
    )
    synthetic: str | None = field(
        default=None,
        metadata={"help": "gravity2: random weights in Gravity-2's shape instead of model.path"},
    )
    synthetic_layers: int | None = field(
        default=None, metadata={"help": "layers of the synthetic model (default: Gravity-2's 36)"}
    )

    def __post_init__(self) -> None:
        if not self.prefill_lengths or min(self.prefill_lengths) < 1:
            raise UserError("bench.prefill_lengths must be a non-empty list of positive lengths")
        for name in ("batch_size", "decode_context", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"bench.{name} must be at least 1")
        if self.warmup < 0:
            raise UserError("bench.warmup must be ≥ 0")
        if self.extend not in ("none", "diagonal"):
            raise UserError(f"bench.extend must be none or diagonal, not {self.extend!r}")
        if self.kernel not in ("auto", "reference", "triton"):
            raise UserError(f"bench.kernel must be auto, reference or triton, not {self.kernel!r}")
        if self.synthetic not in (None, "gravity2"):
            raise UserError(f"bench.synthetic must be null or gravity2, not {self.synthetic!r}")


def gravity2_config(num_layers: int = 36) -> GravityConfig:
    """Gravity-2's shape (DESIGN §1): hidden 2048, 16 q / 2 kv heads, head_dim 128, Qwen2-3B MLP."""
    return GravityConfig(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def _prefill(model: GravityForCausalLM, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=False, logits_to_keep=1)


@torch.no_grad()
def _decode(model: GravityForCausalLM, context: torch.Tensor, steps: int) -> None:
    out = model(input_ids=context, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)


def _peak(device: torch.device, fn) -> int | None:
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return int(torch.cuda.max_memory_allocated(device))


def sparse_model(
    model: GravityForCausalLM, masks: Masks, cfg: BenchConfig, length: int
) -> GravityForCausalLM:
    """The pruned-sparse model of `model` and `masks`, covering `length` tokens."""
    if length > masks.max_length:
        if cfg.extend == "none":
            raise UserError(
                f"bench length {length} exceeds the masks' max_length {masks.max_length}; "
                "set bench.extend=diagonal to extend the pattern"
            )
        masks = extend_masks(masks, length)
    pruned = prune_model(model, masks).to(next(model.parameters()).device)
    if cfg.kernel == "triton" or (cfg.kernel == "auto" and pruned.device.type == "cuda"):
        from .kernels import attach_kernel

        attach_kernel(pruned, backend="triton")
    elif cfg.kernel == "auto":  # CPU: the chunked CPU kernel, no (B, H, S, S) tensors
        set_training_kernel(pruned, True)
    return pruned


def run_bench(
    model: GravityForCausalLM, masks: Masks, cfg: BenchConfig, seed: int = 0
) -> dict[str, Any]:
    """Time dense vs pruned-sparse prefill and decode; returns rows plus device and versions."""
    device = next(model.parameters()).device
    longest = max(max(cfg.prefill_lengths), cfg.decode_context + cfg.decode_tokens)
    if longest > model.config.max_position_embeddings:
        raise UserError(
            f"bench length {longest} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}"
        )
    sparse = sparse_model(model, masks, cfg, longest)
    dense_cpu = cfg.kernel == "auto" and device.type != "cuda"
    if dense_cpu:  # the dense model through the same chunked CPU kernel as the sparse one
        set_training_kernel(model, True)
    try:
        rows = _bench_rows(model, sparse, cfg, seed, device)
    finally:
        if dense_cpu:
            set_training_kernel(model, False)
    return {
        "device": device_info(device),
        "path": _path(sparse),
        "density": masks.density(),
        "heads_kept": masks.heads_kept(),
        "heads_total": int(masks.head_keep.numel()),
        "batch_size": cfg.batch_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "rows": rows,
        "command": " ".join(sys.argv),
    }


def _path(sparse: GravityForCausalLM) -> str:
    kernels = {getattr(a, "gravity_kernel", None) for a in sparse.gravity_layers()} - {None}
    if not kernels:
        return "reference (PyTorch)"
    if cpu_gravity_kernel in kernels:
        return "CPU kernel (chunked PyTorch, every causal block computed)"
    return "triton kernel"


def _bench_rows(
    model: GravityForCausalLM,
    sparse: GravityForCausalLM,
    cfg: BenchConfig,
    seed: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rows: list[dict[str, Any]] = []
    for length in cfg.prefill_lengths:
        ids = torch.randint(0, vocab, (cfg.batch_size, length), generator=gen).to(device)
        for name, m in (("dense", model), ("sparse", sparse)):
            t = _median_time(lambda m=m, ids=ids: _prefill(m, ids), device, cfg.repeats, cfg.warmup)
            peak = _peak(device, lambda m=m, ids=ids: _prefill(m, ids))
            rows.append(_row("prefill", name, length, cfg.batch_size * length / t, t, peak))
    ctx = torch.randint(0, vocab, (cfg.batch_size, cfg.decode_context), generator=gen).to(device)
    for name, m in (("dense", model), ("sparse", sparse)):
        # decode time = (prefill + steps) − prefill: only the cached single-token steps count
        total = _median_time(
            lambda m=m: _decode(m, ctx, cfg.decode_tokens), device, cfg.repeats, cfg.warmup
        )
        pre = _median_time(lambda m=m: _decode(m, ctx, 0), device, cfg.repeats, cfg.warmup)
        t = max(total - pre, 1e-9)
        peak = _peak(device, lambda m=m: _decode(m, ctx, cfg.decode_tokens))
        rows.append(
            _row(
                "decode", name, cfg.decode_context, cfg.batch_size * cfg.decode_tokens / t, t, peak
            )
        )
    for r in rows:
        if r["model"] == "sparse":
            dense = next(
                d
                for d in rows
                if d["model"] == "dense"
                and d["phase"] == r["phase"]
                and d["seq_len"] == r["seq_len"]
            )
            r["speedup_vs_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
    return rows


def _row(
    phase: str, model: str, seq_len: int, tps: float, seconds: float, peak: int | None
) -> dict[str, Any]:
    return {
        "phase": phase,
        "model": model,
        "seq_len": seq_len,
        "tokens_per_s": round(tps, 2),
        "seconds": round(seconds, 5),
        "peak_memory_bytes": peak,
    }


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=props.total_memory, cuda=torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        info.update(
            name=f"CPU ({platform.processor() or platform.machine()})",
            threads=torch.get_num_threads(),
        )
    return info


def bench_markdown(result: dict[str, Any]) -> str:
    dev = result["device"]
    label = (
        "GPU"
        if dev["type"] == "cuda"
        else "CPU — reference attention, block sparsity not exploited"
    )
    lines = [
        f"### Whole-model throughput ({label})",
        "",
        f"device: {dev['name']}; sparse path: {result['path']}; density {result['density']:.3f}, "
        f"heads {result['heads_kept']}/{result['heads_total']}; batch {result['batch_size']}; "
        f"dtype {result['dtype']}",
        "",
        "| phase | tokens | dense tok/s | sparse tok/s | speed-up | dense peak MiB | sparse peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for d in (r for r in rows if r["model"] == "dense"):
        s = next(
            r
            for r in rows
            if r["model"] == "sparse" and r["phase"] == d["phase"] and r["seq_len"] == d["seq_len"]
        )

        def mib(x):
            return "–" if x is None else f"{x / 2**20:.0f}"

        lines.append(
            f"| {d['phase']} | {d['seq_len']} | {d['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | "
            f"{s['speedup_vs_dense']:.2f}× | {mib(d['peak_memory_bytes'])} | {mib(s['peak_memory_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def write_bench(result: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "bench.md").write_text(bench_markdown(result))
