"""bench: whole-model throughput, dense vs sparse through one implementation, same weights, one run.

Three pairs, each dense against sparse through the same attention implementation, where dense keeps every
causal block of every head:
    export       the pruned model `export` writes (dropped heads removed, block masks kept), built in
                 memory, against the same construction with every block kept; attached to `bench.kernel`
                 (on CPU the block path, which is also what plain transformers runs for the export)
    in-pipeline  the model with the masks attached (apply / heal), against every block attached
    checkpoint   one row, the model as loaded (no masks, its own path): the dense model users start from;
                 the export's speed-up against it is reported too
Prefill: tokens/s at each of `prefill_lengths` the model allows (longer than max_position_embeddings:
skipped; longer than the masks: `extend: diagonal` or skipped). Decode: tokens/s of `decode_tokens`
single-token steps after a prefilled context, for each of `decode_context`, through a `GravityBlockCache`
for dense and sparse alike (it frees the key blocks no later query reads: dense frees nothing), with the
peak KV bytes it held, and the bytes a DynamicCache would hold. Each time is the median of `repeats` runs
(dense and sparse alternating) after `warmup`, with the fastest and slowest run as its spread.

Kernel-level speed (sparse vs dense kernel, FlexAttention, SDPA) is `benchmarks/bench_attention.py`.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from gravity_sparse.kernels import Backend, attach_kernel
from gravity_sparse.model.gravity_cache import GravityBlockCache
from gravity_sparse.model.masks import Masks, attach_masks, dense_masks, extend_masks
from gravity_sparse.model.modeling_gravity import GravityForCausalLM, cache_kwarg
from gravity_sparse.stages.s5_export.export import prune_model
from gravity_sparse.stages.s6_bench.config import BenchConfig
from gravity_sparse.stages.s6_bench.report import bench_markdown
from gravity_sparse.stages.s6_bench.shapes import gravity2_config, smol_config

__all__ = ["gravity2_config", "smol_config", "run_bench", "write_bench", "bench_models"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AttentionClock:
    """Seconds spent in the "gravity" attention function (every layer), while active."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._registry = ALL_ATTENTION_FUNCTIONS
        self._inner = ALL_ATTENTION_FUNCTIONS["gravity"]

        def timed(module, *args, **kwargs):
            device = args[0].device
            _sync(device)
            start = time.perf_counter()
            out = self._inner(module, *args, **kwargs)
            _sync(device)
            self.seconds += time.perf_counter() - start
            return out

        ALL_ATTENTION_FUNCTIONS.register("gravity", timed)
        return self

    def __exit__(self, *exc):
        self._registry.register("gravity", self._inner)


