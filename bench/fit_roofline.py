"""Fit the roofline's defaults (hwmodels/roofline.py) to the shipped measurements and print them as the
catalog's hardware entries state them.

    python -m bench.fit_roofline

- `[gpu]` efficiencies, GEMM ridge and per-layer overhead: one set for every GPU, least squares of the
  relative error of whole layers (bench/vidur_points.py: A100 and H100, Llama-2-7B and -70B, 1-8 GPUs,
  every measured token count, and the A100 attention points), each (GPU, model, GPUs, regime, with or
  without attention) group weighted alike, so that no regime is outvoted by the many prefill counts.
- `[server]` all-reduce latency and bus bandwidth of each profiled server: non-negative least squares of
  relative errors of `latency + 2(n-1)/n · bytes / bandwidth` over its own all-reduce rows (2, 4, 8 GPUs).
- `[gpu]` per-iteration host time: a line through the host work vLLM does between forward passes
  (scheduling, input preparation, sampling; medians, ms) that Vidur measured on an A100 with
  Llama-2-7B (microsoft/vidur, data/profiling/a100/cpu_overheads.csv @0633efae, one GPU, batch 8-64; not
  among the shipped profiles: the figures are quoted below). Output processing is left out: engines
  overlap it with the next step (vLLM since 0.6).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import least_squares

from hwmodels import load_model
from hwmodels.profile import relative_fit
from hwmodels.roofline import Roofline

from .vidur_points import DEVICES, FOLDER, NETWORK, Point, points, server

# (batch, schedule, sampler_e2e, prepare_inputs_e2e) medians in ms, Llama-2-7B on one A100 (see above).
HOST_WORK_MS = ((8, 0.16513, 0.88781, 0.29317), (16, 0.27832, 0.94459, 0.43911), (24, 0.38175, 0.95600, 0.53633),
                (32, 0.57984, 1.12637, 0.67099), (40, 0.61693, 1.07573, 0.79215), (48, 0.74156, 1.16300, 0.91485),
                (56, 0.83946, 1.24732, 1.03977), (64, 0.95218, 1.37026, 1.16300))
# Fitted [gpu] fields: name, first guess, bounds.
PARAMETERS = (("flops_efficiency", 0.7, (0.05, 1.0)), ("hbm_efficiency", 0.8, (0.05, 1.0)),
              ("gemm_ridge_tokens", 100.0, (0.0, 4096.0)), ("elementwise_efficiency", 0.5, (0.05, 1.0)),
              ("layer_overhead", 20e-6, (0.0, 500e-6)), ("decode_attention_efficiency", 0.8, (0.05, 1.0)),
              ("prefill_attention_efficiency", 0.3, (0.01, 1.0)))


def all_reduce_fit(device: str) -> tuple[float, float, float]:
    """(latency s, bus bandwidth B/s, mean relative error) over the server's own all-reduce rows."""
    from hwmodels.vidur import read_all_reduce

    table = read_all_reduce(FOLDER / "network" / NETWORK[device] / "all_reduce.csv")
    n, size = table.number("num_workers"), table.number("size")
    own = (table.number("devices_per_node") == n) & (n > 1)
    seconds = table.number("time_stats.all_reduce.median")[own] * 1e-3
    rows = np.column_stack([np.ones(own.sum()), 2 * (n[own] - 1) / n[own] * size[own]])
    latency, per_byte = relative_fit(rows, seconds)
    return latency, 1 / per_byte, float(np.mean(np.abs(rows @ (latency, per_byte) / seconds - 1)))


def host_work_fit() -> tuple[float, float]:
    """(seconds per iteration, seconds per sequence) through HOST_WORK_MS."""
    batch = np.array([row[0] for row in HOST_WORK_MS], float)
    seconds = np.array([sum(row[1:]) for row in HOST_WORK_MS]) * 1e-3
    return tuple(relative_fit(np.column_stack([np.ones(len(batch)), batch]), seconds))


def rooflines(values: dict, reduce: dict) -> dict:
    """A Roofline per (device, model, tp) with the [gpu] `values` and each server's all-reduce `reduce`."""
    out = {}
    for device in DEVICES:
        hw = server(device)
        latency, bandwidth = reduce[device]
        hw = dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, **values),
                                 server=dataclasses.replace(hw.server, all_reduce_latency=latency,
                                                            all_reduce_bandwidth=bandwidth))
        for model in ("llama-2-7b", "llama-2-70b"):
            for tp in (1, 2, 4, 8):
                out[device, model, tp] = Roofline(hw, load_model(model), tp)
    return out


def predicted(point: Point, roofline: Roofline) -> float:
    """The roofline's whole layer for `point`: with attention where the point measured it."""
    return roofline.layer_time(point.shape) if point.has_attention else roofline.dense_time(point.tokens)


def fit_gpu(reduce: dict) -> dict:
    measured = points()
    groups = [(p.device, p.model, p.tp, p.regime, p.has_attention) for p in measured]
    counts = {g: groups.count(g) for g in set(groups)}
    weights = np.array([counts[g] ** -0.5 for g in groups])
    whole = np.array([p.whole for p in measured])
    names = [name for name, _, _ in PARAMETERS]
    scale = np.array([guess for _, guess, _ in PARAMETERS])

    def residuals(x):
        lines = rooflines(dict(zip(names, x * scale)), reduce)
        got = np.array([predicted(p, lines[p.device, p.model, p.tp]) for p in measured])
        return (got / whole - 1) * weights

    low = [b[0] for _, _, b in PARAMETERS] / scale
    high = [b[1] for _, _, b in PARAMETERS] / scale
    result = least_squares(residuals, np.ones(len(names)), bounds=(low, high), x_scale="jac")
    return dict(zip(names, result.x * scale))


def main() -> None:
    reduce = {}
    for device in DEVICES:
        latency, bandwidth, error = all_reduce_fit(device)
        reduce[device] = (latency, bandwidth)
        print(f"[server] of {server(device).name} (from network/{NETWORK[device]}/all_reduce.csv, mean |error| "
              f"{error:.1%}):\nall_reduce_gb_s = {bandwidth / 1e9:.0f}\nall_reduce_latency_us = {latency * 1e6:.1f}\n")
    values = fit_gpu(reduce)
    per_iteration, per_sequence = host_work_fit()
    print("[gpu] of every GPU entry (whole layers of every shipped profile):")
    for name, value in values.items():
        key = {"layer_overhead": "layer_overhead_us"}.get(name, name)
        print(f"{key} = {value * 1e6:.1f}" if name == "layer_overhead" else f"{key} = {value:.3g}")
    print(f"iteration_overhead_us = {per_iteration * 1e6:.0f}\niteration_overhead_us_per_sequence = {per_sequence * 1e6:.1f}")


if __name__ == "__main__":
    main()
