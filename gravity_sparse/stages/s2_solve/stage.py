"""The solve stage: field.safetensors → masks.safetensors (+ baselines), BQM files, solver report, plots.

`solve_field` (solve.py) is pure; `write_solve_outputs` does the files; `run` wires them to the run folder.
The gravity ε comes from the model: `solve.eps` may only restate it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from gravity_sparse.model.io import resolve_model_path
from gravity_sparse.model.masks import Masks, write_masks
from gravity_sparse.qubo.registry import QUBO, QUBO_METHOD, masks_file_name
from gravity_sparse.run.artifacts import require_stage, stage_dirname
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import common
from gravity_sparse.stages.s2_solve import plots
from gravity_sparse.stages.s2_solve.config import DEFAULT_EPS, resolve_eps
from gravity_sparse.stages.s2_solve.field_io import check_field_matches_model, read_field
from gravity_sparse.stages.s2_solve.solve import SolveResult, solve_field


def _save_masks(
    path: Path, head_keep: torch.Tensor, block_mask: torch.Tensor, meta: dict[str, str], method: str
) -> None:
    masks = Masks(head_keep, block_mask, int(meta["block_size"]), int(meta["max_length"]), method)
    write_masks(masks, path)


def write_solve_outputs(result: SolveResult, out_dir: Path) -> None:
    """masks.safetensors, masks_<baseline>.safetensors, bqm/*.bqm + *.json, solver_report.json, PNGs."""
    out_dir = Path(out_dir)
    (out_dir / "bqm").mkdir(parents=True, exist_ok=True)
    _save_masks(
        out_dir / masks_file_name(QUBO),
        result.head_keep,
        result.block_mask,
        result.meta,
        QUBO_METHOD,
    )
    for name, (hk, bm) in result.baselines.items():
        _save_masks(out_dir / masks_file_name(name), hk, bm, result.meta, name)
    for i, item in enumerate(result.subproblems):
        sub = item["sub"]
        stem = f"layer_{sub.layer:02d}_c{i:03d}"
        with sub.bqm().to_file() as f:
            (out_dir / "bqm" / f"{stem}.bqm").write_bytes(f.read())
        samples = {
            name: {
                "state": item[name].astype(int).tolist(),
                "energy": float(sub.energy(item[name][None, :])[0]),
            }
            for name in ("anneal", "final")
        }
        record = {
            "bqm_file": f"{stem}.bqm",
            "layer": sub.layer,
            "heads": sub.heads,
            "kv_heads": sub.kv,
            "variables": sub.variables_doc,
            "lambda": item["lambda"],
            "mu": item["mu"],
            "samples": samples,
        }
        (out_dir / "bqm" / f"{stem}.json").write_text(json.dumps(record))
    (out_dir / "solver_report.json").write_text(json.dumps(result.report, indent=1))
    plots.plot_heads(result.head_keep.numpy(), out_dir / "heads.png")
    plots.plot_blocks(
        result.block_mask.numpy(),
        out_dir / "blocks.png",
        "QUBO: share of heads computing each block",
    )
    objectives = {"qubo": result.report["objective"]}
    objectives.update({k: v["objective"] for k, v in result.report["baselines"].items()})
    plots.plot_objectives(objectives, out_dir / "objectives.png")


def inputs(cfg: PipelineConfig) -> dict[str, Any]:
    return {"field": cfg.run_path() / stage_dirname("measure")}


def run(cfg: PipelineConfig) -> Path:
    t0 = time.time()
    field_path = require_stage(cfg.run_path(), "measure") / "field.safetensors"
    tensors, meta = read_field(field_path)
    model_cfg = json.loads((resolve_model_path(cfg.model.path) / "config.json").read_text())
    heads = model_cfg["num_attention_heads"]
    check_field_matches_model(
        meta, model_cfg["num_hidden_layers"], heads, model_cfg.get("num_key_value_heads") or heads
    )
    eps = resolve_eps(cfg.solve, float(model_cfg.get("gravity_eps", DEFAULT_EPS)))
    result = solve_field(tensors, meta, cfg.solve, eps=eps)
    with common.folder(cfg, "solve", inputs(cfg), t0) as sf:
        write_solve_outputs(result, sf.path)
        rep = result.report
        sf.summary.update(
            density=rep.get("density"),
            heads_kept=int(result.head_keep.sum()),
            violations=rep.get("constraint_violations"),
            constraint_violations=rep.get("constraint_violations"),
            solve_seconds=rep.get("solve_seconds"),
            max_gap=rep.get("max_gap"),
        )
    return sf.final
