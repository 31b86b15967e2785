"""Compare heal runs: one row per run folder, from what each heal stage recorded.

    gravity-sparse run pipelines/tiny.yaml --stages heal run_dir=runs/h1 heal.distill=0.5 ...
    python benchmarks/collect_heal.py runs/h1 runs/h2 ... --out benchmarks/results/<date>-tiny-heal-cpu

Each run folder needs a finished `NN_heal` stage (heal.json + meta.json). The heal settings shown are the
ones the stage recorded in its meta.json, not the command line. With --full-heldout every run's merged model
(its masks attached) and the dense model are evaluated again on the whole held-out text, so runs that
evaluated different amounts of it compare on the same tokens. Writes JSON + markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gravity_sparse.model.data import encode_text, eval_loss, resolve_text
from gravity_sparse.model.io import load_model
from gravity_sparse.model.masks import attach_masks, read_masks
from gravity_sparse.run.artifacts import require_stage

SHOWN = ("token_budget", "lr", "lora_r", "lora_alpha", "distill", "text", "eval_every", "patience")


def full_heldout(run: Path, meta: dict) -> tuple[float, float, int]:
    """(dense loss, healed sparse loss, tokens) on the whole held-out text of the run's heal config."""
    cfg = meta["config"]
    heal_dir = require_stage(run, "heal")
    name = "masks.safetensors" if cfg["masks"] == "qubo" else f"masks_{cfg['masks']}.safetensors"
    masks = read_masks(require_stage(run, "solve") / name)
    seq, batch = cfg["heal"]["seq_len"], cfg["heal"]["eval_batch_size"]
    dense, tok = load_model(cfg["model"]["path"])
    ids = encode_text(tok, resolve_text(cfg["heal"]["eval_text"]))
    healed, _ = load_model(heal_dir / "merged")
    attach_masks(healed, masks)
    dense_loss, tokens = eval_loss(dense, ids, seq, batch)
    return dense_loss, eval_loss(healed, ids, seq, batch)[0], tokens


def collect(run: Path, full: bool = False) -> dict:
    heal_dir = require_stage(run, "heal")
    meta = json.loads((heal_dir / "meta.json").read_text())
    record = json.loads((heal_dir / "heal.json").read_text())
    cfg = meta["config"]["heal"]
    extra = {}
    if full:
        dense, healed, tokens = full_heldout(run, meta)
        extra = {
            "full_tokens": tokens,
            "full_dense": dense,
            "full_healed": healed,
            "full_gap_pct": 100.0 * (healed - dense) / dense,
        }
    return {
        "run": str(run),
        **{k: cfg.get(k) for k in SHOWN},
        "steps_run": record["steps_run"],
        "best_step": record["best_step"],
        "best_val_loss": record["best_val_loss"],
        "heldout_dense": record["heldout_dense"],
        "heldout_before": record["heldout_before"],
        "heldout_after": record["heldout_after"],
        "gap_to_dense_pct": record["gap_to_dense_pct"],
        "eval_max_tokens": cfg.get("eval_max_tokens"),
        "wall_time_s": meta.get("wall_time_s"),
        **extra,
    }


def to_markdown(rows: list[dict]) -> str:
    full = "full_gap_pct" in rows[0]
    head = [
        "run", "tokens", "lr", "LoRA r/α", "distill", "steps (best)", "best val",
        "held-out: dense / before → after (scored tokens)", "vs dense", "wall s",
    ]  # fmt: skip
    if full:
        head += [f"whole held-out ({rows[0]['full_tokens']:,} tokens): dense / healed", "vs dense"]
    lines = [
        "### Healing variants (nats/token; validation = the held-back part of the heal text)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        scored = r["eval_max_tokens"] or "all"
        line = (
            f"| {Path(r['run']).name} | {r['token_budget']:,} | {r['lr']:g} | "
            f"{r['lora_r']}/{r['lora_alpha']} | {r['distill']:g} | {r['steps_run']} ({r['best_step']}) | "
            f"{r['best_val_loss']:.4f} | {r['heldout_dense']:.4f} / {r['heldout_before']:.4f} → "
            f"{r['heldout_after']:.4f} ({scored}) | {r['gap_to_dense_pct']:+.2f}% | "
            f"{r['wall_time_s'] or float('nan'):.0f} |"
        )
        if full:
            line += f" {r['full_dense']:.4f} / {r['full_healed']:.4f} | {r['full_gap_pct']:+.2f}% |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output path without extension")
    p.add_argument("--full-heldout", action="store_true", help="re-evaluate on the whole held-out")
    args = p.parse_args(argv)
    rows = [collect(run, args.full_heldout) for run in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(rows))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
