"""Capacity searches: a closed-form capacity, a burst the old method took for capacity, bisection against
closed forms, and the command's files and refusals."""
import math

import pytest

from hwmodels import CapacityError
from pie_serving.slo import parse_slos
from pie_sim.capacity import (
    FIRST_PROBE,
    Job,
    judge_scenario,
    lowest_gpu_mem_util,
    max_rate,
    min_gpu_mem,
    offline_bound,
    search,
)
from pie_sim.cli import build_parser, capacity_options, main, scenario_of
from pie_sim.scenario import Scenario, summarize
from pie_sim.steady_state import GROWTH_TOLERANCE, SERVED_TOLERANCE, Judgement

from .conftest import DATA

# Every request: 16 prompt and 16 output tokens, one at a time (max_num_seqs 1), each iteration 2 layers x
# 1 ms (fixed-cost-hw.toml): a request costs 16 iterations, 32 ms, so the engine serves 31.25 req/s.
CAPACITY = 1 / (16 * 2 * 1e-3)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace") / "fixed.csv"
    trace.write_text("prompt_tokens,output_tokens\n" + "16,16\n" * 2000)
    return Scenario(hw=str(DATA / "fixed-cost-hw.toml"), model=str(DATA / "tiny-opt.toml"), trace=str(trace),
                    num_requests=400, policy="vllm", max_num_seqs=1)


def test_the_offline_throughput_of_a_fixed_cost_system_is_its_closed_form(fixed):
    assert offline_bound(fixed) == pytest.approx(CAPACITY, rel=1e-9)


def test_capacity_finds_a_closed_form_capacity_within_its_tolerances(fixed):
    """Nearly periodic arrivals (cv 0.05): no queue below 31.25 req/s, one growing at the excess above.
    Searched with the offline bound out of the way (twice the capacity), the criterion alone lands within
    the bisection's tolerance below, and within what the served test tolerates above; with the bound, below
    it. Poisson arrivals queue before capacity: never judged above it."""
    tolerance = 0.02
    alone = max_rate(fixed.replace(cv=0.05), (), tolerance, offline=2 * CAPACITY, confirm=1)
    assert alone.bound == "found" and "not sustainable" in alone.binding
    assert CAPACITY / (1 + tolerance) <= alone.value <= CAPACITY / (1 - SERVED_TOLERANCE)
    bounded = max_rate(fixed.replace(cv=0.05), (), tolerance, confirm=1)
    assert bounded.upper == pytest.approx(CAPACITY) and CAPACITY / (1 + tolerance) ** 2 <= bounded.value < CAPACITY
    assert all(p.value < bounded.upper for p in bounded.probes)
    poisson = max_rate(fixed, (), tolerance, offline=2 * CAPACITY, confirm=1)
    assert poisson.value <= CAPACITY / (1 - SERVED_TOLERANCE)


def test_a_burst_above_the_offline_throughput_that_drains_within_the_slo_is_not_sustainable():
    """The old method: the mean normalized latency of all the requests within the SLO. A burst at 1.5x
    what the engine serves at most drains within it, and is no capacity."""
    base = Scenario(hw="gh200-96g", model="opt-13b", num_requests=300, policy="vllm", gpu_mem_util=0.35)
    offline = offline_bound(base)
    burst = base.replace(rate=1.5 * offline)
    slo = 1.01 * summarize(burst)["normalized_latency_s"]
    slos = parse_slos([f"normalized_mean={slo}"])
    judged = judge_scenario(burst, slos)
    assert not judged.sustainable and judged.served < 1 - SERVED_TOLERANCE
    assert any(m.startswith("not sustainable") for m in judged.misses())
    answer = max_rate(base, slos, 0.1, offline=offline, confirm=1)
    assert answer.value is not None and answer.value < offline


def fake(capacity: float, latency_at: float, longer_at: float | None = None):
    """A system that serves `capacity` req/s and whose `ttft_p50` is rate / latency_at (s); with runs of
    more than 400 requests, rate / longer_at (a tail that only longer runs see)."""
    slos = parse_slos(["ttft_p50=1"])

    def evaluate(s: Scenario) -> Judgement:
        excess = s.rate / capacity - 1
        at = longer_at if longer_at is not None and s.num_requests > 400 else latency_at
        return Judgement(600, 600 / s.rate, s.rate, min(1.0, 1 / (1 + max(excess, 0))), max(excess, 0.0), 1.0,
                         {"ttft_p50": s.rate / at}, slos, s.rate)
    return slos, evaluate


