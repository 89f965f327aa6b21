"""The oracle pie's adaptive share is measured against: the best fixed CPU share for a scenario, by brute force.

The scenario runs once per share of a range (the `static` policy, or `pie-fixed`: Pie's own placement
with the share held), and once with pie and vllm, all on the same requests, in parallel processes. The
best fixed share is the one with the highest output throughput; among the shares within `TIE` of that
throughput, the one with the lowest normalized latency (a serving load below saturation serves what
arrives whatever the share, and then latency is what a share changes). Pie is put beside it, and the
targets it is held to are checked (`Verdict`):

- throughput at least `THROUGHPUT` of the best fixed share's and at least vLLM's; where no fixed share's
  throughput beats vLLM's (the engine at share 0: KV is not what limits), within `EQUAL` of vLLM's;
- normalized latency at most `LATENCY` times the best fixed share's.

Each run also keeps its warm-up: the CPU share in use and the output token rate over time, binned
(`trajectory`), for the plot of pie finding (or not) the best share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pie_policy import ConfigError

from .scenario import Scenario, policy_of, simulate_scenario

TIE, THROUGHPUT, EQUAL, LATENCY = 0.005, 0.99, 0.005, 1.02
FIXED = ("static", "pie-fixed")  # the policies whose share the oracle sweeps
BINS = 100


def share_range(start: float, stop: float, step: float) -> list[float]:
    """start, start + step, ... up to stop (stop itself included); refuses an empty or negative range."""
    if step <= 0:
        raise ConfigError(f"--shares-step must be positive, got {step:g}")
    if start < 0:
        raise ConfigError(f"--shares-from must not be negative, got {start:g}")
    if stop < start:
        raise ConfigError(f"--shares-to {stop:g} is below --shares-from {start:g}: the range is empty")
    if stop >= 1:
        raise ConfigError(f"--shares-to must be below 1 (all of the KV in CPU memory), got {stop:g}")
    shares = [round(start + k * step, 10) for k in range(int((stop - start) / step + 1e-9) + 1)]
    return shares + [stop] if stop - shares[-1] > 1e-9 else shares


def link_bound(base: Scenario) -> float:
    """pie's largest share in `base`: the link's bound for its KV pool and requests (sizing.py)."""
    return policy_of(base.replace(policy="pie", share=None))[0].controller.max_share


def check_room(base: Scenario, fixed: str, top: float) -> None:
    """Refuse a share whose CPU blocks CPU memory cannot hold (the engine would quietly hold fewer)."""
    if top == 0:
        return
    config = policy_of(base.replace(policy=fixed, share=top))[0].config
    wanted = int(top / (1 - top) * config.num_gpu_blocks)
    if config.num_cpu_blocks < wanted:
        room = config.num_cpu_blocks / (config.num_cpu_blocks + config.num_gpu_blocks)
        memory = "the default CPU memory" if base.cpu_mem_gb is None else f"--cpu-mem-gb {base.cpu_mem_gb:g}"
        raise ConfigError(f"--shares-to {top:g}: {memory} holds a CPU share of at most {room:.3f} of this KV "
                          f"pool ({config.num_cpu_blocks} of {wanted} CPU blocks)")


def label(policy: str, share: float | None) -> str:
    return policy if share is None else f"{policy}@{share:g}"


def runs_of(base: Scenario, fixed: str, shares: list[float]) -> list[Scenario]:
    """The scenarios the oracle runs: `fixed` at each share, then pie and vllm."""
    if fixed not in FIXED:
        raise ConfigError(f"--fixed must be one of {', '.join(FIXED)}, got '{fixed}'")
    return [base.replace(policy=fixed, share=s) for s in shares] + \
        [base.replace(policy="pie", share=None), base.replace(policy="vllm", share=None)]


def trajectory(iterations: dict, bins: int = BINS) -> dict:
    """Per time bin of the run: its end (s), the CPU share in use (time-weighted) and the output token rate
    (each sequence of an iteration samples a token)."""
    ends, starts = iterations["end_s"], iterations["start_s"]
    edges = np.linspace(0.0, float(ends.max(initial=0.0)), bins + 1)
    which = np.clip(np.searchsorted(edges, ends, side="left") - 1, 0, bins - 1)
    seconds = ends - starts
    width = np.diff(edges)
    tokens = np.bincount(which, weights=iterations["batch_sequences"], minlength=bins)
    busy = np.bincount(which, weights=seconds, minlength=bins)
    share = np.bincount(which, weights=seconds * iterations["cpu_share"], minlength=bins)
    return dict(time_s=edges[1:], tok_s=tokens / np.where(width > 0, width, 1),
                cpu_share=np.divide(share, busy, out=np.zeros(bins), where=busy > 0))


def run_one(s: Scenario) -> tuple[dict, dict]:
    """(summary, trajectory) of one scenario: what a worker process sends back."""
    summary, result = simulate_scenario(s)
    return summary, trajectory(result.recorder.iterations)


@dataclass(frozen=True)
class Verdict:
    best_share: float
    best: dict              # the best fixed share's summary
    pie: dict
    vllm: dict
    beaten: bool = True     # whether some fixed share's throughput beats vLLM's

    @property
    def throughput_vs_best(self) -> float:
        return self.pie["throughput_tok_s"] / self.best["throughput_tok_s"]

    @property
    def throughput_vs_vllm(self) -> float:
        return self.pie["throughput_tok_s"] / self.vllm["throughput_tok_s"]

    @property
    def latency_vs_best(self) -> float:
        return self.pie["normalized_latency_s"] / self.best["normalized_latency_s"]

    @property
    def failures(self) -> list[str]:
        """The targets pie misses, each in words (empty: it meets them all)."""
        out = []
        if self.throughput_vs_best < THROUGHPUT:
            out.append(f"throughput {self.throughput_vs_best:.4f}x the best fixed share's (< {THROUGHPUT:g})")
        floor = 1.0 if self.beaten else 1 - EQUAL
        if self.throughput_vs_vllm < floor:
            out.append(f"throughput {self.throughput_vs_vllm:.4f}x vLLM's (< {floor:g})")
        if self.latency_vs_best > LATENCY:
            out.append(f"normalized latency {self.latency_vs_best:.4f}x the best fixed share's (> {LATENCY:g})")
        return out


def best_share(shares: list[float], summaries: list[dict]) -> int:
    """The index of the best fixed share: the highest throughput, and among those within TIE of it the
    lowest normalized latency (then the smallest share)."""
    top = max(s["throughput_tok_s"] for s in summaries)
    near = [i for i, s in enumerate(summaries) if s["throughput_tok_s"] >= (1 - TIE) * top]
    return min(near, key=lambda i: (_latency(summaries[i]), shares[i]))


def _latency(summary: dict) -> float:
    value = summary["normalized_latency_s"]
    return math.inf if value is None else value


def verdict(shares: list[float], summaries: list[dict]) -> Verdict:
    """From the summaries of `runs_of`'s scenarios, in its order."""
    fixed, (pie, vllm) = summaries[:len(shares)], summaries[len(shares):]
    i = best_share(shares, fixed)
    beaten = any(s["throughput_tok_s"] > vllm["throughput_tok_s"] for s in fixed)
    return Verdict(shares[i], fixed[i], pie, vllm, beaten)
