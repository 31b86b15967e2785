"""Plots of the measured field (matplotlib, Agg): heatmaps, block fields, profiles, redundancy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gravity_sparse.stages.s1_measure.field import head_locality


def plot_field(tensors: dict[str, torch.Tensor], out_dir: Path) -> list[str]:
    """Write the measure plots into out_dir; returns their file names.

    heatmap_{mass,alpha,importance,entropy}.png: layer × head grids; block_field.png: the field of the
    most and least local heads (mass kept in the own block); profiles.png: every head's distance profile
    with its power-law fit, log-log, one panel per layer; score_profiles.png: the same for the raw score;
    redundancy.png: head-head cosine similarity per layer.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(Path(out_dir) / name, dpi=110)
        plt.close(fig)
        names.append(name)

    titles = {
        "mass": "mass M_h = softplus(mass_log)",
        "alpha": "power-law exponent α\n(profile ≈ a·Δ^-α, blank: no fit)",
        "importance": "importance\n(loss increase when ablated, nats/token)",
        "entropy": "mean attention entropy (nats)",
    }
    num_layers, heads = tensors["mass"].shape
    for key, title in titles.items():
        values = tensors[key].numpy()
        fig, ax = plt.subplots(
            figsize=(max(5.5, 1.5 + 0.5 * heads), max(3.0, 1.3 + 0.38 * num_layers))
        )
        image = ax.imshow(values, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax)
        if num_layers * heads <= 256:
            for (layer, head), value in np.ndenumerate(values):
                ax.text(
                    head, layer, f"{value:.2g}", ha="center", va="center", fontsize=6, color="w"
                )
        ax.set(xlabel="query head", ylabel="layer", title=title)
        ax.set(xticks=range(heads), yticks=range(num_layers))
        save(fig, f"heatmap_{key}.png")

    locality = head_locality(tensors["block_field"])
    flat = torch.nan_to_num(locality, nan=0.0).flatten()
    chosen = {"most local": int(flat.argmax()), "least local": int(flat.argmin())}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (label, index) in zip(axes, chosen.items(), strict=True):
        layer, head = divmod(index, heads)
        grid = tensors["block_field"][layer, head].numpy()
        masked = np.ma.masked_where(np.triu(np.ones_like(grid, dtype=bool), 1), grid)
        image = ax.imshow(masked, cmap="magma", norm=matplotlib.colors.LogNorm(vmin=1e-4, vmax=1))
        fig.colorbar(image, ax=ax)
        ax.set(
            title=f"{label}: layer {layer} head {head}\nown-block mass {float(locality[layer, head]):.2f}",
            xlabel="key block",
            ylabel="query block",
        )
    save(fig, "block_field.png")

    cols = min(num_layers, 4)
    rows = -(-num_layers // cols)
    for key, name in (("profile", "profiles.png"), ("score_profile", "score_profiles.png")):
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
        delta = np.arange(tensors[key].shape[-1], dtype=np.float64)
        for layer in range(num_layers):
            ax = axes.flat[layer]
            for head in range(heads):
                values = tensors[key][layer, head, 1:].numpy()
                (line,) = ax.loglog(delta[1:], values, lw=1, label=f"h{head}")
                alpha = float(tensors["alpha"][layer, head])
                if key == "profile" and np.isfinite(alpha):
                    fit = float(tensors["alpha_amp"][layer, head]) * delta[1:] ** -alpha
                    ax.loglog(delta[1:], fit, ls="--", lw=0.8, color=line.get_color())
            ax.set(title=f"layer {layer}", xlabel="distance Δ", ylabel=key.replace("_", " "))
            if heads <= 16:
                ax.legend(fontsize=6, ncol=2)
        for ax in list(axes.flat)[num_layers:]:
            ax.axis("off")
        save(fig, name)

    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for layer in range(num_layers):
        ax = axes.flat[layer]
        image = ax.imshow(tensors["redundancy"][layer].numpy(), cmap="coolwarm", vmin=-1, vmax=1)
        ax.set(title=f"layer {layer}: head cosine", xlabel="head", ylabel="head")
    fig.colorbar(image, ax=list(axes.flat))
    for ax in list(axes.flat)[num_layers:]:
        ax.axis("off")
    fig.savefig(Path(out_dir) / "redundancy.png", dpi=110)
    plt.close(fig)
    names.append("redundancy.png")
    return names
