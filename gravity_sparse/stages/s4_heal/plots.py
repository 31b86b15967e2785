"""The heal plot: training and validation loss against step (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train (heal split)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation (heal split)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("LoRA healing of the sparse model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
