"""The bench stage: dense vs sparse whole-model throughput, same backend → `06_bench/`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

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
    """A random-weight Gravity-2-shaped model and masks solved from a synthetic Gravity-2 field."""
    import dataclasses

    from gravity_sparse.model.masks import Masks
    from gravity_sparse.model.modeling_gravity import GravityForCausalLM
    from gravity_sparse.qubo.synthetic import synthetic_field
    from gravity_sparse.stages.s2_solve.solve import solve_field
    from gravity_sparse.stages.s6_bench.bench import gravity2_config

    layers = cfg.bench.synthetic_layers or 36
    mcfg = gravity2_config(layers)
    device, dtype = cfg.model.torch_device(), cfg.model.torch_dtype()
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = GravityForCausalLM(mcfg).to(dtype).eval()
    block = cfg.measure.block_size
    nqb = -(-cfg.measure.seq_len // block)
    field, meta = synthetic_field(layers, 16, 2, nqb, block_size=block, seed=cfg.seed)
    meta["seq_len"] = str(cfg.measure.seq_len)
    solve_cfg = dataclasses.replace(cfg.solve, exact_layers=0, baselines=[])
    result = solve_field(field, meta, solve_cfg, eps=mcfg.gravity_eps)
    masks = Masks(
        result.head_keep, result.block_mask, block, cfg.measure.seq_len, "qubo-sa-synthetic"
    )
    return model, masks


def run(cfg: PipelineConfig) -> Path:
    from gravity_sparse.model.masks import read_masks
    from gravity_sparse.stages.s6_bench.bench import run_bench, write_bench

    t0 = time.time()
    if cfg.bench.synthetic:
        model, masks = synthetic_inputs(cfg)
        source = "synthetic Gravity-2-shaped random weights"
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
        best = max(
            (r for r in result["rows"] if r["model"] == "sparse"), key=lambda r: r["seq_len"]
        )
        sf.summary.update(
            device=result["device"]["name"],
            path=result["path"],
            line=f"{result['device']['name']}: {best['phase']} {best['seq_len']} tokens "
            f"sparse/dense {best['speedup_vs_dense']:.2f}× ({result['path']})",
        )
    return sf.final
