"""Plots of the chosen masks and of the QUBO against the baselines (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_heads(head_keep: np.ndarray, path: Path) -> None:
    """head_keep (L, H) bool as a layer × head grid."""
    num_layers, num_heads = head_keep.shape
    fig, ax = plt.subplots(figsize=(max(4.0, num_heads * 0.35), max(3.0, num_layers * 0.22)))
    ax.imshow(head_keep, cmap="Greens", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"heads kept: {int(head_keep.sum())} / {head_keep.size}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_blocks(block_mask: np.ndarray, path: Path, title: str) -> None:
    """Per layer, the fraction of query heads computing each block; block_mask (L, H, NQB, NKB) bool."""
    num_layers = block_mask.shape[0]
    cols = math.ceil(math.sqrt(num_layers))
    rows = math.ceil(num_layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    share = block_mask.mean(1)
    for layer, ax in enumerate(axes.reshape(-1)):
        ax.set_axis_off()
        if layer < num_layers:
            ax.imshow(share[layer], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {layer}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_objectives(objectives: dict[str, float], path: Path) -> None:
    """Objective (estimated loss increase, nats/token) of each selection at the same density."""
    names = list(objectives)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.0))
    ax.bar(names, [objectives[n] for n in names], color=["C2"] + ["C7"] * (len(names) - 1))
    ax.set_ylabel("QUBO objective (nats/token)")
    ax.set_title("same density, lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
