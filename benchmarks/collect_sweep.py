"""Collect a sweep, finished or not, into results files: table, plot and rows.

    python benchmarks/collect_sweep.py -c pipelines/smol.yaml --out benchmarks/results/<date>-smol-sweep-healed-cpu
    python benchmarks/collect_sweep.py -c pipelines/smol.yaml --out … run_dir=runs/other   # overrides last

Runs nothing: reads `RUN/sweep/sweep.json` of a finished `gravity-sparse sweep`, or, while one is still
unfinished (a healed gravity-smol sweep takes hours and resumes across sessions), the patterns it has logged
in `RUN/sweep.progress` under this config's key. Writes OUT.json (summary, with `missing`), OUT.md (the
sweep's tables, the patterns still missing, the command), OUT.png (the sweep's plot) and, for a sweep with
recall, OUT-recall.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import provenance  # noqa: E402

from gravity_sparse.errors import UserError  # noqa: E402
from gravity_sparse.experiments.sweep.plots import plot_pareto, plot_recall  # noqa: E402
from gravity_sparse.experiments.sweep.sweep import collect_sweep, sweep_markdown  # noqa: E402
from gravity_sparse.run.config import load_config  # noqa: E402
from gravity_sparse.run.pipeline import PipelineConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--out", type=Path, required=True, help="output path without extension")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
        summary = collect_sweep(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python benchmarks/collect_sweep.py " + " ".join(argv or sys.argv[1:])
    summary["provenance"] = provenance({"config": args.config, "overrides": args.overrides})
    missing = summary["missing"]
    total = len(summary["rows"]) + len(missing)
    md = sweep_markdown(summary)
    if missing:
        todo = ", ".join(f"{m['density_target']} {m['method']}" for m in missing)
        md += (
            f"\n**Unfinished**: {len(summary['rows'])} of {total} patterns; still to run: {todo}.\n"
        )
    md += f"\nCollected by `{command}`.\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    plot_pareto(summary, args.out.with_suffix(".png"))
    if "recall_dense" in summary:
        plot_recall(summary, Path(f"{args.out}-recall.png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
