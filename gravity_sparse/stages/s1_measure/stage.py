"""The measure stage: calibration text through the model → `01_measure/` (field.safetensors, plots)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gravity_sparse.model.io import resolve_model_path
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import common

DATA_PARALLEL = True  # every rank of a launcher measures its share (runner.run_stage)


def inputs(cfg: PipelineConfig) -> dict[str, Any]:
    return {
        "model": resolve_model_path(cfg.model.path),
        "calibration": common.text_digest(cfg.calibration_text),
    }


def run(cfg: PipelineConfig) -> Path:
    from gravity_sparse.stages.s1_measure.measure import run_measure

    t0 = time.time()
    model, tok = common.load(cfg)
    ids = common.tokens(tok, cfg.calibration_text)
    with common.folder(cfg, "measure", inputs(cfg), t0) as sf:
        summary = run_measure(model, ids, cfg.measure, sf.path if sf.writer else None)
        if sf.writer:
            (sf.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        sf.summary.update({k: summary[k] for k in ("num_tokens", "loss", "tokens_per_s")})
    return sf.final
