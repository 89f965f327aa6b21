"""Capacity questions answered by searching over simulated runs, each judged at steady state
(steady_state.py: sustainable, and within every SLO over the window):

- `max_rate`: the highest Poisson request rate that a scenario sustains within its SLOs;
- `min_gpu_mem`: the least HBM (as `gpu_mem_util` of the GPU's HBM) with which it sustains its own rate
  within its SLOs.

Both answer inside the range they were asked about, always on the passing side: the rate within
(0, offline throughput), the HBM within [the least that runs at all, the scenario's `gpu_mem_util`].
The offline throughput (every request at once, `steady_state.offline_throughput`) is run once per
scenario (or given): no rate at or above it is sustainable, so it brackets the rate from above and is
never probed. The rate search probes FIRST_PROBE of it, halving until a rate passes, then bisects in log
space (the tolerance is relative) until hi / lo <= 1 + tolerance, like Vidur's capacity search (bisection
to a 2.5% granularity under a scheduling-delay SLO). The HBM search bisects until hi - lo <= tolerance·hi.

Both assume passing is monotone in the searched value. The rate search can rely on it more than most:
re-timing keeps the seed's Gamma draws and only scales them by 1/rate, so a higher rate is the same
arrival pattern compressed. Every probe is kept with its judgement, so a caller sees where the
assumption held, and `Answer.binding` says what failed at the probe next to the answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

from hwmodels import CapacityError, CostModel, load_hardware, load_model
from pie_policy import ConfigError
from pie_serving.records import request_table
from pie_serving.slo import Slo

from .scenario import Scenario, simulate_scenario
from .steady_state import Judgement, check_window, judge, offline_throughput

Evaluate = Callable[[Scenario], Judgement]
FIRST_PROBE = 0.8    # of the offline throughput
MAX_HALVINGS = 12


@dataclass(frozen=True)
class Probe:
    """One simulated point of a search: its judgement, or why it could not run at all."""
    value: float                 # the rate (req/s) or gpu_mem_util probed
    judgement: Judgement | None
    error: str = ""

    @property
    def meets(self) -> bool:
        return self.judgement is not None and self.judgement.meets

    def misses(self) -> str:
        return self.error or "; ".join(self.judgement.misses())


@dataclass(frozen=True)
class Answer:
    """A search's result. `value` passes (None: nothing in the range does); `bound` says how it ended:
    'found' (bracketed to the tolerance), 'limit' (passes at the end of the range: up to the offline
    throughput, or with the least memory that runs at all) or 'none'. `upper` is the top of the range
    searched; `binding` what fails next to the answer (at the probe above it for a rate, below it for
    HBM; for 'none', at the end of the range that should have passed)."""
    value: float | None
    bound: str
    probes: tuple[Probe, ...]
    upper: float
    binding: str

    @property
    def at(self) -> Probe | None:
        return next((p for p in self.probes if p.value == self.value), None)


def judge_scenario(scenario: Scenario, slos: tuple[Slo, ...] = ()) -> Judgement:
    """Simulate `scenario` and judge its steady-state window against `slos` (folding the gaps between
    tokens only for an SLO on them)."""
    _, result = simulate_scenario(scenario, token_gaps=any(s.metric == "itl" for s in slos))
    return judge(request_table(result.requests), result.recorder.gaps, slos)


def offline_summary(scenario: Scenario) -> dict:
    """The summary of `scenario` with every request at once, and its offline throughput (`offline_req_s`,
    steady_state.offline_throughput): the rate search's upper bound."""
    summary, result = simulate_scenario(scenario.replace(rate=math.inf))
    return summary | {"offline_req_s": offline_throughput(request_table(result.requests))}


def offline_bound(scenario: Scenario) -> float:
    """The offline throughput of `scenario` (req/s): every request at once."""
    return offline_summary(scenario)["offline_req_s"]


