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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAR_SHARE = 4  # a key block is long-range when it lies at least n_blocks / FAR_SHARE blocks behind the query


def _spearman(a, b) -> float | None:
    """Rank correlation, or None where either side is constant (undefined)."""
    from scipy.stats import spearmanr

    if len(set(a.tolist())) < 2 or len(set(b.tolist())) < 2:
        return None
    return round(float(spearmanr(a, b).statistic), 3)


def far_blocks(run: Path, top: int = 10) -> dict:
    """Which heads of the QUBO's masks keep long-range blocks, against their masses and power-law α.

    Long-range: a kept key block at least n_blocks / 4 blocks behind its query block, the sink column
    (key block 0) excluded. Spearman correlations are over the kept heads."""
    import torch
    from safetensors.torch import load_file

    from gravity_sparse.model.masks import read_masks

    masks = read_masks(run / "02_solve" / "masks.safetensors")
    field = load_file(str(run / "01_measure" / "field.safetensors"))
    n = masks.block_mask.shape[-1]
    q, k = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    far = (q - k >= max(1, n // FAR_SHARE)) & (k > 0)
    count = (masks.block_mask & far).sum(dim=(-1, -2)) * masks.head_keep  # (L, H)
    mass, alpha = field["mass"].float(), field["alpha"].float()
    kept = masks.head_keep
    heads = sorted(((int(count[l, h]), l, h) for l, h in kept.nonzero().tolist()), reverse=True)[
        :top
    ]
    rank = lambda x: (-x).flatten().argsort().argsort().view_as(x) + 1  # noqa: E731 - 1 = largest
    mass_rank, alpha_rank = rank(mass), rank(-alpha)  # alpha rank 1 = lowest α (slowest decay)
    return {
        "far_offset_blocks": max(1, n // FAR_SHARE),
        "far_blocks_total": int(count.sum()),
        "far_blocks_possible_per_head": int(far.sum()),
        "heads_with_far_blocks": int((count > 0).sum()),
        "heads_kept": int(kept.sum()),
        "spearman_far_vs_mass": _spearman(count[kept], mass[kept]),
        "spearman_far_vs_alpha": _spearman(count[kept], alpha[kept]),
        "top": [
            {"layer": l, "head": h, "far_blocks": c, "mass": round(float(mass[l, h]), 3),
             "mass_rank": int(mass_rank[l, h]), "alpha": round(float(alpha[l, h]), 3),
             "alpha_rank_low": int(alpha_rank[l, h])}
            for c, l, h in heads
        ],
        "heads_total": int(kept.numel()),
    }  # fmt: skip


def _fmt(r: float | None) -> str:
    return "undefined (constant)" if r is None else f"{r:+.3f}"


def far_markdown(f: dict) -> list[str]:
    lines = [
        "### Which heads keep long-range blocks (QUBO masks)",
        "",
        f"Long-range: a key block ≥ {f['far_offset_blocks']} blocks behind its query block, sink column "
        f"excluded ({f['far_blocks_possible_per_head']} such blocks per head). "
        f"{f['heads_with_far_blocks']} of {f['heads_kept']} kept heads keep any; "
        f"{f['far_blocks_total']} in all. Spearman over kept heads: long-range blocks vs mass "
        f"{_fmt(f['spearman_far_vs_mass'])}, vs α {_fmt(f['spearman_far_vs_alpha'])}.",
        "",
        "| layer | head | long-range blocks | mass (rank of " + str(f["heads_total"])
        + ", 1 = heaviest) | α (rank, 1 = lowest) |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for t in f["top"]:
        lines.append(
            f"| {t['layer']} | {t['head']} | {t['far_blocks']} | {t['mass']} ({t['mass_rank']}) | "
            f"{t['alpha']} ({t['alpha_rank_low']}) |"
        )
    return lines + [""]


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
        "far_blocks": far_blocks(run),
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
        *(
            [
                f"| dense, healed the same way | {h['heldout_dense_healed']:.4f} (sparse healed "
                f"{h['gap_to_dense_healed_pct']:+.2f}% vs it) |"
            ]
            if h.get("heldout_dense_healed") is not None
            else []
        ),
        "",
        f"Pattern `{h['masks']}`: density {h['density']:.4f}, heads kept {h['heads_kept']}; "
        f"{h['steps_run']} steps, {h['tokens_seen']} tokens.",
        "",
        *far_markdown(r["far_blocks"]),
        (Path(r["run"]) / "06_bench" / "bench.md").read_text(),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path, help="output path without extension")
    p.add_argument(
        "--dense-healed",
        type=float,
        default=None,
        help="held-out loss of the dense model healed the same way, measured apart (a run made "
        "without heal.dense_reference)",
    )
    args = p.parse_args(argv)
    result = collect(args.run)
    if args.dense_healed is not None:
        h = result["heal"]
        h["heldout_dense_healed"] = args.dense_healed
        h["gap_to_dense_healed_pct"] = (
            100 * (h["heldout_after"] - args.dense_healed) / args.dense_healed
        )
        h["dense_healed_measured_apart"] = True
    result["collect_command"] = " ".join(sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
