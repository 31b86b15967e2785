"""Collect one pipeline run's numbers into a results file for benchmarks/results/.

    python benchmarks/collect_run.py runs/tiny benchmarks/results/2026-11-22-tiny-pipeline-cpu

writes `<out>.json` (everything, as the stages wrote it) and `<out>.md` (the tables): held-out loss of dense
vs every pattern before healing, healing before/after/dense, export sizes and parity, whole-model throughput,
the wall time of every stage, the machine and the command that made the run. Reads only the stage folders.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

STAGES = ("01_measure", "02_solve", "03_apply", "04_heal", "05_export", "06_bench", "07_report")


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def collect(run: Path) -> dict:
    metas = {s: _load(run / s / "meta.json") for s in STAGES}
    missing = [s for s, m in metas.items() if m is None or m.get("status") != "ok"]
    if missing:
        raise SystemExit(f"error: {run} lacks finished stages {missing}")
    heal = _load(run / "04_heal" / "heal.json")
    heal.pop("log_history", None)
    solve = _load(run / "02_solve" / "solver_report.json")
    return {
        "run": str(run),
        "command": metas["01_measure"]["command"],
        "git_revision": metas["07_report"]["git_revision"],
        "versions": metas["07_report"]["versions"],
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "system": platform.system(),
        },
        "stage_wall_s": {s: metas[s]["wall_time_s"] for s in STAGES},
        "measure": {
            k: metas["01_measure"]["summary"].get(k) for k in ("num_tokens", "tokens_per_s")
        },
        "solve": {
            k: solve.get(k)
            for k in (
                "density",
                "density_target",
                "heads_kept",
                "heads_dropped",
                "constraint_violations",
                "solve_seconds",
                "max_gap",
                "num_variables",
                "objective",
            )
        },
        "apply": _load(run / "03_apply" / "results.json"),
        "heal": heal,
        "export": _load(run / "05_export" / "export.json"),
        "bench": _load(run / "06_bench" / "bench.json"),
    }


def markdown(r: dict) -> str:
    h = r["heal"]
    lines = [
        f"# Pipeline run `{r['run']}`",
        "",
        f"Command: `{r['command']}`; git {r['git_revision']}; torch {r['versions'].get('torch')}, "
        f"transformers {r['versions'].get('transformers')}; {r['machine']['processor']}.",
        "",
        "Stage wall times (s): "
        + ", ".join(f"{s.split('_', 1)[1]} {t:.1f}" for s, t in r["stage_wall_s"].items())
        + f"; total {sum(r['stage_wall_s'].values()):.1f}.",
        "",
        (Path(r["run"]) / "03_apply" / "results.md").read_text(),
        "### Healing (LoRA, sparse attention active)",
        "",
        "| | held-out loss (nats/token) |",
        "|---|---|",
        f"| dense | {h['heldout_dense']:.4f} |",
        f"| sparse, before healing | {h['heldout_before']:.4f} |",
        f"| sparse, after healing | {h['heldout_after']:.4f} ({h['gap_to_dense_pct']:+.2f}% vs dense) |",
        "",
        f"Pattern `{h['masks']}`: density {h['density']:.4f}, heads kept {h['heads_kept']}; "
        f"{h['steps_run']} steps, {h['tokens_seen']} tokens.",
        "",
        (Path(r["run"]) / "06_bench" / "bench.md").read_text(),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path, help="output path without extension")
    args = p.parse_args(argv)
    result = collect(args.run)
    result["collect_command"] = " ".join(sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
