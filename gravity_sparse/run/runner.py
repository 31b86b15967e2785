"""Running stages: one stage, or the whole pipeline with caching and resume.

A stage whose folder is finished and was made from the same config section and the same inputs (model
files, texts, earlier stage folders, by hash) is skipped; anything else is redone, and so is everything
downstream of it (their inputs changed). An interrupted stage leaves no folder, so a re-run resumes at the
first unfinished stage. Stages are looked up in an explicit table (`STAGE_MODULES`) and imported only when
they run, so that configs and `validate` stay light.

Under a launcher (`torchrun`, `accelerate launch`) every rank runs this same code. A stage module that sets
`DATA_PARALLEL = True` (measure, apply, heal) runs on every rank, each doing its share; any other stage runs on
rank 0, as a process by itself (`dist.alone`), while the other ranks wait at a barrier. Rank 0 decides what is current and tells the others.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from gravity_sparse import dist
from gravity_sparse.errors import UserError
from gravity_sparse.run.artifacts import is_current, read_meta, stage_dirname
from gravity_sparse.run.pipeline import PipelineConfig
from gravity_sparse.stages import PACKAGES, STAGES

STAGE_MODULES = {stage: f"gravity_sparse.stages.{PACKAGES[stage]}.stage" for stage in STAGES}


def stage_module(stage: str) -> ModuleType:
    """The module of a stage: `inputs(cfg)` and `run(cfg) -> Path`."""
    if stage not in STAGE_MODULES:
        raise UserError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return importlib.import_module(STAGE_MODULES[stage])


def summary_line(stage: str, folder: Path, summary: dict[str, Any], seconds: float | None) -> str:
    """The one stdout line of a stage (`seconds` None: it was cached)."""
    s = summary
    if seconds is None:
        return f"{stage:8s} {folder}  [cached]"
    if stage == "measure":
        detail = f"{s.get('num_tokens')} calibration tokens, {s.get('tokens_per_s')} tok/s"
    elif stage == "solve":
        detail = (
            f"density {s.get('density', float('nan')):.4f}, "
            f"heads kept {s.get('heads_kept')}, violations {s.get('constraint_violations')}"
        )
    elif stage == "apply":
        detail = ", ".join(f"{r['method']} {r['loss']:.4f}" for r in s.get("rows", []))
        detail = f"held-out loss (nats/token): {detail}"
    elif stage == "heal":
        detail = (
            f"held-out {s.get('heldout_before', 0):.4f} → {s.get('heldout_after', 0):.4f} "
            f"(dense {s.get('heldout_dense', 0):.4f}, {s.get('gap_to_dense_pct', 0):+.2f}%)"
        )
    elif stage == "export":
        detail = f"{s.get('model_dir')}, parity max |Δlogit| {s.get('parity_max_abs_diff', 0):.2e}"
    else:
        detail = s.get("line", "")
    return f"{stage:8s} {folder}  [{seconds:.1f}s]  {detail}"


def run_stage(
    cfg: PipelineConfig, stage: str, *, overwrite: bool = False
) -> tuple[Path, dict, str]:
    """Run one stage now: (its folder, the summary in its meta.json, its stdout line)."""
    start = time.perf_counter()
    kwargs = {"overwrite": overwrite} if stage == "export" else {}
    module = stage_module(stage)
    if getattr(module, "DATA_PARALLEL", False) or dist.world_size() == 1:
        folder = module.run(cfg, **kwargs)
    else:  # rank 0 runs it as a process of its own (meta.json: world_size 1); the others wait
        if dist.is_main():
            with dist.alone():
                folder = module.run(cfg, **kwargs)
        else:
            folder = cfg.run_path() / stage_dirname(stage)
        dist.barrier()
    summary = (read_meta(folder) or {}).get("summary", {})
    return folder, summary, summary_line(stage, folder, summary, time.perf_counter() - start)


def run_pipeline(
    cfg: PipelineConfig,
    stages: list[str] | None = None,
    *,
    force: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run `stages` (default all) in pipeline order, skipping the current ones unless `force`."""
    from gravity_sparse.run.config import config_to_dict
    from gravity_sparse.stages.common import section

    wanted = list(STAGES) if stages is None else stages
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    run_dir = cfg.run_path()
    results: dict[str, Any] = {"run_dir": str(run_dir), "config": config_to_dict(cfg), "stages": {}}
    for stage in STAGES:
        if stage not in wanted:
            continue
        folder = run_dir / stage_dirname(stage)
        module = stage_module(stage)
        current = (
            not force
            and dist.is_main()
            and is_current(folder, section(cfg, stage), module.inputs(cfg))
        )
        if dist.broadcast(current):
            line = summary_line(stage, folder, {}, None)
            results["stages"][stage] = "cached"
        else:
            _, summary, line = run_stage(cfg, stage, overwrite=overwrite)
            results["stages"][stage] = summary
        if echo is not None:
            echo(line)
    return results
