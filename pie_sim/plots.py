"""PNG figures. Matplotlib's Agg backend: no display needed."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

from hwmodels import GiB
from pie_serving.records import POINTS, cpu_percent, envelope_slices

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402


def _minor_label(value: float, _) -> str:
    """A minor tick of a log axis labelled at 2 and 5 times a power of ten (a span under a decade has no
    major tick to read)."""
    return f"{value:g}" if value > 0 and round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""


def log_seconds(axis) -> None:
    """A log axis of seconds labelled with plain numbers (0.02, not 2x10^-2)."""
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(_minor_label))


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


# Policies drawn over one another stay visible: each has its own marker and dash pattern, and the earlier
# ones are drawn wider, so a line hidden under a later one with the same values still shows at its edges.
MARKERS = ("o", "x", "+", "s", "^", "v", "D", "*")
DASHES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 2)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)))


def style(index: int, count: int) -> dict:
    """Marker, dash pattern and width of the `index`-th of `count` lines (the first drawn widest)."""
    return dict(marker=MARKERS[index % len(MARKERS)], linestyle=DASHES[index % len(DASHES)],
                linewidth=1.0 + 1.5 * (count - 1 - index) / max(count - 1, 1))


def plot_runs(runs: dict, path: Path, title: str) -> None:
    """Per policy (name → its `request_table` and iteration columns, with `cpu_percent` among them or
    made here): each request's normalized latency when it finished, KV held per tier, and the share of it
    in CPU memory."""
    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    top = {"kv": 0.0, "cpu": 0.0}
    for i, (name, (requests, iterations)) in enumerate(runs.items()):
        look = style(i, len(runs))
        finish = requests["finish_s"]
        done = np.isfinite(finish)
        points, = axes[0].plot(finish[done], requests["e2e_s"][done] / requests["output_tokens"][done],
                               look["marker"], ms=3, alpha=0.6, mfc="none", label=name)
        color = points.get_color()
        times = iterations["end_s"]
        line = dict(color=color, linewidth=look["linewidth"])
        gpu, cpu = iterations["gpu_kv_bytes"] / GiB, iterations["cpu_kv_bytes"] / GiB
        axes[1].plot(*envelope(times, gpu), linestyle="-", label=f"{name} GPU", **line)
        axes[1].plot(*envelope(times, cpu), linestyle=":", label=f"{name} CPU", **line)
        share = iterations["cpu_percent"] if "cpu_percent" in iterations else cpu_percent(iterations)
        axes[2].plot(*envelope(times, share), linestyle=look["linestyle"], label=name, **line)
        top["kv"] = max(top["kv"], gpu.max(initial=0), cpu.max(initial=0))
        top["cpu"] = max(top["cpu"], share.max(initial=0))
    axes[0].set_ylabel("request e2e / output tokens (s)\nat its finish")
    axes[0].set_yscale("log")
    log_seconds(axes[0].yaxis)
    axes[1].set_ylabel("KV held (GiB)\nGPU solid, CPU dotted")
    axes[1].set_ylim(0, 1.05 * top["kv"] or 1)
    axes[2].set_ylabel("KV held in CPU memory (%)")
    axes[2].set_ylim(0, min(100, 1.1 * top["cpu"]) or 1)
    _save_over_time(fig, axes, title, path, ncol=3, markerscale=2)


def _save_over_time(fig, axes, title: str, path: Path, **legend) -> None:
    """Stacked panels sharing simulated time as x: titled on top, gridded, with legends; saved and closed."""
    axes[-1].set_xlabel("simulated time (s)")
    axes[0].set_title(title, fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, **legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_warmup(trajectories: dict, best: str, best_share: float, path: Path, title: str) -> None:
    """Per run (label → `oracle.trajectory`): the CPU share in use and the output token rate over time,
    pie's against the best fixed share (`best`, at `best_share`) and vLLM's."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for name, dashes in (("pie", "-"), (best, "--"), ("vllm", ":")):
        t = trajectories[name]
        line, = axes[1].plot(t["time_s"], t["tok_s"], dashes, label=name)
        if name != "vllm":
            axes[0].plot(t["time_s"], 100 * t["cpu_share"], dashes, color=line.get_color(), label=f"{name}: in use")
    axes[0].axhline(100 * best_share, color="k", lw=0.8, ls="-.", label=f"best fixed share {best_share:g}")
    axes[0].set_ylabel("KV in CPU memory (%)")
    axes[1].set_ylabel("output tokens/s")
    _save_over_time(fig, axes, title, path)