def _timed(fns: dict, device: torch.device, repeats: int, warmup: int, clock=None) -> dict:
    """Seconds of each run of every fn (and, with a clock, its attention seconds), alternating."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if clock is not None:
                clock.seconds = 0.0
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            took = time.perf_counter() - start
            times[name].append(took if clock is None else (took, clock.seconds))
    return times


@torch.no_grad()
def _prefill(model: GravityForCausalLM, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=False, logits_to_keep=1)


def new_cache(model: GravityForCausalLM):
    """The cache generate() would pick for a sparse model: a GravityBlockCache wherever the attention
    can read it (the block path), else a DynamicCache."""
    own = all(
        getattr(a.__dict__.get("gravity_kernel"), "block_path", "gravity_kernel" not in a.__dict__)
        for a in model.gravity_layers()
    )
    return GravityBlockCache(config=model.config) if own else DynamicCache(config=model.config)


def kv_bytes(cache) -> int:
    if isinstance(cache, GravityBlockCache):
        return cache.held_bytes()
    return sum(
        layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None
    )


@torch.no_grad()
def _decode(model: GravityForCausalLM, context: torch.Tensor, steps: int) -> tuple[float, int]:
    """Prefill `context`, then `steps` greedy single-token steps: (seconds of the steps, peak KV bytes)."""
    device = context.device
    cache = new_cache(model)
    out = model(input_ids=context, use_cache=True, logits_to_keep=1, **cache_kwarg(cache))
    peak = kv_bytes(cache)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, use_cache=True, **cache_kwarg(cache))
        nxt = out.logits[:, -1:].argmax(-1)
        peak = max(peak, kv_bytes(cache))
    _sync(device)
    return time.perf_counter() - start, peak


def bench_models(
    model: GravityForCausalLM, masks: Masks, cfg: BenchConfig, length: int
) -> tuple[GravityForCausalLM, GravityForCausalLM, Backend]:
    """(dense, sparse, backend): `model` pruned with every block kept and with `masks`, covering `length`
    tokens, both attached to the same backend, so that only the sparsity differs between them."""
    masks = masks_for(masks, cfg, length)
    device = next(model.parameters()).device
    num_layers, num_heads = masks.head_keep.shape
    every = dense_masks(num_layers, num_heads, masks.block_size, masks.max_length)
    dense = prune_model(model, every).to(device)
    sparse = prune_model(model, masks).to(device)
    backend = attach_kernel(dense, cfg.kernel)
    attach_kernel(sparse, backend)
    return dense, sparse, backend


def density_at(masks: Masks, length: int) -> float:
    """The masks' density over the blocks a sequence of `length` tokens covers (the top-left corner)."""
    nb = -(-length // masks.block_size)
    corner = masks.computed_blocks()[..., :nb, :nb]
    return float(corner.sum()) / (masks.head_keep.numel() * nb * (nb + 1) / 2)


def masks_for(masks: Masks, cfg: BenchConfig, length: int) -> Masks:
    if length > masks.max_length and cfg.extend == "diagonal":
        return extend_masks(masks, length)
    return masks


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


def _row(phase, variant, model, seq_len, tokens, times, **extra) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "phase": phase,
        "variant": variant,
        "model": model,
        "seq_len": seq_len,
        "tokens_per_s": round(tokens / med, 2),
        "seconds": med,
        "seconds_min": min(times),
        "seconds_max": max(times),
        "runs": len(times),
        **extra,
    }


def _lengths(model, masks: Masks, cfg: BenchConfig) -> tuple[list[int], list[int], list[dict]]:
    """The prefill lengths and decode contexts this model and these masks allow, and what was skipped."""
    limit = model.config.max_position_embeddings
    mask_limit = masks.max_length if cfg.extend == "none" else limit
    skipped, prefill, decode = [], [], []
    for phase, wanted, out, extra in (
        ("prefill", cfg.prefill_lengths, prefill, 0),
        ("decode", cfg.decode_contexts(), decode, cfg.decode_tokens),
    ):
        for n in wanted:
            if n + extra > min(limit, mask_limit):
                why = "model" if n + extra > limit else "masks (bench.extend=diagonal extends them)"
                skipped.append({"phase": phase, "seq_len": n, "reason": f"longer than the {why}"})
            else:
                out.append(n)
    if not prefill and not decode:
        from gravity_sparse.errors import UserError

        raise UserError(f"no bench length fits: {skipped}")
    return prefill, decode, skipped


VARIANTS = ("export", "in-pipeline", "checkpoint")


def _models(model, masks, cfg, longest):
    """{variant: {"dense"|"sparse": model}} for the configured variants, and the backend."""
    import copy

    dense, sparse, backend = bench_models(model, masks, cfg, longest)
    out: dict[str, dict[str, Any]] = {}
    if "export" in cfg.variants:
        out["export"] = {"dense": dense, "sparse": sparse}
    if "in-pipeline" in cfg.variants:
        full = masks_for(masks, cfg, longest)
        every = dense_masks(*full.head_keep.shape, full.block_size, full.max_length)
        out["in-pipeline"] = {
            "dense": attach_masks(copy.deepcopy(model), every, kernel=backend),
            "sparse": attach_masks(copy.deepcopy(model), full, kernel=backend),
        }
    if "checkpoint" in cfg.variants:
        out["checkpoint"] = {"dense": model}
    return out, backend


def dynamic_cache_bytes(model: GravityForCausalLM, batch: int, length: int) -> int:
    """What a DynamicCache holds for `length` positions: K and V of every KV head of every layer."""
    item = next(model.parameters()).element_size()
    return sum(
        2 * batch * a.num_key_value_heads * length * a.head_dim * item
        for a in model.gravity_layers()
    )