@pytest.mark.parametrize("latency_at, boundary", [(4.0, 4.0), (9.5, 9.5), (0.3, 0.3), (50.0, 10.2)])
@pytest.mark.parametrize("tolerance", [0.1, 0.02, 0.001])
def test_max_rate_lands_within_tolerance_below_the_closed_form_boundary(latency_at, boundary, tolerance):
    """The boundary is the SLO's (latency 1 s at `latency_at`) or the capacity's (10 req/s, growth
    tolerated up to 2% over it), whichever comes first; the offline bound (12 req/s) is never probed."""
    slos, evaluate = fake(10.0, latency_at)
    boundary = min(boundary, 10.0 * (1 + GROWTH_TOLERANCE))
    answer = max_rate(Scenario(num_requests=400), slos, tolerance, evaluate=evaluate, offline=12.0)
    assert answer.bound == "found" and boundary / (1 + tolerance) <= answer.value <= boundary
    assert all(p.meets == (p.value <= boundary) for p in answer.probes)
    assert all(p.value < 12.0 for p in answer.probes) and answer.upper == 12.0
    next_up = min(p.value for p in answer.probes if p.value > answer.value)
    expected = next(p for p in answer.probes if p.value == next_up).misses()
    assert answer.binding == expected and (("ttft_p50" in expected) == (latency_at < 10.2))


@pytest.mark.parametrize("longer_at", [7.0, 3.0, 0.5])
def test_the_answer_is_confirmed_with_longer_runs_and_searched_on_with_them_where_it_misses(longer_at):
    """Short runs put the boundary at 8 req/s, runs of 4x the requests lower (what a run as long as the
    check that follows sees): the answer is the longer runs', within the tolerance, decided by them, in
    about twice as many longer runs as the log of the distance in tolerances (exponential steps, then
    bisection)."""
    slos, evaluate = fake(10.0, 8.0, longer_at)
    tolerance = 0.02
    answer = max_rate(Scenario(num_requests=400), slos, tolerance, evaluate=evaluate, offline=12.0)
    assert answer.bound == "found" and longer_at / (1 + tolerance) <= answer.value <= longer_at
    assert answer.at.requests == 1600 and answer.at.meets
    long = [p for p in answer.probes if p.requests == 1600]
    steps = math.log(8.0 / longer_at) / math.log(1 + tolerance)  # the distance in tolerances
    assert all(p.meets == (p.value <= longer_at) for p in long) and len(long) <= 2 * math.log2(steps) + 3
    assert answer.binding.startswith("ttft_p50") and all(p.value < 12.0 for p in answer.probes)
    unconfirmed = max_rate(Scenario(num_requests=400), slos, tolerance, evaluate=evaluate, offline=12.0, confirm=1)
    assert 8.0 / (1 + tolerance) <= unconfirmed.value <= 8.0


def test_max_rate_says_when_nothing_binds_below_the_offline_throughput_or_nothing_passes():
    slos, evaluate = fake(100.0, 1e6)
    limit = max_rate(Scenario(num_requests=400), slos, 0.02, evaluate=evaluate, offline=12.0)
    assert limit.bound == "limit" and 12.0 / 1.02 <= limit.value < 12.0 and "offline" in limit.binding
    slos, evaluate = fake(100.0, 1e-6)
    none = max_rate(Scenario(num_requests=400), slos, 0.02, evaluate=evaluate, offline=12.0)
    assert (none.value, none.bound) == (None, "none") and "ttft_p50" in none.binding
    assert max(p.value for p in none.probes) == pytest.approx(12.0 * FIRST_PROBE)


@pytest.mark.parametrize("upper, bound", [(0.9, "found"), (0.55, "none")])
def test_min_gpu_mem_lands_within_tolerance_above_the_boundary_and_never_above_the_range(upper, bound):
    """Passing needs 0.6 of HBM; the search's range ends at the scenario's gpu_mem_util, so a system that
    needs more than that is 'none', never an answer above it."""
    boundary, tolerance = 0.6, 0.01
    slos = parse_slos(["e2e_p99=1"])

    def evaluate(s: Scenario) -> Judgement:
        if s.gpu_mem_util < 0.4:
            raise CapacityError("no KV pool")  # a setting that cannot run counts as a miss
        return Judgement(600, 60, 10, 1.0, 0.0, 1.0, {"e2e_p99": 1.5 - (s.gpu_mem_util - 0.1)}, slos, 10)

    scenario = Scenario(num_requests=400, rate=5.0, gpu_mem_util=upper)
    answer = min_gpu_mem(scenario, slos, tolerance, evaluate=evaluate)
    assert answer.bound == bound and answer.upper == upper and all(p.value <= upper for p in answer.probes)
    if bound == "found":
        assert boundary <= answer.value <= boundary / (1 - tolerance)
        low = answer.probes[0]
        assert low.value == lowest_gpu_mem_util(scenario) and not low.meets and "no KV pool" in low.error
        assert answer.binding.startswith("e2e_p99")
    else:
        assert answer.value is None and answer.binding.startswith("e2e_p99")


