"""The `gravity-sparse` command: one subcommand per stage, plus `run`, `sweep`, `validate`, `info`, `pretrain`.

Commands are listed explicitly in `COMMANDS` (no registration as an import side effect); each handler
imports what it needs when it runs, so `--help`, `info` and `validate` load neither peft, transformers'
Trainer, dimod nor neal. User errors (`UserError`) print one line `error: ...` on stderr and exit 2;
`--debug` shows the traceback instead. Summaries go to stdout (one line per stage, or JSON with `--json`);
progress bars go to stderr.

Under a launcher (`torchrun --nproc_per_node N -m gravity_sparse heal ...`, `accelerate launch -m
gravity_sparse ...`) the same command line runs on every rank: the process group is joined before the command
runs (`gravity_sparse.dist`), only rank 0 prints results, and SIGTERM (what a launcher sends the other ranks
when one fails) unwinds like Ctrl-C, so unfinished stage folders are removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gravity_sparse.errors import UserError  # noqa: E402
from gravity_sparse.stages import STAGES  # noqa: E402


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _main_rank() -> bool:
    """Rank 0 of a launcher's processes (or the only process): the one that prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def emit(args: argparse.Namespace, summary: dict[str, Any], line: str) -> None:
    """The one stdout result of a command: JSON with --json, else one human line (rank 0 only)."""
    if not _main_rank():
        return
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(line)


