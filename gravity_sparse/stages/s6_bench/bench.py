"""bench: whole-model throughput, dense gravity vs pruned-sparse, same weights, same device, one run.

Prefill tokens/s at each configured length and decode tokens/s with a KV cache (one token per step after a
prefilled context), median of `repeats` timed runs after `warmup` runs, plus peak memory (CUDA: allocator
peak; CPU: not measured). The sparse model is the pruned model `export` writes (dropped heads removed, block
masks kept) built in memory from the model and the masks; the dense model is the same construction with
every block of every head kept. Both run through the same attention backend (`bench.kernel`, resolved by
`kernels.resolve_backend`: Triton on CUDA, the chunked CPU kernel on CPU), so the speed-up is the
sparsity's alone. Lengths beyond the masks' max_length need `bench.extend: diagonal` (see
`masks.extend_masks`).

Kernel-level speed (sparse vs dense kernel, FlexAttention, SDPA) is `benchmarks/bench_attention.py`.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from gravity_sparse.errors import UserError
from gravity_sparse.kernels import Backend, attach_kernel
from gravity_sparse.model.configuration_gravity import GravityConfig
from gravity_sparse.model.masks import Masks, dense_masks, extend_masks
from gravity_sparse.model.modeling_gravity import GravityForCausalLM, cache_kwarg
from gravity_sparse.stages.s5_export.export import prune_model
from gravity_sparse.stages.s6_bench.config import BenchConfig


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
    cache = DynamicCache(config=model.config)  # filled in place by every forward
    out = model(input_ids=context, use_cache=True, logits_to_keep=1, **cache_kwarg(cache))
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=nxt, use_cache=True, **cache_kwarg(cache))
        nxt = out.logits[:, -1:].argmax(-1)


def _peak(device: torch.device, fn) -> int | None:
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return int(torch.cuda.max_memory_allocated(device))


def bench_models(
    model: GravityForCausalLM, masks: Masks, cfg: BenchConfig, length: int
) -> tuple[GravityForCausalLM, GravityForCausalLM, Backend]:
    """(dense, sparse, backend): `model` pruned with every block kept and with `masks`, covering `length`
    tokens, both attached to the same backend, so that only the sparsity differs between them."""
    if length > masks.max_length:
        if cfg.extend == "none":
            raise UserError(
                f"bench length {length} exceeds the masks' max_length {masks.max_length}; "
                "set bench.extend=diagonal to extend the pattern"
            )
        masks = extend_masks(masks, length)
    device = next(model.parameters()).device
    num_layers, num_heads = masks.head_keep.shape
    every = dense_masks(num_layers, num_heads, masks.block_size, masks.max_length)
    dense = prune_model(model, every).to(device)
    sparse = prune_model(model, masks).to(device)
    backend = attach_kernel(dense, cfg.kernel)
    attach_kernel(sparse, backend)
    return dense, sparse, backend


def _prompt(
    prompt_ids: torch.Tensor | None, vocab: int, batch: int, length: int, gen: torch.Generator
) -> torch.Tensor:
    """(batch, length) ids: the tokenized text (repeated if short, each row from its own offset), or
    random ids when there is no text (the synthetic model has no tokenizer)."""
    if prompt_ids is None or prompt_ids.numel() == 0:
        return torch.randint(0, vocab, (batch, length), generator=gen)
    reps = -(-(length + batch * 97) // prompt_ids.numel())
    stream = prompt_ids.repeat(reps)
    return torch.stack([stream[r * 97 : r * 97 + length] for r in range(batch)])


def run_bench(
    model: GravityForCausalLM,
    masks: Masks,
    cfg: BenchConfig,
    seed: int = 0,
    prompt_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Time dense vs pruned-sparse prefill and decode; returns rows plus device and versions.

    `prompt_ids`: held-out text through the model's own tokenizer (None: random ids).
    """
    device = next(model.parameters()).device
    longest = max(max(cfg.prefill_lengths), cfg.decode_context + cfg.decode_tokens)
    if longest > model.config.max_position_embeddings:
        raise UserError(
            f"bench length {longest} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}"
        )
    dense, sparse, backend = bench_models(model, masks, cfg, longest)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rows: list[dict[str, Any]] = []
    for length in cfg.prefill_lengths:
        ids = _prompt(prompt_ids, vocab, cfg.batch_size, length, gen).to(device)
        for name, m in (("dense", dense), ("sparse", sparse)):
            t = _median_time(lambda m=m, ids=ids: _prefill(m, ids), device, cfg.repeats, cfg.warmup)
            peak = _peak(device, lambda m=m, ids=ids: _prefill(m, ids))
            rows.append(_row("prefill", name, length, cfg.batch_size * length / t, t, peak))
    ctx = _prompt(prompt_ids, vocab, cfg.batch_size, cfg.decode_context, gen).to(device)
    for name, m in (("dense", dense), ("sparse", sparse)):
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
    return {
        "device": device_info(device),
        "path": f"{backend.value} backend (dense and sparse)",
        "backend": backend.value,
        "density": masks.density(),
        "heads_kept": masks.heads_kept(),
        "heads_total": int(masks.head_keep.numel()),
        "batch_size": cfg.batch_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "rows": rows,
        "command": " ".join(sys.argv),
    }


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
        else f"CPU — {result.get('backend', 'reference')} attention, masked blocks computed, not skipped"
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
