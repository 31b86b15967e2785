"""`gravity-sparse eval passkey`: passkey accuracy of the dense model and of every given mask set, on the
same prompts; writes passkey.json, passkey.md and passkey.png into a new folder, atomically."""

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
    entries: list[tuple[str, Any]] = [("dense", None)] if cfg.dense else []
    entries += [(_label(p, m.method), m) for p, m in mask_sets]
    total = len(entries) * len(cfg.lengths) * len(cfg.depths) * cfg.trials
    bar = tqdm(total=total, desc="passkey", file=sys.stderr, disable=not progress)
    results = []
    for label, masks in entries:
        if masks is not None:
            attach_masks(model, masks)
        try:
            rows = evaluate(
                model, tok, cfg.lengths, cfg.depths, cfg.trials, cfg.seed, on_trial=bar.update
            )
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
        (tmp / "passkey.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "passkey.md").write_text(markdown(summary))
        plot(summary, tmp / "passkey.png")
    return out, summary


def markdown(summary: dict[str, Any]) -> str:
    cells = [(r["length"], r["depth"]) for r in summary["results"][0]["rows"]]
    head = "| model | " + " | ".join(f"{n} tok @ {d:.0%}" for n, d in cells) + " | mean |"
    lines = [
        "# Passkey retrieval accuracy",
        "",
        f"{summary['results'][0]['rows'][0]['trials']} trials per cell (same keys and prompts for "
        "every model); correct = greedy continuation starts with the 5-digit key.",
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
        ax.set(title=f"{length} tokens", xlabel="key depth", ylabel="accuracy", ylim=(-0.05, 1.05))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