def add_config_arguments(p: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    """-c/--config YAML and trailing dotted key=value overrides."""
    p.add_argument(
        "-c", "--config", required=config_required, help="pipeline YAML (see pipelines/)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. solve.density=0.3"
    )


def _pipeline_config(path, overrides):
    from gravity_sparse.run.config import load_config
    from gravity_sparse.run.pipeline import PipelineConfig

    return load_config(PipelineConfig, path, overrides)


# --- stages and run ---------------------------------------------------------------------------------

STAGE_HELP = {
    "measure": "measure the locality field of every head on calibration text",
    "solve": "build the QUBOs, anneal them, and write the masks (+ baselines)",
    "apply": "held-out loss of the sparse model (QUBO + baselines) vs dense, unhealed",
    "heal": "LoRA-heal the sparse model, sparse attention active",
    "export": "write the pruned checkpoint and check its parity",
    "bench": "throughput of dense vs sparse (same backend): whole model, prefill and decode",
    "report": "report.md with the tables and plots of every stage",
}


def _stage_args(stage: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        add_config_arguments(p)
        if stage == "export":
            p.add_argument(
                "--overwrite", action="store_true", help="replace an existing export.dir"
            )

    return add


def _stage_run(stage: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from gravity_sparse.run.runner import run_stage

        cfg = _pipeline_config(args.config, args.overrides)
        _, summary, line = run_stage(cfg, stage, overwrite=getattr(args, "overwrite", False))
        emit(args, summary, line)
        return 0

    return run


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export.dir")
    p.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from gravity_sparse.run.runner import run_pipeline

    cfg = _pipeline_config(args.pipeline, args.overrides)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    echo = None if args.json or not _main_rank() else (lambda line: print(line, flush=True))
    results = run_pipeline(cfg, wanted, force=args.force, overwrite=args.overwrite, echo=echo)
    if not _main_rank():
        return 0
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(f"done: {results['run_dir']}", file=sys.stderr)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gravity_sparse.experiments.sweep.sweep import run_sweep

    cfg = _pipeline_config(args.config, args.overrides)
    folder, summary = run_sweep(cfg)
    emit(
        args,
        summary,
        f"sweep    {folder}  ({len(summary['rows'])} patterns, {summary['wall_s']} s)",
    )
    return 0


# --- info, validate, pretrain -----------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", nargs="?", default=None, help="model directory (default: the bundled tiny model)"
    )


def cmd_info(args: argparse.Namespace) -> int:
    from gravity_sparse.model.io import load_model, resolve_model_path
    from gravity_sparse.model.summary import model_summary

    path = resolve_model_path(args.path)
    model, tokenizer = load_model(path)
    s = model_summary(model)
    s["path"] = str(path)
    s["tokenizer"] = type(tokenizer).__name__ if tokenizer is not None else None
    if args.json:
        emit(args, s, "")
        return 0
    print(f"model        {path}")
    print(
        f"architecture {s['architecture']} ({s['model_type']}): {s['num_layers']} layers, hidden "
        f"{s['hidden_size']}, {s['num_attention_heads']} q / {s['num_key_value_heads']} kv heads, "
        f"head_dim {s['head_dim']}, vocab {s['vocab_size']}, context {s['max_position_embeddings']}"
    )
    print(f"parameters   {s['parameters']:,} ({s['dtype']})")
    print(f"attention    {s['attn_implementation']} (eps {s['gravity_eps']})")
    if s["block_size"]:
        print(f"sparsity     block size {s['block_size']}: {s['sparsity']}")
    print("masses M_h = softplus(gravity_mass_log), per layer:")
    print("  layer  q/kv heads   min      mean     max")
    for e in s["layers"]:
        if e["mass_min"] is None:
            print(
                f"  {e['layer']:>5}  {e['q_heads']:>2}/{e['kv_heads']:<2}       (all heads pruned)"
            )
            continue
        print(
            f"  {e['layer']:>5}  {e['q_heads']:>2}/{e['kv_heads']:<2}       "
            f"{e['mass_min']:<8.4f} {e['mass_mean']:<8.4f} {e['mass_max']:<8.4f}"
        )
    return 0


def _validate_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, config_required=True)


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from gravity_sparse.model.io import resolve_model_path
    from gravity_sparse.run.config import config_to_dict

    cfg = _pipeline_config(args.config, args.overrides)
    model_path = resolve_model_path(cfg.model.path)
    cfg.model.torch_device()
    resolved = config_to_dict(cfg)
    if args.json:
        emit(args, {"config": resolved, "model_path": str(model_path)}, "")
    else:
        print(yaml.safe_dump(resolved, sort_keys=False).rstrip())
        print(f"# ok: model {model_path}, run folder {cfg.run_path()}")
    return 0


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default: the config's out_dir)")
    p.add_argument("--publish", default=None, help="copy the finished run here with a model card")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gravity_sparse.experiments.pretrain.card import publish_checkpoint
    from gravity_sparse.experiments.pretrain.config import PretrainConfig
    from gravity_sparse.experiments.pretrain.train import run_pretrain
    from gravity_sparse.run.config import load_config

    cfg = load_config(PretrainConfig, args.config or "pipelines/pretrain-tiny.yaml", args.overrides)
    out = Path(args.out or cfg.out_dir)
    if args.publish:
        dest = publish_checkpoint(out, Path(args.publish))
        emit(args, {"published": str(dest)}, f"published {dest}")
        return 0
    model = run_pretrain(cfg, out)
    emit(args, {"model": str(model)}, f"pretrain {model}")
    return 0


def _gravitize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Llama/Qwen2 Hugging Face directory or .gguf file")
    p.add_argument("out", help="output model directory (must not exist)")
    add_config_arguments(p)


def cmd_gravitize(args: argparse.Namespace) -> int:
    from gravity_sparse.gravitize import GravitizeConfig
    from gravity_sparse.gravitize.run import run_gravitize
    from gravity_sparse.run.config import load_config

    overrides = [*args.overrides, f"source={args.source}", f"out={args.out}"]
    out = run_gravitize(load_config(GravitizeConfig, args.config, overrides))
    emit(args, {"model": str(out)}, f"gravitize {out}")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    help_ = "passkey: retrieval of a key deep in filler; recall: which context holds a segment"
    p.add_argument("task", choices=["passkey", "recall"], help=help_)
    add_config_arguments(p)


def cmd_eval(args: argparse.Namespace) -> int:
    from gravity_sparse.experiments.passkey.config import PasskeyConfig
    from gravity_sparse.experiments.passkey.run import run_passkey
    from gravity_sparse.run.config import load_config

    overrides = [*args.overrides, f"task={args.task}"]  # the positional task always wins
    out, summary = run_passkey(load_config(PasskeyConfig, args.config, overrides))
    means = ", ".join(
        f"{e['label']} {sum(r['accuracy'] for r in e['rows']) / len(e['rows']):.2f}"
        for e in summary["results"]
    )
    emit(args, summary, f"{args.task}  {out}  (mean accuracy: {means})")
    return 0


COMMANDS: tuple[Command, ...] = (
    *(Command(s, STAGE_HELP[s], _stage_args(s), _stage_run(s)) for s in STAGES),
    Command(
        "run",
        "run a whole pipeline from a YAML file, skipping stages already done",
        _run_args,
        cmd_run,
    ),
    Command(
        "sweep",
        "held-out quality vs density for the QUBO and the baselines, before and after healing",
        add_config_arguments,
        cmd_sweep,
    ),
    Command(
        "validate",
        "resolve a pipeline config and check its paths; runs nothing",
        _validate_args,
        cmd_validate,
    ),
    Command(
        "info",
        "show a gravity model's architecture, size, masses and attention implementation",
        _info_args,
        cmd_info,
    ),
    Command(
        "gravitize",
        "turn a pretrained Llama/Qwen2 model (HF directory or GGUF) into a gravity model",
        _gravitize_args,
        cmd_gravitize,
    ),
    Command(
        "eval",
        "task evaluations of a model and its masks (passkey and recall retrieval)",
        _eval_args,
        cmd_eval,
    ),
    Command(
        "pretrain",
        "train a gravity model from scratch (the bundled tiny model's recipe)",
        _pretrain_args,
        cmd_pretrain,
    ),
)


def _quiet_libraries() -> None:
    # transformers' load reports and tqdm bars from it are noise on stdout; ours go to stderr
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gravity-sparse",
        description="Measure, QUBO-prune, block-sparsify, heal and export gravity-attention models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come before or after options: `run p.yaml --force solve.density=0.2`
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = getattr(args, "debug", False)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        _quiet_libraries()
        if _launched():
            from gravity_sparse import dist

            dist.init()
        code = int(args._run(args) or 0)
        if _launched():
            from gravity_sparse import dist

            dist.shutdown()
        return code
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (unfinished stage folders were discarded)", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C: context managers run, so no half-written stage folder stays."""
    raise KeyboardInterrupt
