"""PNG figures. Matplotlib's Agg backend: no display needed."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_preview(shares, rows, curves, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row, curve in zip(rows, curves):
        line, = ax.plot(shares * 100, curve, label=f"{row.hw} / {row.model}")
        ax.plot(row.best_cpu_share * 100, row.pooled_tok_s, "o", color=line.get_color())
    ax.set_xlabel("share of KV cache in CPU memory (%)")
    ax.set_ylabel("steady-state decode throughput (tokens/s)")
    ax.set_title("Cost-model preview: CPU pooling vs stall (dots: best share)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
