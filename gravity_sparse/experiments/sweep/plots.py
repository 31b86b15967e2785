"""The sweep plots: held-out loss against density per method, unhealed dashed, healed solid; and the
recall accuracy of every pattern, unhealed and healed, against the dense model's and chance."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def mean_accuracy(rows: list[dict[str, Any]]) -> float:
    """Mean recall accuracy over a pattern's cells."""
    return sum(r["accuracy"] for r in rows) / len(rows)


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


def plot_recall(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if "recall_unhealed" in r]
    # panels in density order
    points = sorted({(r["head_drop"], r["density_target"]) for r in rows})
    fig, axes = plt.subplots(
        1, len(points), figsize=(4.5 * len(points), 3.8), squeeze=False, sharey=True
    )
    dense = summary["recall_dense"]
    for ax, (drop, density) in zip(axes[0], points, strict=True):
        sub = [r for r in rows if (r["head_drop"], r["density_target"]) == (drop, density)]
        x = range(len(sub))
        ax.bar([i - 0.2 for i in x], [mean_accuracy(r["recall_unhealed"]) for r in sub], 0.4,
               color="C7", label="unhealed")  # fmt: skip
        if all("recall_healed" in r for r in sub):
            ax.bar([i + 0.2 for i in x], [mean_accuracy(r["recall_healed"]) for r in sub], 0.4,
                   color="C0", label="healed")  # fmt: skip
        ax.axhline(mean_accuracy(dense), color="k", lw=1, label="dense")
        ax.axhline(dense[0]["chance"], color="gray", ls=":", label="chance")
        ax.set_xticks(list(x), [r["method"] for r in sub], rotation=30)
        ax.set_title(f"density {density}, {int(round(100 * drop))}% of heads dropped")
    axes[0][0].set_ylabel("recall accuracy (mean over cells)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
