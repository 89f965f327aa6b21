"""When a request rate is sustainable, and how a run at a rate is held to SLOs: at steady state.

A finite burst of requests drains eventually at any rate, and a latency averaged over the whole burst
(an empty system at first, a draining one at the end) hides a queue that grows without bound. So a run
of N requests arriving at rate λ is judged over a **window**: the requests of arrival rank N·WARMUP up
to N·(1 - DRAIN), which arrive from t0 to t1, leaving out the warm-up (the engine filling from empty)
and the drain (the engine emptying once arrivals stop).

**λ is sustainable** when, over the window, the system
1. *serves what arrives*: the requests that finish within [t0 + L, t1 + L] are at least
   (1 - SERVED_TOLERANCE) of those that arrive within [t0, t1], L being the window's median e2e latency:
   shifted so, the completions counted are, at steady state, those of the window's own arrivals, and the
   requests still in flight when the engine has only just filled up (or starts to drain) do not count
   against it. An engine overloaded by a factor 1 + x completes only 1/(1 + x) of its arrivals: the test
   rejects overloads above about 5%, whether the backlog piles up in the queue or in an ever larger
   (slower) batch;
2. *does not let its queue grow*: the median TTFT of the window's last third exceeds that of its first
   third by at most GROWTH_TOLERANCE seconds per second of arrival time between the two. Once its batch
   is full an engine overloaded by 1 + x queues x requests more per request served, and their wait
   grows by x seconds per second: the test rejects overloads above 2% where test 1's count, blurred by
   the requests in flight at the window's ends, may not.
Any rate at or above the **offline throughput** (every request at once: the engine never short of work)
fails both, so the capacity search brackets from it (`offline_throughput`).

The SLOs are then judged over the same window: each percentile over the window's requests (ITL over the
tokens emitted within [t0, t1]), and **goodput** is the window's requests that meet every per-request
target per second of the window. A rate *meets* the SLOs when it is sustainable and every percentile is
within its target.

Why this definition: it is how the tools planners use define capacity. Vidur's capacity search
(microsoft/vidur, vidur/config_optimizer/config_explorer/capacity_search.py) bisects the QPS under a
bound on the p99 *scheduling delay* (5 s by default) with 2.5% granularity, a bound no growing queue
keeps; TTFT is the scheduling delay plus the prefill, and test 2 bounds its trend rather than a fixed
level, so that it holds for any SLO. vLLM's benchmark_serving (and DistServe) report *goodput*, the
requests per second that meet every SLO, beside throughput (pie_serving.benchmark). The tolerances are
the search's resolution: a rate judged sustainable is below capacity, or above it by at most 2-5%.

**Window size.** A percentile needs requests beyond it (p99: 100 of them, else it is the maximum), and a
third of the window needs enough requests for its median: the window must hold MIN_WINDOW_REQUESTS and
100 / (100 - p) requests for every SLO percentile p < 100 (`check_window` refuses fewer). The window
should also be long against a request's latency, or the spread of latencies around L blurs test 1:
`Judgement.short` flags a window shorter than SHORT_WINDOW median e2e latencies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pie_policy.request import State
from pie_serving.slo import PER_REQUEST, Slo, SloError, good, request_values
from pie_serving.token_gaps import TokenGaps, percentile

WARMUP = DRAIN = 0.2          # of the requests, by arrival order, left out at each end
SERVED_TOLERANCE = 0.05       # completions within the window at least 95% of its arrivals
GROWTH_TOLERANCE = 0.02       # TTFT rising by at most 0.02 s per s of arrivals across the window
MIN_WINDOW_REQUESTS = 100
SHORT_WINDOW = 5              # a window under 5 median e2e latencies is flagged as short


def window_bounds(num_requests: int) -> tuple[int, int]:
    """The arrival ranks [first, end) of the window of a run of `num_requests`."""
    return int(num_requests * WARMUP), num_requests - int(num_requests * DRAIN)


def window_requests(num_requests: int) -> int:
    first, end = window_bounds(num_requests)
    return end - first


def _tail_requests(slo: Slo) -> int:
    """Requests a window needs for `slo`'s percentile to be more than its maximum."""
    return math.ceil(100 / (100 - slo.percentile) - 1e-9) if slo.percentile is not None and slo.percentile < 100 else 0


