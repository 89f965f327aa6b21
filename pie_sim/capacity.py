"""Capacity questions answered by bisection over simulated runs.

- `max_rate`: the highest Poisson request rate at which a scenario meets an SLO on normalized latency
  (mean end-to-end latency per output token, the vLLM paper's metric).
- `min_gpu_mem`: the least HBM (as `gpu_mem_util` of the GPU's HBM) at which a scenario, at its rate,
  meets the SLO.

Both assume the metric worsens monotonically with load and improves with memory. The rate search can
rely on it more than most: re-timing keeps the seed's Gamma draws and only scales them by 1/rate, so a
higher rate is the same arrival pattern compressed. Every probe is kept, so a caller can see where the
assumption held. Tolerances are relative: the answer lies within `tolerance` of the true boundary
(the largest passing rate or the smallest passing memory), always on the passing side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from hwmodels import CapacityError, CostModel, load_hardware, load_model
from pie_policy import ConfigError

from .scenario import Scenario, summarize

Evaluate = Callable[[Scenario], dict]
MAX_DOUBLINGS = 12


@dataclass(frozen=True)
class Probe:
    """One simulated point of a search."""
    value: float                 # the rate (req/s) or gpu_mem_util probed
    normalized_latency_s: float | None
    throughput_tok_s: float
    meets: bool
    error: str = ""              # why the point could not run at all


@dataclass(frozen=True)
class Answer:
    """A search's result: `value` passes the SLO (None: nothing does); `bound` says how it ended:
    'found' (bracketed to the tolerance), 'limit' (passes at the far end of the range: every request
    at once, or the least memory that runs at all) or 'none' (nothing in the range passes)."""
    value: float | None
    bound: str
    probes: tuple[Probe, ...]


class _Search:
    """Runs `evaluate` on scenarios differing in one option and remembers every probe."""

    def __init__(self, scenario: Scenario, option: str, slo: float, evaluate: Evaluate):
        if not slo > 0:
            raise ValueError(f"the SLO on normalized latency must be positive (s/token), got {slo}")
        self.scenario, self.option, self.slo, self.evaluate = scenario, option, slo, evaluate
        self.probes: list[Probe] = []
        self.last: dict = {}  # the summary of the last probe that ran

    def passes(self, value: float) -> bool:
        """Whether the scenario at `value` meets the SLO; a setting the system cannot run at all
        (no KV pool, a FlexGen block that fits nowhere) fails."""
        try:
            summary = self.evaluate(self.scenario.replace(**{self.option: value}))
        except (CapacityError, ConfigError) as e:
            self.probes.append(Probe(value, None, 0.0, False, str(e)))
            self.last = {"throughput_req_s": 0.0}
            return False
        self.last, latency = summary, summary["normalized_latency_s"]
        meets = latency is not None and latency <= self.slo
        self.probes.append(Probe(value, latency, summary["throughput_tok_s"], meets))
        return meets

    def answer(self, value: float | None, bound: str) -> Answer:
        return Answer(value, bound, tuple(sorted(self.probes, key=lambda p: p.value)))


def _check_tolerance(tolerance: float) -> None:
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")


def max_rate(scenario: Scenario, slo: float, tolerance: float = 0.02, evaluate: Evaluate = summarize) -> Answer:
    """The highest request rate meeting `slo`. Brackets from the offline throughput (every request at
    once: the most the system serves), halving or doubling, then bisects until hi - lo <= tolerance·lo."""
    _check_tolerance(tolerance)
    search = _Search(scenario, "rate", slo, evaluate)
    if search.passes(math.inf):
        return search.answer(math.inf, "limit")
    lo = hi = search.last["throughput_req_s"]
    if not lo > 0:
        return search.answer(None, "none")
    if search.passes(hi):
        for _ in range(MAX_DOUBLINGS):
            hi *= 2
            if not search.passes(hi):
                break
            lo = hi
        else:
            return search.answer(hi, "limit")
    else:
        for _ in range(MAX_DOUBLINGS):
            lo /= 2
            if search.passes(lo):
                break
            hi = lo
        else:
            return search.answer(None, "none")
    while hi - lo > tolerance * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if search.passes(mid) else (lo, mid)
    return search.answer(lo, "found")


def lowest_gpu_mem_util(scenario: Scenario) -> float:
    """The smallest gpu_mem_util (in steps of 0.001) that leaves the model a KV pool of at least one
    full-length sequence: below it no policy can run."""
    cm = CostModel(load_hardware(scenario.hw), load_model(scenario.model), scenario.tp)
    m, hbm = cm.model, cm.hw.gpu.hbm_bytes  # with tensor parallelism: the GPUs' together, each its own working set
    needed = (m.weight_bytes + cm.tp * m.activation_bytes(max(2048, m.max_context), scenario.max_num_seqs)
              + m.max_context * m.kv_bytes_per_token)
    return math.ceil(1000 * needed / hbm) / 1000


def min_gpu_mem(scenario: Scenario, slo: float, tolerance: float = 0.02, evaluate: Evaluate = summarize) -> Answer:
    """The least gpu_mem_util at which `scenario` (at its own rate) meets `slo`, bisected between the
    lowest that runs at all and 1 until hi - lo <= tolerance·hi."""
    _check_tolerance(tolerance)
    search = _Search(scenario, "gpu_mem_util", slo, evaluate)
    lo, hi = lowest_gpu_mem_util(scenario), 1.0
    if lo > hi:
        return search.answer(None, "none")
    if not search.passes(hi):
        return search.answer(None, "none")
    if search.passes(lo):
        return search.answer(lo, "limit")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if search.passes(mid) else (mid, hi)
    return search.answer(hi, "found")


def search(job: tuple[Scenario, float, float, bool]) -> Answer:
    """One search as a picklable job for parallel workers: (scenario, slo, tolerance, least HBM?):
    `min_gpu_mem` at the scenario's rate when the last is true, else `max_rate`."""
    scenario, slo, tolerance, min_hbm = job
    return (min_gpu_mem if min_hbm else max_rate)(scenario, slo, tolerance)
