"""Stage subcommands and `run`: the whole pipeline with caching and resume.

`gravity-sparse run pipelines/tiny.yaml` runs every stage in order. A stage whose folder is finished and was
made from the same config section and the same inputs (model files, texts, earlier stage folders, by hash)
is skipped; anything else is redone, and so is everything downstream of it (their inputs changed). An
interrupted stage leaves no folder, so a re-run resumes at the first unfinished stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .cli import add_config_arguments, command, emit
from .config import config_to_dict, load_config
from .pipeline import PipelineConfig
from .stage import STAGES, is_current, stage_dirname


def _runner(stage: str):
    from . import stages

    return getattr(stages, f"run_{stage}_stage")


def _line(stage: str, folder, summary: Any, seconds: float) -> str:
    """The one stdout line of a stage."""
    s = summary if isinstance(summary, dict) else {}
    if stage == "measure":
        detail = f"{s.get('num_tokens')} calibration tokens, {s.get('tokens_per_s')} tok/s"
    elif stage == "solve":
        detail = (
            f"density {s.get('density', float('nan')):.4f}, "
            f"heads kept {s.get('heads_kept')}, violations {s.get('constraint_violations')}"
        )
    elif stage == "apply":
        rows = summary if isinstance(summary, list) else []
        detail = ", ".join(f"{r['method']} {r['loss']:.4f}" for r in rows)
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


def run_one(cfg: PipelineConfig, stage: str, args: argparse.Namespace) -> tuple[Any, str]:
    start = time.perf_counter()
    kwargs = {"overwrite": getattr(args, "overwrite", False)} if stage == "export" else {}
    folder, summary = _runner(stage)(cfg, **kwargs)
    return summary, _line(stage, folder, summary, time.perf_counter() - start)


def _stage_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def _make_stage_command(stage: str, help_text: str, extra=None) -> None:
    def add(p: argparse.ArgumentParser) -> None:
        _stage_args(p)
        if extra:
            extra(p)

    def run(args: argparse.Namespace) -> int:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
        summary, line = run_one(cfg, stage, args)
        emit(args, summary if isinstance(summary, dict) else {"rows": summary}, line)
        return 0

    command(stage, help_text, add)(run)


def _export_extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing export.dir")


_make_stage_command("measure", "measure the locality field of every head on calibration text")
_make_stage_command("solve", "build the QUBOs, anneal them, and write the masks (+ baselines)")
_make_stage_command(
    "apply", "held-out loss of the sparse model (QUBO + baselines) vs dense, unhealed"
)
_make_stage_command("heal", "LoRA-heal the sparse model, sparse attention active")
_make_stage_command("export", "write the pruned checkpoint and check its parity", _export_extra)
_make_stage_command("bench", "throughput of dense vs sparse: kernel and whole model")
_make_stage_command("report", "report.md with the tables and plots of every stage")


@command(
    "sweep",
    "held-out quality vs density for the QUBO and the baselines, before and after healing",
    _stage_args,
)
def run_sweep_command(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    folder, summary = run_sweep(cfg)
    emit(
        args,
        summary,
        f"sweep    {folder}  ({len(summary['rows'])} patterns, {summary['wall_s']} s)",
    )
    return 0


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export.dir")
    p.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )


@command("run", "run a whole pipeline from a YAML file, skipping stages already done", _run_args)
def run_pipeline(args: argparse.Namespace) -> int:
    from .errors import UserError
    from .stages import stage_config, stage_inputs

    cfg = load_config(PipelineConfig, args.pipeline, args.overrides)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    run_dir = cfg.run_path()
    results: dict[str, Any] = {"run_dir": str(run_dir), "config": config_to_dict(cfg), "stages": {}}
    for stage in STAGES:
        if stage not in wanted:
            continue
        folder = run_dir / stage_dirname(stage)
        if not args.force and is_current(
            folder, stage_config(cfg, stage), stage_inputs(cfg, stage)
        ):
            line = f"{stage:8s} {folder}  [cached]"
            results["stages"][stage] = "cached"
        else:
            summary, line = run_one(cfg, stage, args)
            results["stages"][stage] = summary
        if not args.json:
            print(line, flush=True)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(f"done: {run_dir}", file=sys.stderr)
    return 0
