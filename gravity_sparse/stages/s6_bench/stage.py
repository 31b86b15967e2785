"""The bench stage: dense vs sparse whole-model throughput, same backend → `06_bench/`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gravity_sparse.model.io import resolve_model_path
from gravity_sparse.run.artifacts import stage_dirname
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import common


def inputs(cfg: PipelineConfig) -> dict[str, Any]:
    if cfg.bench.synthetic:
        return {}  # random weights and a synthetic field: nothing is read
    return {
        "model": resolve_model_path(cfg.model.path),
        "solve": cfg.run_path() / stage_dirname("solve"),
    }


def synthetic_inputs(cfg: PipelineConfig):
    """A random-weight model in a known shape (Gravity-2 or gravity-smol) and masks solved from a
    synthetic field of that shape."""
    from gravity_sparse.stages.s6_bench.shapes import synthetic_model_and_masks

    return synthetic_model_and_masks(
        cfg.bench.synthetic, cfg.bench.synthetic_layers, cfg.solve, block_size=cfg.measure.block_size,
        seq_len=cfg.measure.seq_len, device=cfg.model.torch_device(), dtype=cfg.model.torch_dtype(),
        seed=cfg.seed,
    )  # fmt: skip


def summary_line(result: dict[str, Any]) -> str:
    """The stage's one line: the longest prefill, sparse against dense (export first)."""
    sparse = [r for r in result["rows"] if r["model"] == "sparse" and r["phase"] == "prefill"]
    if not sparse:
        sparse = [r for r in result["rows"] if r["model"] == "sparse"]
    order = {"export": 0, "in-pipeline": 1}
    best = max(sparse, key=lambda r: (r["seq_len"], -order.get(r["variant"], 2)))
    line = (
        f"{result['device']['name']}: {best['phase']} {best['seq_len']} tokens, {best['variant']} "
        f"sparse/dense {best['speedup_vs_dense']:.2f}×"
    )
    if "speedup_vs_checkpoint" in best:
        line += f", vs the dense checkpoint {best['speedup_vs_checkpoint']:.2f}×"
    return line + f" ({result['path']})"


def run(cfg: PipelineConfig) -> Path:
    from gravity_sparse.model.masks import read_masks
    from gravity_sparse.stages.s6_bench.bench import run_bench, write_bench

    t0 = time.time()
    if cfg.bench.synthetic:
        model, masks = synthetic_inputs(cfg)
        source = f"synthetic {cfg.bench.synthetic}-shaped random weights"
        prompt_ids = None  # no tokenizer: random ids
    else:
        masks = read_masks(common.pattern_file(cfg))
        model, tok = common.load(cfg)
        source = str(resolve_model_path(cfg.model.path))
        prompt_ids = common.tokens(tok, cfg.apply.eval_text)
    result = run_bench(model, masks, cfg.bench, seed=cfg.seed, prompt_ids=prompt_ids)
    result["model"] = source
    with common.folder(cfg, "bench", inputs(cfg), t0) as sf:
        write_bench(result, sf.path)
        sf.summary.update(
            device=result["device"]["name"], path=result["path"], line=summary_line(result)
        )
    return sf.final
