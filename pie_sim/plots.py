"""PNG figures. Matplotlib's Agg backend: no display needed."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from hwmodels import GiB
from pie_serving.records import POINTS, envelope_slices

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def envelope(times: np.ndarray, values: np.ndarray, points: int = POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` points of a long series: its maximum over consecutive equal slices (peaks show)."""
    if len(times) <= points:
        return times, values
    edges, picks = envelope_slices(len(times), points)
    return times[picks], np.maximum.reduceat(values, edges)


def plot_preview(shares, rows, curves, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row, curve in zip(rows, curves):
        line, = ax.plot(shares * 100, curve, label=f"{row.hw} / {row.model}")
        ax.plot(row.best_cpu_share * 100, row.pooled_tok_s, "o", color=line.get_color())
    _finish(fig, ax, "share of KV cache in CPU memory (%)", "steady-state decode throughput (tokens/s)",
            "Cost-model preview: CPU pooling vs stall (dots: best share)", path)


def plot_iteration_check(series: dict, path: Path) -> None:
    """Per policy (name → measured seconds, predicted seconds of the same iterations): one dot each."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = max(max(measured.max(), predicted.max()) for measured, predicted in series.values()) * 1e3
    for name, (measured, predicted) in series.items():
        ax.plot(measured * 1e3, predicted * 1e3, ".", ms=4, alpha=0.6, label=name)
    ax.plot([0, top], [0, top], "k-", lw=0.8, label="predicted = measured")
    _finish(fig, ax, "measured iteration time (ms)", "predicted for the same plan (ms)",
            "Each executed iteration, priced by the profile", path)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_runs(runs: dict, path: Path, title: str) -> None:
    """Per policy (name → its `request_table` and iteration columns): each request's normalized latency
    when it finished, KV held per tier, CPU share."""
    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    for name, (requests, iterations) in runs.items():
        finish = requests["finish_s"]
        done = np.isfinite(finish)
        line, = axes[0].plot(finish[done], requests["e2e_s"][done] / requests["output_tokens"][done], ".", ms=2,
                             alpha=0.6, label=name)
        color = line.get_color()
        times = iterations["end_s"]
        axes[1].plot(*envelope(times, iterations["gpu_kv_bytes"] / GiB), color=color, label=f"{name} GPU")
        axes[1].plot(*envelope(times, iterations["cpu_kv_bytes"] / GiB), "--", color=color, label=f"{name} CPU")
        axes[2].plot(*envelope(times, 100 * iterations["cpu_share"]), color=color, label=name)
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