def needed_window(slos: tuple[Slo, ...] = ()) -> int:
    """The fewest requests a window must hold to judge `slos`."""
    return max([MIN_WINDOW_REQUESTS, *map(_tail_requests, slos)])


def check_window(num_requests: int, slos: tuple[Slo, ...] = (), option: str = "--num-requests") -> None:
    """Refuses a run whose window is too small to judge `slos` (before anything runs; 0 requests, the
    whole trace, is judged when it has run)."""
    if num_requests == 0:
        return
    need, have = needed_window(slos), window_requests(num_requests)
    if have < need:
        fewest = num_requests
        while window_requests(fewest) < need:
            fewest += 1
        what = next((f"--slo {s.name}" for s in slos if _tail_requests(s) == need), "a rate")
        raise SloError(f"{option} {num_requests}: its steady-state window ({have} requests, leaving out "
                       f"the first {WARMUP:.0%} and last {DRAIN:.0%} by arrival) is too small to judge {what} "
                       f"(needs {need}): give at least {fewest}")


@dataclass(frozen=True)
class Judgement:
    """A run at a rate, judged over its window (see the module docstring)."""
    window_requests: int
    window_s: float                       # t1 - t0
    offered_req_s: float                  # arrivals within the window per second
    served: float                         # completions within the window shifted by L / arrivals within it
    ttft_growth: float                    # s of median TTFT per s of arrivals, first third to last
    e2e_p50_s: float | None
    values: dict = field(default_factory=dict)  # SLO name → its statistic over the window (None: no value)
    slos: tuple[Slo, ...] = ()
    goodput_req_s: float | None = None    # None without a per-request target

    @property
    def sustainable(self) -> bool:
        return self.served >= 1 - SERVED_TOLERANCE and self.ttft_growth <= GROWTH_TOLERANCE

    @property
    def meets(self) -> bool:
        return self.sustainable and all(s.meets(self.values[s.name]) for s in self.slos)

    @property
    def short(self) -> bool:
        return self.e2e_p50_s is not None and self.window_s < SHORT_WINDOW * self.e2e_p50_s

    def misses(self) -> list[str]:
        """Why the run does not meet the SLOs (empty when it does): sustainability first."""
        why = []
        if self.served < 1 - SERVED_TOLERANCE:
            short = (f" (over {self.window_s / self.e2e_p50_s:.1f} median latencies only: too short to tell, raise "
                     f"--num-requests)" if self.short and self.ttft_growth <= GROWTH_TOLERANCE else "")
            why.append(f"not sustainable: served {self.served:.2f}x of arrivals{short}")
        if self.ttft_growth > GROWTH_TOLERANCE:
            why.append(f"not sustainable: TTFT grows {self.ttft_growth:.3f} s/s")
        for s in self.slos:
            value = self.values[s.name]
            if not s.meets(value):
                why.append(f"{s.name} {'-' if value is None else f'{value:.4g}'} s > {s.target_s:g} s")
        return why

    def row(self) -> dict:
        """Flat fields for a CSV row."""
        return dict(window_requests=self.window_requests, window_s=self.window_s, offered_req_s=self.offered_req_s,
                    served=self.served, ttft_growth_s_per_s=self.ttft_growth, sustainable=self.sustainable,
                    **{f"{name}_s": value for name, value in self.values.items()}, goodput_req_s=self.goodput_req_s,
                    meets=self.meets, short_window=self.short)


