"""`gravity-sparse eval passkey` / `eval recall`: the task's accuracy for the dense model and every given
mask set, on the same prompts; writes <task>.json, <task>.md and <task>.png into a new folder,
atomically."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gravity_sparse.atomic import atomic_path
from gravity_sparse.errors import UserError

from .config import PasskeyConfig
from .passkey import evaluate
from .recall import evaluate_recall


def _label(path: Path, method: str) -> str:
    return f"{method} ({path.parent.name})"


def run_passkey(cfg: PasskeyConfig, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    from gravity_sparse.model.io import load_model, require_tokenizer
    from gravity_sparse.model.masks import attach_masks, detach_masks, read_masks

    out = Path(cfg.out)
    if out.exists():
        raise UserError(f"passkey output folder {out} already exists")
    t0 = time.time()
    mask_sets = [
        (Path(p), read_masks(p)) for p in cfg.masks
    ]  # all read (and checked) before any work
    for path, masks in mask_sets:
        if max(cfg.lengths) > masks.max_length:
            raise UserError(
                f"passkey length {max(cfg.lengths)} is longer than the masks in {path} "
                f"({masks.max_length} tokens): use lengths up to the mask length"
            )
    model, tok = load_model(cfg.model)
    tok = require_tokenizer(tok, cfg.model)
    task = _task(cfg, tok)
    entries: list[tuple[str, Any]] = [("dense", None)] if cfg.dense else []
    entries += [(_label(p, m.method), m) for p, m in mask_sets]
    per_cell = cfg.trials if cfg.task == "passkey" else -(-cfg.trials // cfg.choices) * cfg.choices
    total = len(entries) * len(cfg.lengths) * len(cfg.depths) * per_cell
    bar = tqdm(total=total, desc=cfg.task, file=sys.stderr, disable=not progress)
    results = []
    for label, masks in entries:
        if masks is not None:
            attach_masks(model, masks)
        try:
            rows = task(model, bar.update)
        finally:
            if masks is not None:
                detach_masks(model)
        entry = {"label": label, "rows": rows}
        if masks is not None:
            entry |= {"density": masks.density(), "heads_kept": masks.heads_kept()}
        results.append(entry)
    bar.close()
    summary = {"config": asdict(cfg), "results": results, "wall_s": round(time.time() - t0, 1)}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / f"{cfg.task}.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / f"{cfg.task}.md").write_text(markdown(summary))
        plot(summary, tmp / f"{cfg.task}.png")
    return out, summary


def _task(cfg: PasskeyConfig, tok):
    """model, on_trial -> rows, for the configured task (the recall pool is encoded once)."""
    if cfg.task == "passkey":
        return lambda model, on_trial: evaluate(
            model, tok, cfg.lengths, cfg.depths, cfg.trials, cfg.seed, on_trial=on_trial
        )
    from gravity_sparse.model.data import encode_text, resolve_text

    pool = encode_text(tok, resolve_text("train"))
    return lambda model, on_trial: evaluate_recall(
        model, tok, cfg.lengths, cfg.depths, cfg.trials, cfg.seed, choices=cfg.choices,
        segment=cfg.segment, pool=pool, on_trial=on_trial,
    )  # fmt: skip


def markdown(summary: dict[str, Any]) -> str:
    cells = [(r["length"], r["depth"]) for r in summary["results"][0]["rows"]]
    head = "| model | " + " | ".join(f"{n} tok @ {d:.0%}" for n, d in cells) + " | mean |"
    trials = summary["results"][0]["rows"][0]["trials"]
    if summary["config"]["task"] == "recall":
        c = summary["config"]
        intro = [
            "# Recall accuracy: which context holds the repeated segment",
            "",
            f"{trials} trials per cell (same segments and prompts for every model): {c['choices']} "
            f"contexts of filler with a random {c['segment']}-token segment at each depth; correct = "
            "the segment is most likely after the context that holds it (chance "
            f"{1 / c['choices']:.2f}, ties share the credit). Mean gain in nats/token (loss under the "
            "other contexts − under its own) in the second table.",
        ]
    else:
        intro = [
            "# Passkey retrieval accuracy",
            "",
            f"{trials} trials per cell (same keys and prompts for every model); correct = greedy "
            "continuation starts with the 5-digit key.",
        ]
    lines = [
        *intro,
        "",
        head,
        "|" + "---|" * (len(cells) + 2),
    ]
    for entry in summary["results"]:
        accs = [r["accuracy"] for r in entry["rows"]]
        lines.append(
            f"| {entry['label']} | "
            + " | ".join(f"{a:.2f}" for a in accs)
            + f" | {sum(accs) / len(accs):.2f} |"
        )
    if summary["config"]["task"] == "recall":
        lines += ["", head.replace(" mean |", " mean gain |"), "|" + "---|" * (len(cells) + 2)]
        for entry in summary["results"]:
            gains = [r["gain"] for r in entry["rows"]]
            lines.append(
                f"| {entry['label']} | "
                + " | ".join(f"{r['gain']:+.3f} ± {r['gain_se']:.3f}" for r in entry["rows"])
                + f" | {sum(gains) / len(gains):+.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in summary["results"][0]["rows"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.6), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for entry in summary["results"]:
            rows = [r for r in entry["rows"] if r["length"] == length]
            ax.plot(
                [r["depth"] for r in rows],
                [r["accuracy"] for r in rows],
                "o-",
                label=entry["label"],
            )
        if summary["config"]["task"] == "recall":
            ax.axhline(1 / summary["config"]["choices"], color="gray", ls=":", label="chance")
        ax.set(title=f"{length} tokens", xlabel="depth", ylabel="accuracy", ylim=(-0.05, 1.05))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