class _Search:
    """Runs `evaluate` on scenarios differing in one option and remembers every probe."""

    def __init__(self, scenario: Scenario, option: str, evaluate: Evaluate):
        self.scenario, self.option, self.evaluate = scenario, option, evaluate
        self.probes: list[Probe] = []

    def passes(self, value: float) -> bool:
        """Whether the scenario at `value` meets the SLOs; a setting the system cannot run at all (no KV
        pool, a FlexGen block that fits nowhere) fails."""
        try:
            probe = Probe(value, self.evaluate(self.scenario.replace(**{self.option: value})))
        except (CapacityError, ConfigError) as e:
            probe = Probe(value, None, str(e))
        self.probes.append(probe)
        return probe.meets

    def answer(self, value: float | None, bound: str, upper: float, binding: str = "") -> Answer:
        probes = tuple(sorted(self.probes, key=lambda p: p.value))
        if not binding:
            if value is None:
                end = max if self.option == "gpu_mem_util" else min
                binding = end(probes, key=lambda p: p.value).misses() if probes else ""
            else:
                beyond = [p for p in probes if not p.meets and (p.value > value) == (self.option == "rate")]
                nearest = min(beyond, key=lambda p: abs(p.value - value), default=None)
                binding = nearest.misses() if nearest else ""
        return Answer(value, bound, probes, upper, binding)


def _check_tolerance(tolerance: float) -> None:
    if not 0 < tolerance < 1:
        raise ValueError(f"--tolerance must be in (0, 1), got {tolerance}")


def max_rate(scenario: Scenario, slos: tuple[Slo, ...] = (), tolerance: float = 0.02,
             evaluate: Evaluate | None = None, offline: float | None = None) -> Answer:
    """The highest sustainable request rate meeting `slos`, below `offline` (the scenario's offline
    throughput, simulated when not given)."""
    _check_tolerance(tolerance)
    check_window(scenario.num_requests, slos)
    upper = offline_bound(scenario) if offline is None else offline
    search = _Search(scenario, "rate", evaluate or partial(judge_scenario, slos=slos))
    if not upper > 0:
        return search.answer(None, "none", upper, "the offline run served nothing")
    hi, lo = upper, upper * FIRST_PROBE
    for _ in range(MAX_HALVINGS):
        if search.passes(lo):
            break
        hi, lo = lo, lo / 2
    else:
        return search.answer(None, "none", upper)
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if search.passes(mid) else (lo, mid)
    if hi == upper:
        return search.answer(lo, "limit", upper, f"the offline throughput, {upper:.3g} req/s")
    return search.answer(lo, "found", upper)


def lowest_gpu_mem_util(scenario: Scenario) -> float:
    """The smallest gpu_mem_util (in steps of 0.001) that leaves the model a KV pool of at least one
    full-length sequence: below it no policy can run."""
    cm = CostModel(load_hardware(scenario.hw), load_model(scenario.model))
    m, hbm = cm.model, cm.hw.gpu.hbm_bytes
    needed = (m.weight_bytes + m.activation_bytes(max(2048, m.max_context), scenario.max_num_seqs)
              + m.max_context * m.kv_bytes_per_token)
    return math.ceil(1000 * needed / hbm) / 1000


def min_gpu_mem(scenario: Scenario, slos: tuple[Slo, ...] = (), tolerance: float = 0.02,
                evaluate: Evaluate | None = None) -> Answer:
    """The least gpu_mem_util, up to the scenario's own, with which `scenario` at its rate is
    sustainable and meets `slos`, bisected until hi - lo <= tolerance·hi."""
    _check_tolerance(tolerance)
    if scenario.rate is None or not 0 < scenario.rate < math.inf:
        raise ValueError("the least HBM is searched for a finite request rate (--rate)")
    check_window(scenario.num_requests, slos)
    search = _Search(scenario, "gpu_mem_util", evaluate or partial(judge_scenario, slos=slos))
    lo, hi = lowest_gpu_mem_util(scenario), scenario.gpu_mem_util
    if lo > hi:
        return search.answer(None, "none", hi, f"the model needs {lo:.3f} of HBM to run at all")
    if not search.passes(hi):
        return search.answer(None, "none", hi)
    if search.passes(lo):
        return search.answer(lo, "limit", hi, "the least HBM that runs at all")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if search.passes(mid) else (mid, hi)
    return search.answer(hi, "found", scenario.gpu_mem_util)


@dataclass(frozen=True)
class Job:
    """One search as a picklable job for parallel workers: `min_gpu_mem` at the scenario's rate when
    `min_hbm`, else `max_rate` (below `offline` when given)."""
    scenario: Scenario
    slos: tuple[Slo, ...]
    tolerance: float
    min_hbm: bool = False
    offline: float | None = None


def search(job: Job) -> Answer:
    if job.min_hbm:
        return min_gpu_mem(job.scenario, job.slos, job.tolerance)
    return max_rate(job.scenario, job.slos, job.tolerance, offline=job.offline)
