"""sweep: held-out quality against density — the project's central evidence.

For every (density, head-drop fraction) of the sweep, the QUBO and the baselines are solved at exactly the
same budget from the run's measured field (`NN_measure/field.safetensors`); each pattern is evaluated on the
held-out text before healing and, optionally, after a short LoRA heal with the same token budget. Output in
`RUN/sweep/`: `sweep.json` (one row per pattern), `sweep.md` (the table) and `pareto.png` (held-out loss
against density, one line per method, unhealed dashed, healed solid, dense as a horizontal line).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


@dataclass
class SweepConfig:
    densities: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.35, 0.5], metadata={"help": "target densities"}
    )
    head_drops: list[float] = field(
        default_factory=lambda: [0.0, 0.25], metadata={"help": "fractions of query heads dropped"}
    )
    methods: list[str] = field(
        default_factory=lambda: ["qubo", "greedy", "window", "random"],
        metadata={"help": "qubo and baselines (greedy, window, random, uniform)"},
    )
    heal: bool = field(default=True, metadata={"help": "also heal every pattern and evaluate it"})
    heal_token_budget: int = field(
        default=65536, metadata={"help": "training tokens per heal in the sweep"}
    )
    eval_max_tokens: int = field(
        default=16384, metadata={"help": "held-out tokens evaluated at most"}
    )

    def __post_init__(self) -> None:
        if not self.densities or not all(0.0 < d <= 1.0 for d in self.densities):
            raise UserError("sweep.densities must be a non-empty list in (0, 1]")
        if not self.head_drops or not all(0.0 <= h < 1.0 for h in self.head_drops):
            raise UserError("sweep.head_drops must be a non-empty list in [0, 1)")
        allowed = {"qubo", "greedy", "window", "random", "uniform"}
        if not self.methods or set(self.methods) - allowed:
            raise UserError(f"sweep.methods must be chosen from {sorted(allowed)}")
        if self.heal_token_budget <= 0 or self.eval_max_tokens <= 0:
            raise UserError("sweep.heal_token_budget and sweep.eval_max_tokens must be positive")


def _patterns(cfg, tensors, meta, density: float, head_drop: float):
    """{method: Masks} at one budget, all from one solve."""
    from .masks import Masks
    from .qubo.stage import solve_field

    baselines = [m for m in cfg.sweep.methods if m != "qubo"]
    solve_cfg = dataclasses.replace(
        cfg.solve,
        density=density,
        head_drop=head_drop,  # an exact fraction: 0.0 keeps every head
        baselines=baselines,
        exact_layers=0,
    )
    result = solve_field(tensors, meta, solve_cfg)
    block, length = int(meta["block_size"]), int(meta["seq_len"])
    out = {"qubo": Masks(result.head_keep, result.block_mask, block, length, "qubo")}
    for name, (hk, bm) in result.baselines.items():
        out[name] = Masks(hk, bm, block, length, name)
    return {m: out[m] for m in cfg.sweep.methods}


def run_sweep(cfg) -> tuple[Path, dict[str, Any]]:
    """Run the sweep of `cfg.sweep` on the run's measured field; returns (folder, summary)."""
    from .apply import sparse_loss
    from .data import encode_text, resolve_text
    from .heal import heal_model
    from .io import load_model, require_tokenizer
    from .masks import attach_masks
    from .qubo.stage import read_field
    from .stage import require_stage

    run = cfg.run_path()
    tensors, meta = read_field(require_stage(run, "measure") / "field.safetensors")
    sw = cfg.sweep
    apply_cfg = dataclasses.replace(cfg.apply, max_tokens=sw.eval_max_tokens, kernel="auto")
    heal_cfg = dataclasses.replace(
        cfg.heal, token_budget=sw.heal_token_budget, eval_max_tokens=sw.eval_max_tokens
    )
    dtype, device = cfg.model.torch_dtype(), cfg.model.torch_device()
    base, tok = load_model(cfg.model.path, dtype=dtype, device=device)
    tok = require_tokenizer(tok, cfg.model.path)
    ids = encode_text(tok, resolve_text(apply_cfg.eval_text))
    dense_loss, scored = sparse_loss(base, None, ids, apply_cfg)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    start = time.perf_counter()
    for head_drop in sw.head_drops:
        for density in sw.densities:
            try:
                patterns = _patterns(cfg, tensors, meta, density, head_drop)
            except UserError as e:  # e.g. a density the heads left by head_drop cannot reach
                skipped.append({"density": density, "head_drop": head_drop, "reason": str(e)})
                print(f"sweep density {density} head_drop {head_drop}: skipped ({e})", flush=True)
                continue
            for method, masks in patterns.items():
                row = {
                    "density_target": density,
                    "head_drop": head_drop,
                    "method": method,
                    "density": round(masks.density(), 6),
                    "heads_kept": masks.heads_kept(),
                    "heads_total": int(masks.head_keep.numel()),
                    "loss_dense": dense_loss,
                    "loss_unhealed": sparse_loss(base, masks, ids, apply_cfg)[0],
                }
                if sw.heal:
                    torch.manual_seed(cfg.seed)
                    model, _ = load_model(cfg.model.path, dtype=dtype, device=device)
                    attach_masks(model, masks)
                    with tempfile.TemporaryDirectory() as scratch:
                        peft_model, record = heal_model(
                            model, tok, heal_cfg, Path(scratch), seed=cfg.seed
                        )
                    healed = peft_model.merge_and_unload().eval()
                    row["loss_healed"] = sparse_loss(healed, masks, ids, apply_cfg)[0]
                    row["heal_steps"] = record["steps_run"]
                rows.append(row)
                print(_row_line(row), flush=True)
    out = run / "sweep"
    tmp = run / ".sweep.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    summary = {
        "model": str(cfg.model.path or "checkpoints/gravity-tiny"),
        "eval_text": apply_cfg.eval_text,
        "eval_tokens": scored,  # tokens actually scored (≤ sweep.eval_max_tokens)
        "heal_token_budget": sw.heal_token_budget if sw.heal else None,
        "loss_dense": dense_loss,
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
        "skipped": skipped,
    }
    (tmp / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (tmp / "sweep.md").write_text(sweep_markdown(summary))
    plot_pareto(summary, tmp / "pareto.png")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out, summary


def _row_line(r: dict[str, Any]) -> str:
    healed = f" healed {r['loss_healed']:.4f}" if "loss_healed" in r else ""
    return (
        f"sweep density {r['density']:.3f} heads {r['heads_kept']}/{r['heads_total']} "
        f"{r['method']:8s} unhealed {r['loss_unhealed']:.4f}{healed} (dense {r['loss_dense']:.4f})"
    )


def sweep_markdown(summary: dict[str, Any]) -> str:
    dense = summary["loss_dense"]
    lines = [
        f"Held-out loss (nats/token) on `{summary['eval_text']}` ({summary['eval_tokens']} tokens); "
        f"dense **{dense:.4f}** (perplexity {math.exp(dense):.3f}). Healing: "
        + (
            f"{summary['heal_token_budget']} tokens of LoRA per pattern."
            if summary["heal_token_budget"]
            else "off."
        ),
        "",
        "| density | heads kept | method | unhealed | healed | healed vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        healed = r.get("loss_healed")
        lines.append(
            f"| {r['density']:.3f} | {r['heads_kept']}/{r['heads_total']} | {r['method']} | "
            f"{r['loss_unhealed']:.4f} | {'–' if healed is None else f'{healed:.4f}'} | "
            f"{'–' if healed is None else f'{100 * (healed - dense) / dense:+.2f}%'} |"
        )
    return "\n".join(lines) + "\n"


def plot_pareto(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    drops = sorted({r["head_drop"] for r in rows})
    fig, axes = plt.subplots(
        1, len(drops), figsize=(5.5 * len(drops), 4.2), squeeze=False, sharey=True
    )
    colors = {"qubo": "C3", "greedy": "C0", "window": "C2", "random": "C7", "uniform": "C1"}
    for ax, drop in zip(axes[0], drops, strict=True):
        sub = [r for r in rows if r["head_drop"] == drop]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r for r in sub if r["method"] == method), key=lambda r: r["density"])
            x = [r["density"] for r in pts]
            ax.plot(x, [r["loss_unhealed"] for r in pts], "--", color=colors.get(method), alpha=0.6)
            if all("loss_healed" in r for r in pts):
                ax.plot(
                    x, [r["loss_healed"] for r in pts], "o-", color=colors.get(method), label=method
                )
            else:
                ax.lines[-1].set_label(method)
        ax.axhline(summary["loss_dense"], color="k", lw=1, label="dense")
        ax.set_xlabel("density (computed causal blocks / all)")
        ax.set_title(f"{int(round(100 * drop))}% of heads dropped")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    axes[0][-1].legend(title="solid: healed, dashed: unhealed", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