def run_bench(
    model: GravityForCausalLM,
    masks: Masks,
    cfg: BenchConfig,
    seed: int = 0,
    prompt_ids: torch.Tensor | None = None,
    release: bool = False,
) -> dict[str, Any]:
    """Time dense vs sparse prefill and decode for the configured variants; rows plus device, versions
    and load. `prompt_ids`: held-out text through the model's own tokenizer (None: random ids).

    release: the caller passes its only reference to `model`, which is dropped once the timed models
    are built when no variant times it (only "export"): one model less alive while timing, which at
    Gravity-2's size is the difference between fitting 24 GB or not.
    """
    device = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    prefill, decode, skipped = _lengths(model, masks, cfg)
    longest = max(prefill + [c + cfg.decode_tokens for c in decode])
    vocab, b = model.config.vocab_size, cfg.batch_size
    variants, backend = _models(model, masks, cfg, longest)
    if release and not {"checkpoint", "in-pipeline"} & set(cfg.variants):
        del model
        gc.collect()
    full = masks_for(masks, cfg, longest)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for length in prefill:
        ids = _prompt(prompt_ids, vocab, b, length, gen).to(device)
        fns = {
            (v, n): (lambda m=m, ids=ids: _prefill(m, ids))
            for v, pair in variants.items()
            for n, m in pair.items()
        }
        with AttentionClock() as clock:
            timed = _timed(fns, device, cfg.repeats, cfg.warmup, clock)
        for (variant, name), runs in timed.items():
            attention = statistics.median(a for _, a in runs)
            t = [x for x, _ in runs]
            extra = dict(attention_seconds=attention, density=round(density_at(full, length), 4))
            rows.append(_row("prefill", variant, name, length, b * length, t, **extra))
    steps = cfg.decode_tokens
    for context in decode:
        ctx = _prompt(prompt_ids, vocab, b, context, gen).to(device)
        for variant in [v for v in ("export", "in-pipeline") if v in variants]:
            pair = variants[variant]
            for _ in range(cfg.warmup):
                for m in pair.values():
                    _decode(m, ctx, steps)
            runs: dict[str, list] = {name: [] for name in pair}
            for _ in range(cfg.repeats):  # dense and sparse alternating
                for name, m in pair.items():
                    runs[name].append(_decode(m, ctx, steps))
            for name, m in pair.items():
                extra = dict(
                    kv_bytes_peak=max(p for _, p in runs[name]),
                    kv_bytes_dynamic_cache=dynamic_cache_bytes(m, b, context + steps),
                    cache=type(new_cache(m)).__name__,
                    decoded=steps,
                )
                t = [x for x, _ in runs[name]]
                rows.append(_row("decode", variant, name, context, b * steps, t, **extra))
    _speedups(rows)
    return {
        "device": device_info(device),
        "path": f"{backend.value} backend (dense and sparse)",
        "backend": backend.value,
        "density": masks.density(),
        "heads_kept": masks.heads_kept(),
        "heads_total": int(masks.head_keep.numel()),
        "block_size": masks.block_size,
        "mask_max_length": masks.max_length,
        "extend": cfg.extend,
        "batch_size": cfg.batch_size,
        "dtype": dtype,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "rows": rows,
        "skipped": skipped,
        "command": " ".join(sys.argv),
    }


def _speedups(rows: list[dict[str, Any]]) -> None:
    """Each sparse row: its speed-up over the dense row of its pair (and the export's over the
    checkpoint); each decode row: the KV bytes against dense."""

    def find(phase, variant, model, n):
        return next(
            (
                r
                for r in rows
                if (r["phase"], r["variant"], r["model"], r["seq_len"])
                == (phase, variant, model, n)
            ),
            None,
        )

    for r in rows:
        if r["model"] != "sparse":
            continue
        dense = find(r["phase"], r["variant"], "dense", r["seq_len"])
        r["speedup_vs_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
        ckpt = find(r["phase"], "checkpoint", "dense", r["seq_len"])
        if r["variant"] == "export" and ckpt is not None:
            r["speedup_vs_checkpoint"] = round(r["tokens_per_s"] / ckpt["tokens_per_s"], 3)
        if r["phase"] == "decode":
            r["kv_bytes_vs_dense"] = round(r["kv_bytes_peak"] / dense["kv_bytes_peak"], 3)
        if r.get("attention_seconds") and dense.get("attention_seconds"):
            r["attention_vs_dense"] = round(r["attention_seconds"] / dense["attention_seconds"], 3)


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
            cores=os.cpu_count(),
        )
    return info


def write_bench(result: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "bench.md").write_text(bench_markdown(result))
