"""The sweep plot: held-out loss against density per method, unhealed dashed, healed solid."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
