"""The pretraining loss plot (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path


def save_loss_plot(log_path: Path, png_path: Path) -> None:
    """Train loss and held-out loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
    held = [r for r in rows if "heldout_loss" in r]
    if held:
        steps = [r["step"] for r in held]
        ax.plot(steps, [r["heldout_loss"] for r in held], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