def judge(table: dict[str, np.ndarray], gaps: TokenGaps | None, slos: tuple[Slo, ...] = ()) -> Judgement:
    """The window of a run (its request table, records.request_table, and its token gaps: needed for an
    SLO on ITL only) against `slos`."""
    order = np.argsort(table["arrival_s"], kind="stable")
    first, end = window_bounds(len(order))
    if end - first < 2:
        raise SloError(f"a run of {len(order)} requests has no steady-state window")
    arrival = table["arrival_s"]
    window = order[first:end]
    t0, t1 = float(arrival[window[0]]), float(arrival[window[-1]])
    if not t1 > t0:
        raise SloError("the window's requests all arrive at once: a rate needs arrivals spread in time")
    kept = table["status"] != State.REJECTED.value  # refused for their length, whatever the load
    values = {name: v[window] for name, v in request_values(table).items()}
    e2e = values["e2e"][np.isfinite(values["e2e"])]
    lag = float(np.median(e2e)) if e2e.size else 0.0
    finish = np.nan_to_num(table["finish_s"], nan=np.inf)
    arrived = int((kept & (arrival >= t0) & (arrival <= t1)).sum())
    served = int((kept & (finish >= t0 + lag) & (finish <= t1 + lag)).sum()) / arrived if arrived else 1.0
    thirds = np.array_split(window, 3)
    ttft = [np.nanmedian(table["ttft_s"][part]) if np.isfinite(table["ttft_s"][part]).any() else np.nan
            for part in thirds]
    centre = [float(np.median(arrival[part])) for part in thirds]
    growth = (ttft[2] - ttft[0]) / (centre[2] - centre[0]) if centre[2] > centre[0] else 0.0
    statistics = {s.name: _statistic(s, values, gaps, t0, t1) for s in slos}
    goodput_slos = tuple(s for s in slos if s.metric in PER_REQUEST)
    goodput = int(good(values, goodput_slos).sum()) / (t1 - t0) if goodput_slos else None
    return Judgement(len(window), t1 - t0, arrived / (t1 - t0), served, float(np.nan_to_num(growth, nan=np.inf)),
                     lag if e2e.size else None, statistics, slos, goodput)


def sustainable(table: dict[str, np.ndarray], gaps: TokenGaps | None = None) -> bool | None:
    """Whether a run's rate is sustainable; None when its window cannot say (fewer than
    MIN_WINDOW_REQUESTS requests, every request at once, or a window short against latency whose only
    failure is the served test, which such a window blurs)."""
    if window_requests(len(table["arrival_s"])) < MIN_WINDOW_REQUESTS:
        return None
    try:
        judged = judge(table, gaps)
    except SloError:
        return None
    if judged.short and not judged.sustainable and judged.ttft_growth <= GROWTH_TOLERANCE:
        return None
    return judged.sustainable


def _statistic(slo: Slo, values: dict[str, np.ndarray], gaps: TokenGaps, t0: float, t1: float) -> float | None:
    if slo.metric == "itl":
        if gaps is None:
            raise ValueError("an SLO on ITL needs a run that folded the gaps between tokens (token_gaps=True)")
        sample, counts = gaps.arrays(t0, t1)
    else:
        sample = values[slo.metric][np.isfinite(values[slo.metric])]
        counts = np.ones(sample.size, dtype=np.int64)
    if slo.percentile is not None:
        return percentile(sample, counts, slo.percentile)
    return float((sample * counts).sum() / counts.sum()) if counts.sum() else None


def offline_throughput(table: dict[str, np.ndarray]) -> float:
    """Requests per second of a run with every request at once (the most the engine serves, never short
    of work), the larger of two measures: all its requests over its span, and the completions of its
    middle (by finish order, the same shares left out as the window) per second, which the tail of
    the last long requests, decoding in ever smaller batches, does not dilute."""
    finish = np.sort(table["finish_s"][table["status"] == State.FINISHED.value])
    if not finish.size or not finish[-1] > 0:
        return 0.0
    whole = finish.size / (finish[-1] - float(table["arrival_s"].min()))
    first, end = window_bounds(finish.size)
    middle = (end - 1 - first) / (finish[end - 1] - finish[first]) if finish[end - 1] > finish[first] else 0.0
    return max(whole, middle)
