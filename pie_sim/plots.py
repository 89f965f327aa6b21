"""PNG figures. Matplotlib's Agg backend: no display needed."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GiB = 1024**3


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


def plot_runs(runs: dict, path: Path, title: str) -> None:
    """Per policy: each request's normalized latency when it finished, KV held per tier, CPU share."""
    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    for name, (requests, iterations) in runs.items():
        done = sorted((r.finish_s, (r.finish_s - r.arrival_s) / r.output_tokens) for r in requests if r.finish_s)
        line, = axes[0].plot([a for a, _ in done], [n for _, n in done], ".", ms=2, alpha=0.6, label=name)
        color = line.get_color()
        times = [i.end_s for i in iterations]
        axes[1].plot(times, [i.gpu_kv_bytes / GiB for i in iterations], color=color, label=f"{name} GPU")
        axes[1].plot(times, [i.cpu_kv_bytes / GiB for i in iterations], "--", color=color, label=f"{name} CPU")
        axes[2].plot(times, [100 * i.cpu_share for i in iterations], color=color, label=name)
    axes[0].set_ylabel("request e2e / output tokens (s)\nat its finish")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("KV held (GiB)")
    axes[2].set_ylabel("KV in CPU memory (%)")
    axes[2].set_xlabel("simulated time (s)")
    axes[0].set_title(title)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
