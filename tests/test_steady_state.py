"""The sustainable-rate criterion on runs whose queue is known in closed form."""
import numpy as np
import pytest

from pie_serving.slo import SloError, parse_slos
from pie_sim.steady_state import (
    GROWTH_TOLERANCE,
    SERVED_TOLERANCE,
    check_window,
    judge,
    needed_window,
    offline_throughput,
    sustainable,
    window_bounds,
)


def table(arrival, first, finish, output=None):
    """A request table (records.request_table's columns) of finished requests."""
    n = len(arrival)
    output = np.full(n, 10) if output is None else np.asarray(output)
    arrival, first, finish = (np.asarray(a, dtype=float) for a in (arrival, first, finish))
    return dict(request_id=np.arange(n), arrival_s=arrival, prompt_tokens=np.full(n, 10), output_tokens=output,
                first_token_s=first, finish_s=finish, ttft_s=first - arrival, tpot_s=(finish - first) / (output - 1),
                e2e_s=finish - arrival, preemptions=np.zeros(n, int), status=np.full(n, "finished", dtype=object),
                reason=np.full(n, "", dtype=object))


def single_server(rate: float, service: float, n: int = 1000):
    """Periodic arrivals at `rate` served one at a time in `service` s each (first token at 10% of it):
    below 1/service nobody waits; above, request i waits i·(service - 1/rate)."""
    arrival = np.arange(n) / rate
    finish = np.empty(n)
    for i in range(n):
        finish[i] = max(arrival[i], finish[i - 1] if i else 0.0) + service
    return table(arrival, finish - 0.9 * service, finish)


@pytest.mark.parametrize("load", [0.5, 0.9, 0.99])
def test_below_capacity_is_sustainable(load):
    judged = judge(single_server(load * 10, 0.1), None)
    assert judged.sustainable and judged.served == pytest.approx(1.0, abs=0.01)
    assert judged.ttft_growth == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("load", [1.03, 1.1, 1.5])
def test_above_capacity_the_served_share_and_the_growth_are_the_overloads_closed_forms(load):
    """Served: the server completes 1/load of what arrives; growth: each request waits (load - 1) s more
    per s of arrivals. Both tests reject an overload beyond their tolerance."""
    judged = judge(single_server(load * 10, 0.1), None)
    assert judged.served == pytest.approx(1 / load, abs=0.01)
    assert judged.ttft_growth == pytest.approx(load - 1, rel=0.02)
    assert not judged.sustainable
    assert judged.misses()[-1] == f"not sustainable: TTFT grows {judged.ttft_growth:.3f} s/s"
    assert (judged.served < 1 - SERVED_TOLERANCE) == (load > 1 / (1 - SERVED_TOLERANCE) + 0.01)
    assert judged.ttft_growth > GROWTH_TOLERANCE


def test_warm_up_and_drain_are_left_out_and_slos_read_the_window_alone():
    """A run whose first and last fifth are slow (a cold start, a burst at the end) but whose middle is
    steady is sustainable, and its percentiles are those of the middle's requests."""
    n, rate = 1000, 10.0
    arrival = np.arange(n) / rate
    ttft = np.full(n, 0.05)
    ttft[: n // 5], ttft[-n // 5:] = 30.0, 20.0
    rng = np.random.default_rng(0)
    ttft[n // 5: -n // 5] += rng.uniform(0, 0.1, n - 2 * (n // 5))
    runs = table(arrival, arrival + ttft, arrival + ttft + 1.0)
    slos = parse_slos(["ttft_p99=1", "e2e_mean=2", "normalized_p50=0.2"])
    judged = judge(runs, None, slos)
    first, end = window_bounds(n)
    middle = ttft[first:end]
    assert judged.meets and judged.window_requests == end - first
    assert judged.values["ttft_p99"] == pytest.approx(np.percentile(middle, 99))
    assert judged.values["e2e_mean"] == pytest.approx(np.mean(middle + 1.0))
    assert judged.values["normalized_p50"] == pytest.approx(np.median((middle + 1.0) / 10))
    assert judged.goodput_req_s == pytest.approx((end - first) / (arrival[end - 1] - arrival[first]))
    whole = judge(runs, None, parse_slos(["ttft_p99=1"]))
    assert whole.values["ttft_p99"] < 1, "the 30 s of the warm-up stay out"


def test_an_slo_missed_in_the_window_says_which():
    judged = judge(single_server(5, 0.1), None, parse_slos(["ttft_p50=0.001", "e2e_p99=10"]))
    assert judged.sustainable and not judged.meets
    assert judged.misses() == [f"ttft_p50 {judged.values['ttft_p50']:.4g} s > 0.001 s"]


def test_the_offline_throughput_is_the_most_the_engine_serves_with_work_always_waiting():
    """Every request at 0, served one at a time in 0.1 s: 10 req/s, however the tail ends."""
    n = 500
    finish = 0.1 * np.arange(1, n + 1)
    assert offline_throughput(table(np.zeros(n), finish - 0.05, finish)) == pytest.approx(10.0)
    tail = finish.copy()
    tail[-1] += 100.0  # one last long request: the whole span dilutes, the middle does not
    assert offline_throughput(table(np.zeros(n), tail - 0.05, tail)) == pytest.approx(10.0)
    assert sustainable(table(np.zeros(n), finish - 0.05, finish)) is None, "all at once: no window to judge"
    assert sustainable(single_server(5, 0.1, 100)) is None, "too few requests"


def test_a_window_too_small_for_a_percentile_is_refused_before_anything_runs():
    assert needed_window() == 100 and needed_window(parse_slos(["ttft_p99.9=1", "tpot_p99=1"])) == 1000
    assert needed_window(parse_slos(["ttft_p100=1", "e2e_mean=3"])) == 100
    check_window(167)
    with pytest.raises(SloError, match="--num-requests 166: its steady-state window \\(100 requests"):
        check_window(166, parse_slos(["ttft_p99.5=1"]))
    check_window(0)  # the whole trace: judged once it has run


def test_a_window_short_against_latency_says_so_when_it_fails_the_served_test():
    """Requests whose latency still climbs from 8 s to 40 s over a 100 s run: a window 60 s long,
    under 5 median latencies, cannot tell a warming engine from one falling behind, and says so."""
    n, rate = 200, 2.0
    arrival = np.arange(n) / rate
    e2e = 40.0 * np.minimum(1.0, 0.2 + arrival / 60)
    judged = judge(table(arrival, arrival + 0.1, arrival + e2e), None)
    assert judged.short and not judged.sustainable and judged.ttft_growth == pytest.approx(0.0, abs=1e-12)
    assert judged.misses() == [f"not sustainable: served {judged.served:.2f}x of arrivals (over "
                               f"{judged.window_s / judged.e2e_p50_s:.1f} median latencies only: too short to tell, "
                               f"raise --num-requests)"]
    assert sustainable(table(arrival, arrival + 0.1, arrival + e2e)) is None, "a sweep's column: cannot say"
    growing = arrival + 0.1 + 0.5 * arrival  # the queue grows 0.5 s a second: short or not, a failure
    assert sustainable(table(arrival, growing, growing + e2e)) is False
