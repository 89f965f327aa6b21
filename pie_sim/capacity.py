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

Then the answer is **confirmed** with CONFIRM times the requests. Near capacity a percentile SLO is set by
rare congestion episodes (the KV cache filling with long requests, a storm of preemptions) that a run of
a few thousand requests may not contain: the probes bracket the answer cheaply, a run as long as the one
that checks it (bench/bench_capacity.py) decides it. Where the longer run misses, the search steps toward
easier settings, 1, 2, 4, ... tolerances at a time, with longer runs, and bisects there.

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
CONFIRM = 4          # times the requests of the search's runs with which its answer is judged again


@dataclass(frozen=True)
class Probe:
    """One simulated point of a search: its judgement, or why it could not run at all."""
    value: float                 # the rate (req/s) or gpu_mem_util probed
    requests: int                # how many requests it ran (the search's, or the confirmation's)
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
    searched; `binding` what fails next to the answer (at the nearest probe above it for a rate, below it
    for HBM; for 'none', at the end of the range that should have passed)."""
    value: float | None
    bound: str
    probes: tuple[Probe, ...]
    upper: float
    binding: str

    @property
    def at(self) -> Probe | None:
        """The run that decided the answer (the longest one at its value)."""
        return max((p for p in self.probes if p.value == self.value), key=lambda p: p.requests, default=None)


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
    """Runs `evaluate` on scenarios differing in one option and remembers every probe (a longer search,
    `longer`, shares them)."""

    def __init__(self, scenario: Scenario, option: str, evaluate: Evaluate, probes: list[Probe] | None = None):
        self.scenario, self.option, self.evaluate = scenario, option, evaluate
        self.probes: list[Probe] = [] if probes is None else probes

    def longer(self, factor: int) -> "_Search":
        """The same search with `factor` times the requests a run."""
        return _Search(self.scenario.replace(num_requests=factor * self.scenario.num_requests), self.option,
                       self.evaluate, self.probes)

    def passes(self, value: float) -> bool:
        """Whether the scenario at `value` meets the SLOs; a setting the system cannot run at all (no KV
        pool, a FlexGen block that fits nowhere) fails."""
        requests = self.scenario.num_requests
        try:
            probe = Probe(value, requests, self.evaluate(self.scenario.replace(**{self.option: value})))
        except (CapacityError, ConfigError) as e:
            probe = Probe(value, requests, None, str(e))
        self.probes.append(probe)
        return probe.meets

    def answer(self, value: float | None, bound: str, upper: float, binding: str = "") -> Answer:
        probes = tuple(sorted(self.probes, key=lambda p: (p.value, p.requests)))
        if not binding:
            if value is None:  # at the easy end of the range, with this search's runs
                mine = [p for p in probes if p.requests == self.scenario.num_requests]
                end = max if self.option == "gpu_mem_util" else min
                binding = end(mine, key=lambda p: p.value).misses() if mine else ""
            else:  # the nearest miss beyond the answer (a longer run's first where two ran there)
                beyond = [p for p in probes if not p.meets and (p.value > value) == (self.option == "rate")]
                nearest = min(beyond, key=lambda p: (abs(p.value - value), -p.requests), default=None)
                binding = nearest.misses() if nearest else ""
        return Answer(value, bound, probes, upper, binding)


def _check_tolerance(tolerance: float) -> None:
    if not 0 < tolerance < 1:
        raise ValueError(f"--tolerance must be in (0, 1), got {tolerance}")


def _bisect(passes: Callable[[float], bool], good: float, bad: float, middle: Callable[[float, float], float],
            close: Callable[[float, float], bool]) -> tuple[float, float]:
    """Narrow [good (passes), bad (fails)] until `close`; the new (good, bad)."""
    while not close(good, bad):
        mid = middle(good, bad)
        good, bad = (mid, bad) if passes(mid) else (good, mid)
    return good, bad


def _confirmed(passes: Callable[[float], bool], good: float, bad: float, easier: Callable[[float, int], float | None],
               middle: Callable[[float, float], float], close: Callable[[float, float], bool]
               ) -> tuple[float | None, float]:
    """The answer `good` judged again by `passes` (longer runs): kept if it passes; else the search steps
    from it toward easier settings, 1, 2, 4, ... tolerances at a time (`easier`; None past the end of the
    range) until one passes, and bisects there. (None, the last failing value) if nothing passes."""
    if passes(good):
        return good, bad
    bad, steps = good, 1
    for _ in range(MAX_HALVINGS):
        good = easier(bad, steps)
        if good is None:
            return None, bad
        if passes(good):
            return _bisect(passes, good, bad, middle, close)
        bad, steps = good, 2 * steps
    return None, bad


def max_rate(scenario: Scenario, slos: tuple[Slo, ...] = (), tolerance: float = 0.02,
             evaluate: Evaluate | None = None, offline: float | None = None, confirm: int = CONFIRM) -> Answer:
    """The highest sustainable request rate meeting `slos`, below `offline` (the scenario's offline
    throughput, simulated when not given), confirmed with `confirm` times the requests."""
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
    middle, close = (lambda a, b: math.sqrt(a * b)), (lambda a, b: b / a <= 1 + tolerance)
    lo, hi = _bisect(search.passes, lo, hi, middle, close)
    if confirm > 1:
        search = search.longer(confirm)
        lo, hi = _confirmed(search.passes, lo, hi, lambda rate, steps: rate / (1 + tolerance) ** steps, middle, close)
        if lo is None:
            return search.answer(None, "none", upper)
    if hi == upper:
        return search.answer(lo, "limit", upper, f"the offline throughput, {upper:.3g} req/s")
    return search.answer(lo, "found", upper)


def lowest_gpu_mem_util(scenario: Scenario) -> float:
    """The smallest gpu_mem_util (in steps of 0.001) that leaves the model a KV pool of at least one
    full-length sequence: below it no policy can run."""
    cm = CostModel(load_hardware(scenario.hw), load_model(scenario.model), scenario.tp)
    m, hbm = cm.model, cm.hw.gpu.hbm_bytes  # with tensor parallelism: the GPUs' together, each its own working set
    needed = (m.weight_bytes + cm.tp * m.activation_bytes(max(2048, m.max_context), scenario.max_num_seqs)
              + m.max_context * m.kv_bytes_per_token)
    return math.ceil(1000 * needed / hbm) / 1000


def min_gpu_mem(scenario: Scenario, slos: tuple[Slo, ...] = (), tolerance: float = 0.02,
                evaluate: Evaluate | None = None, confirm: int = CONFIRM) -> Answer:
    """The least gpu_mem_util, up to the scenario's own, with which `scenario` at its rate is
    sustainable and meets `slos`, bisected until hi - lo <= tolerance·hi, confirmed with `confirm` times
    the requests."""
    _check_tolerance(tolerance)
    if scenario.rate is None or not 0 < scenario.rate < math.inf:
        raise ValueError("the least HBM is searched for a finite request rate (--rate)")
    check_window(scenario.num_requests, slos)
    search = _Search(scenario, "gpu_mem_util", evaluate or partial(judge_scenario, slos=slos))
    least, upper = lowest_gpu_mem_util(scenario), scenario.gpu_mem_util
    if least > upper:
        return search.answer(None, "none", upper, f"the model needs {least:.3f} of HBM to run at all")
    if not search.passes(upper):
        return search.answer(None, "none", upper)
    middle, close = (lambda a, b: (a + b) / 2), (lambda a, b: abs(a - b) <= tolerance * a)
    hi = least
    if not search.passes(least):
        hi, _ = _bisect(search.passes, upper, least, middle, close)

    def easier(util: float, steps: int) -> float | None:  # more memory, up to the range's end
        return None if util >= upper else min(upper, util + steps * tolerance * upper)

    if confirm > 1:
        search = search.longer(confirm)
        hi, _ = _confirmed(search.passes, hi, least, easier, middle, close)
        if hi is None:
            return search.answer(None, "none", upper)
    if hi == least:
        return search.answer(hi, "limit", upper, "the least HBM that runs at all")
    return search.answer(hi, "found", upper)


@dataclass(frozen=True)
class Job:
    """One search as a picklable job for parallel workers: `min_gpu_mem` at the scenario's rate when
    `min_hbm`, else `max_rate` (below `offline` when given)."""
    scenario: Scenario
    slos: tuple[Slo, ...]
    tolerance: float
    min_hbm: bool = False
    offline: float | None = None
    confirm: int = CONFIRM


def search(job: Job) -> Answer:
    if job.min_hbm:
        return min_gpu_mem(job.scenario, job.slos, job.tolerance, confirm=job.confirm)
    return max_rate(job.scenario, job.slos, job.tolerance, offline=job.offline, confirm=job.confirm)
