"""The `gravity-sparse` command: one subcommand per stage, plus `run`, `validate`, `info`, `pretrain`.

Every subcommand registers itself with `@command`. User errors (`UserError`) print one line
`error: ...` on stderr and exit 2; `--debug` shows the traceback instead. Summaries go to stdout (one line
per stage, or JSON with `--json`); progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .errors import UserError  # noqa: E402


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: `@command("info", "...", add_args) def run(args) -> int`."""

    def deco(fn: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"command {name} registered twice")
        COMMANDS[name] = Command(name, help, add_arguments, fn)
        return fn

    return deco


def emit(args: argparse.Namespace, summary: dict[str, Any], line: str) -> None:
    """The one stdout result of a command: JSON with --json, else one human line."""
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


def _quiet_libraries() -> None:
    # transformers' load reports and tqdm bars from it are noise on stdout; ours go to stderr
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def build_parser() -> argparse.ArgumentParser:
    _register_all()
    parser = argparse.ArgumentParser(
        prog="gravity-sparse",
        description="Measure, QUBO-prune, block-sparsify, heal and export gravity-attention models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _register_all() -> None:
    # importing a module registers its commands
    from . import commands  # noqa: F401


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
        _quiet_libraries()
        return int(args._run(args) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (unfinished stage folders were discarded)", file=sys.stderr)
        return 130
