"""The report stage: report.md and its plots from every finished stage → `07_report/`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gravity_sparse.errors import UserError
from gravity_sparse.run.artifacts import stage_dirname
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import STAGES, common


def inputs(cfg: PipelineConfig) -> dict[str, Any]:
    run = cfg.run_path()
    return {
        s: run / stage_dirname(s)
        for s in STAGES
        if s != "report" and (run / stage_dirname(s)).exists()
    }


def run(cfg: PipelineConfig) -> Path:
    from gravity_sparse.stages.s7_report.report import write_report

    t0 = time.time()
    found = inputs(cfg)
    if not found:
        raise UserError(f"{cfg.run_path()} has no finished stages to report on")
    with common.folder(cfg, "report", found, t0) as sf:
        summary = write_report(cfg, {k: Path(v) for k, v in found.items()}, sf.path)
        sf.summary.update(summary, line=str(sf.final / "report.md"))
    return sf.final
