"""The apply stage: held-out loss of the model with every solved pattern, unhealed → `03_apply/`.

Data-parallel under a launcher: every rank scores its share of the held-out windows; rank 0 writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gravity_sparse.model.io import resolve_model_path
from gravity_sparse.run.artifacts import require_stage, stage_dirname
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import common

DATA_PARALLEL = True  # every rank of a launcher scores its share (runner.run_stage)


def inputs(cfg: PipelineConfig) -> dict[str, Any]:
    return {
        "model": resolve_model_path(cfg.model.path),
        "solve": cfg.run_path() / stage_dirname("solve"),
        "eval": common.text_digest(cfg.apply.eval_text),
    }


def run(cfg: PipelineConfig) -> Path:
    from gravity_sparse.stages.s3_apply.apply import evaluate_masks, masks_in, write_results

    t0 = time.time()
    solve_dir = require_stage(cfg.run_path(), "solve")
    model, tok = common.load(cfg)
    files = masks_in(solve_dir, cfg.apply.baselines)
    rows = evaluate_masks(model, tok, files, cfg.apply, data_parallel=True)
    with common.folder(cfg, "apply", inputs(cfg), t0) as sf:
        if sf.writer:
            write_results(rows, sf.path, f"Held-out loss, unhealed ({cfg.apply.eval_text})")
        sf.summary["rows"] = rows
    return sf.final
