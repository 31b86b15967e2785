"""Markdown of a gravitize run (its gravitize.json and meta.json): for model cards and results files."""

from __future__ import annotations

from typing import Any


def _f(x: float | None, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def losses_table(record: dict[str, Any]) -> list[str]:
    lines = [
        "| held-out text | tokens | original (dot-product) | after transfer | after LoRA distillation "
        "| gap to original |",
        "|---|---|---|---|---|---|",
    ]
    for text, row in record["losses"].items():
        lines.append(
            f"| {text} | {row['tokens']} | {_f(row['source'])} | {_f(row['after_transfer'])} "
            f"| {_f(row.get('after_distill'))} | {row['gap_pct']:+.1f}% |"
        )
    return lines


def layers_table(record: dict[str, Any]) -> list[str]:
    lines = [
        "| layer | naive start | after q/k rescale | after fit | best step | mass min | mass max |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, row in sorted(record["layers"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {i} | {_f(row.get('rel_mse_unscaled'))} | {_f(row.get('rel_mse_before'))} "
            f"| {_f(row['rel_mse_after'])} | {row.get('best_step', '–')} "
            f"| {_f(row.get('mass_min'), 2)} | {_f(row.get('mass_max'), 2)} |"
        )
    return lines


def samples_block(record: dict[str, Any]) -> list[str]:
    lines = []
    for s in record.get("samples", []):
        lines += [f"**Prompt:** {s['prompt']}", ""]
        for who in ("source", "gravity"):
            text = " ".join(s[who].split())
            lines.append(f"- *{'original' if who == 'source' else 'gravity'}:* {text}")
        lines.append("")
    return lines


def _start_lines(record: dict[str, Any]) -> list[str]:
    start = record.get("start_from")
    if not start:
        return []
    wall = start.get("wall_s")
    took = f" (whose own process took {wall / 60:.1f} min)" if wall else ""
    return [
        f"Continued from `{start['path']}`{took}: its fitted layers and their record below are that "
        "run's; this run did the distillation.",
        "",
    ]


def markdown(record: dict[str, Any], meta: dict[str, Any]) -> str:
    """Losses, per-layer transfer errors and masses, distillation, samples, wall time."""
    cfg = meta.get("config", {})
    out = [
        f"Wall time {meta.get('wall_s', 0) / 60:.1f} min (this process; a resumed run counts only "
        "its own part), "
        f"transfer: {cfg.get('steps')} Adam steps per layer on {cfg.get('num_sequences')} × "
        f"{cfg.get('seq_len')} tokens of '{cfg.get('calibration_text')}', "
        f"distillation: {cfg.get('distill_steps')} steps.",
        "",
        *_start_lines(record),
        "### Held-out loss (nats/token, same tokens for every model)",
        "",
        *losses_table(record),
        "",
        "### Layer-wise transfer: attention-output error relative to its variance (held-back text)",
        "",
        *layers_table(record),
        "",
    ]
    distill = record.get("distill")
    if distill:
        at = {h["step"]: h["eval_loss"] for h in distill.get("log_history", []) if "eval_loss" in h}
        steps, evals = list(at), list(at.values())  # the final re-evaluation repeats the last step
        out += [
            f"Distillation: {distill['steps']} steps of {cfg.get('distill_batch_size')} × "
            f"{cfg.get('distill_seq_len')} tokens on '{cfg.get('distill_text')}'"
            + (
                f" ({cfg.get('distill_teacher_tokens')} tokens of teacher text)"
                if "teacher" in str(cfg.get("distill_text"))
                else ""
            )
            + f", rank-{cfg.get('distill_lora_r')} LoRA, lr {cfg.get('distill_lr')}, "
            f"KL share {cfg.get('distill_weight')}; validation next-token loss at steps "
            + ", ".join(f"{s}: {e:.3f}" for s, e in zip(steps, evals, strict=True))
            + f" (best {distill['best_val_loss']:.3f} kept).",
            "",
        ]
    if record.get("delta"):
        d = record["delta"]
        out += [
            f"Shipped as a delta to the base: {d['bytes'] / 1e6:.1f} MB in {d['tensors']} tensors; "
            f"rebuilt model vs full model, largest logit difference {d['max_logit_diff_rebuilt_vs_full']:.2e}.",
            "",
        ]
        if len(d.get("files", {})) > 1:
            out += [
                "Delta files, applied in order: "
                + ", ".join(f"`{n}` {b / 1e6:.1f} MB" for n, b in d["files"].items())
                + ".",
                "",
            ]
    out += ["### Greedy samples (same prompts, chat template)", "", *samples_block(record)]
    return "\n".join(out)
