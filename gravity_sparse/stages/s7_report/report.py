"""report: one page (`report.md` + its PNGs, copied beside it) of everything a run measured.

Model and field summary (α and mass per head), the solver report, the chosen masks, the quality table
(dense vs QUBO vs baselines, unhealed; healing before/after), the throughput table and the export summary.
The folder reads on its own: every plot it shows is copied into it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open

from gravity_sparse.run.config import config_to_dict


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _grid(values, fmt: str, row_label: str = "layer") -> list[str]:
    heads = len(values[0])
    lines = [
        f"| {row_label} | " + " | ".join(f"h{h}" for h in range(heads)) + " |",
        "|---" * (heads + 1) + "|",
    ]
    for i, row in enumerate(values):
        lines.append(f"| {i} | " + " | ".join(format(float(v), fmt) for v in row) + " |")
    return lines


def _copy_plots(src: Path, out: Path, prefix: str, names: list[str]) -> list[str]:
    copied = []
    for name in names:
        p = src / name
        if p.is_file():
            target = f"{prefix}_{name}"
            shutil.copyfile(p, out / target)
            copied.append(target)
    return copied


def _measure_section(folder: Path, out: Path) -> list[str]:
    with safe_open(folder / "field.safetensors", framework="pt") as f:
        meta = f.metadata() or {}
        alpha, r2, mass = (f.get_tensor(k) for k in ("alpha", "alpha_r2", "mass"))
        importance = f.get_tensor("importance")
    lines = [
        "## 1. Locality field (measure)",
        "",
        f"{meta.get('num_tokens')} calibration tokens, sequences of {meta.get('seq_len')} tokens, "
        f"blocks of {meta.get('block_size')}; importance by {meta.get('importance_method', '?')}.",
        "",
        "Power-law exponent α of each head's distance profile (attention ≈ a·Δ^(−α)); mean R² "
        f"{float(r2.nan_to_num(0).mean()):.3f}:",
        "",
        *_grid(alpha.nan_to_num(0).tolist(), ".2f"),
        "",
        "Masses M_h = softplus(gravity_mass_log):",
        "",
        *_grid(mass.tolist(), ".3f"),
        "",
        "Head importance (calibration loss increase when the head is ablated, nats/token):",
        "",
        *_grid(importance.tolist(), ".4f"),
        "",
    ]
    plots = _copy_plots(
        folder,
        out,
        "measure",
        [
            "heatmap_mass.png",
            "heatmap_alpha.png",
            "heatmap_importance.png",
            "block_field.png",
            "profiles.png",
        ],
    )
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return lines


def _solve_section(folder: Path, out: Path) -> list[str]:
    rep = _json(folder / "solver_report.json") or {}
    lines = [
        "## 2. QUBO solve",
        "",
        f"- density reached **{rep.get('density', float('nan')):.4f}** (target {rep.get('density_target')}), "
        f"{rep.get('blocks_computed')} of {rep.get('blocks_total')} causal blocks",
        f"- heads kept {rep.get('heads_kept')}, dropped {rep.get('heads_dropped')}; "
        f"constraint violations **{rep.get('constraint_violations')}**",
        f"- {rep.get('num_subproblems')} subproblems, {rep.get('num_variables')} variables, "
        f"solved in {rep.get('solve_seconds', 0):.2f} s; largest gap to the exact optimum where checked: "
        f"{rep.get('max_gap')}",
        "",
        "Objective (estimated loss increase, lower is better) at the same budget:",
        "",
        "| method | objective |",
        "|---|---|",
        f"| qubo | {rep.get('objective', float('nan')):.4f} |",
    ]
    for name, b in (rep.get("baselines") or {}).items():
        lines.append(f"| {name} | {b.get('objective', float('nan')):.4f} |")
    lines.append("")
    plots = _copy_plots(folder, out, "solve", ["heads.png", "blocks.png", "objectives.png"])
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return lines


def _export_section(folder: Path) -> list[str]:
    e = _json(folder / "export.json") or {}
    d, p = e.get("dense", {}), e.get("pruned", {})
    if not d:
        return []

    def ratio(k):
        return p.get(k, 0) / d[k] if d.get(k) else float("nan")

    return [
        "## 5. Export",
        "",
        f"Pruned checkpoint: `{e.get('model_dir')}`; parity with the in-pipeline sparse model: max "
        f"|Δlogit| {e.get('parity_max_abs_diff'):.2e} (plain transformers "
        f"{e.get('parity_plain_transformers_max_abs_diff')}), tolerance {e.get('parity_tolerance')}.",
        "",
        "| | dense | pruned | ratio |",
        "|---|---|---|---|",
        f"| parameters | {d['parameters']:,} | {p['parameters']:,} | {ratio('parameters'):.3f} |",
        f"| KV-cache bytes / token (bf16) | {d['kv_cache_bytes_per_token']:,} | "
        f"{p['kv_cache_bytes_per_token']:,} | {ratio('kv_cache_bytes_per_token'):.3f} |",
        f"| attention FLOPs / token at {d['seq_len']} tokens | {d['attention_flops_per_token']:,.0f} | "
        f"{p['attention_flops_per_token']:,.0f} | {ratio('attention_flops_per_token'):.3f} |",
        "",
    ]


def write_report(cfg, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Write report.md (+ copied plots) into `out`; returns a small summary."""
    lines = [
        "# gravity_sparse report",
        "",
        f"Model: `{cfg.model.path or 'checkpoints/gravity-tiny (bundled)'}`; run folder `{cfg.run_dir}`; "
        f"masks used downstream: `{cfg.masks}`.",
        "",
    ]
    if "measure" in inputs:
        lines += _measure_section(inputs["measure"], out)
    if "solve" in inputs:
        lines += _solve_section(inputs["solve"], out)
    summary: dict[str, Any] = {}
    if "apply" in inputs:
        lines += [
            "## 3. Quality (held-out, before healing)",
            "",
            (inputs["apply"] / "results.md").read_text(),
            "",
        ]
    if "heal" in inputs:
        h = _json(inputs["heal"] / "heal.json") or {}
        summary.update({k: h.get(k) for k in ("heldout_dense", "heldout_before", "heldout_after")})
        lines += [
            "## 4. Healing (LoRA, sparse attention active)",
            "",
            f"Held-out loss (nats/token): dense **{h.get('heldout_dense', 0):.4f}**, sparse before healing "
            f"**{h.get('heldout_before', 0):.4f}**, after **{h.get('heldout_after', 0):.4f}** "
            f"({h.get('gap_to_dense_pct', 0):+.2f}% vs dense); {h.get('steps_run')} steps, "
            f"{h.get('tokens_seen')} tokens, best validation step {h.get('best_step')}"
            f"{', stopped early' if h.get('stopped_early') else ''}.",
            "",
        ]
        lines += [
            f"![{p}]({p})" for p in _copy_plots(inputs["heal"], out, "heal", ["loss_curve.png"])
        ]
        lines.append("")
    if "export" in inputs:
        lines += _export_section(inputs["export"])
    if "bench" in inputs:
        lines += ["## 6. Throughput", "", (inputs["bench"] / "bench.md").read_text(), ""]
    lines += [
        "## Configuration",
        "",
        "```json",
        json.dumps(config_to_dict(cfg), indent=1),
        "```",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    summary["sections"] = sorted(inputs)
    return summary