def test_the_least_hbm_is_confirmed_with_longer_runs():
    """Short runs pass from 0.6 of HBM, runs of 4x the requests from 0.7: the answer is the longer runs'."""
    slos = parse_slos(["e2e_p99=1"])

    def evaluate(s: Scenario) -> Judgement:
        needs = 0.7 if s.num_requests > 400 else 0.6
        return Judgement(600, 60, 10, 1.0, 0.0, 1.0, {"e2e_p99": 1.0 + needs - s.gpu_mem_util}, slos, 10)

    answer = min_gpu_mem(Scenario(num_requests=400, rate=5.0, gpu_mem_util=0.9), slos, 0.01, evaluate=evaluate)
    assert answer.bound == "found" and 0.7 <= answer.value <= 0.7 / (1 - 0.01) and answer.at.requests == 1600
    assert answer.value <= 0.9 and answer.binding.startswith("e2e_p99")


@pytest.mark.parametrize("bad", [dict(tolerance=0), dict(tolerance=1), dict(num_requests=100)])
def test_bad_search_settings_are_refused(bad):
    slos, evaluate = fake(10.0, 4.0)
    scenario = Scenario(num_requests=bad.pop("num_requests", 400))
    with pytest.raises(ValueError):
        max_rate(scenario, slos, **({"tolerance": 0.02} | bad), evaluate=evaluate, offline=12.0)


def test_search_job_runs_either_question(fixed):
    answer = search(Job(fixed.replace(rate=20.0), parse_slos(["tpot_p99=0.003"]), 0.05, min_hbm=True))
    assert answer.bound in ("found", "limit") and answer.value <= fixed.gpu_mem_util


def test_capacity_command_writes_its_tables(fixed, tmp_path, capsys):
    assert main(["capacity", "--hw", fixed.hw, "--model", fixed.model, "--trace", fixed.trace, "--num-requests",
                 "300", "--max-num-seqs", "1", "--policy", "vllm", "--slo", "ttft_p99=0.2", "--slo", "itl_p50=1",
                 "--tolerance", "0.05", "--cv", "0.5", "--workers", "1", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "capacity.csv").read_text().splitlines()
    assert rows[0].startswith("hw,policy,max_rate_req_s,offline_req_s") and len(rows) == 2
    assert "ttft_p99_s" in rows[0] and "itl_p50_s" in rows[0] and "binding" in rows[0]
    probes = (tmp_path / "probes.csv").read_text().splitlines()
    assert len(probes) > 4 and "served" in probes[0] and "ttft_growth_s_per_s" in probes[0]
    printed = capsys.readouterr().out
    assert "What binds:" in printed and "at the next probe up: " in printed


def test_capacity_shapes_every_probe_s_arrivals_with_cv():
    """Every probe re-times the arrivals, so --cv needs no --rate here (1, Poisson, when not given); the
    answers' check (bench/bench_capacity.py) reads the same scenarios."""
    for given, cv in (([], 1.0), (["--cv", "2"], 2.0)):
        args = build_parser().parse_args(["capacity", *given, "--out", "unused"])
        capacity_options(args)
        assert scenario_of(args, "pie").cv == cv


@pytest.mark.parametrize("args, message", [
    (["--slo", "ttfx_p99=2"], "--slo ttfx_p99=2: unknown metric 'ttfx'"),
    (["--slo", "ttft_p99=0"], "--slo ttft_p99=0: the target must be a positive number of seconds"),
    (["--slo", "ttft_p99=-1"], "the target must be a positive"),
    (["--slo", "ttft_p101=2"], "percentile 101 is outside (0, 100]"),
    (["--slo", "ttft_p0=2"], "percentile 0 is outside (0, 100]"),
    (["--slo", "ttft_q9=2"], "'q9' is not a percentile"),
    (["--slo", "ttft_p99=2", "--slo", "ttft_p99=3"], "ttft_p99 given more than once"),
    (["--num-requests", "100"], "--num-requests 100: its steady-state window (60 requests"),
    (["--num-requests", "1000", "--slo", "ttft_p99.9=5"], "too small to judge --slo ttft_p99.9 (needs 1000): give at least 1664"),
    (["--min-hbm"], "--min-hbm needs --rate"),
    (["--tolerance", "1.5"], "--tolerance must be a fraction in (0, 1)"),
    (["--confirm", "0"], "--confirm must be a positive integer"),
])
def test_bad_input_is_one_line_naming_the_option_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["capacity", *args, "--out", str(out)]) == 2
    captured = capsys.readouterr()  # the command's refusals on stdout, argparse's on stderr
    printed = captured.out + captured.err
    assert message in printed and len(printed.strip().splitlines()) == 1
    assert not out.exists()


def test_the_rate_question_never_probes_infinity():
    """Regression: the old search probed every request at once as a rate; the window of such a run has no span."""
    slos, evaluate = fake(10.0, 4.0)
    answer = max_rate(Scenario(num_requests=400), slos, 0.02, evaluate=evaluate, offline=12.0)
    assert all(math.isfinite(p.value) for p in answer.probes)
