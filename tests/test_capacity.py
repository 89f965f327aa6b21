"""Capacity searches: bisection against closed forms and against brute force on a tiny scenario."""
import math

import numpy as np
import pytest

from hwmodels import CapacityError
from pie_sim.capacity import lowest_gpu_mem_util, max_rate, min_gpu_mem
from pie_sim.cli import main
from pie_sim.scenario import Scenario, summarize

TINY = Scenario(hw="gh200-96g", model="opt-13b", num_requests=80, policy="vllm", gpu_mem_util=0.35)


def linear_latency(per_req_s: float, knee: float = 0.0):
    """A system whose normalized latency is 0.01 s + per_req_s·rate, serving 10 req/s offline."""
    def evaluate(s: Scenario) -> dict:
        rate = 20.0 if math.isinf(s.rate) else s.rate
        return dict(normalized_latency_s=0.01 + per_req_s * rate, throughput_tok_s=100.0, throughput_req_s=10.0)
    return evaluate


@pytest.mark.parametrize("slo", [0.0105, 0.02, 0.025, 0.029])
@pytest.mark.parametrize("tolerance", [0.1, 0.02, 0.001])
def test_max_rate_lands_within_tolerance_below_the_closed_form_boundary(slo, tolerance):
    boundary = (slo - 0.01) / 0.001
    answer = max_rate(TINY, slo, tolerance, evaluate=linear_latency(0.001))
    assert answer.bound == "found"
    assert boundary * (1 - tolerance) <= answer.value <= boundary
    assert all(p.meets == (p.value <= boundary) for p in answer.probes)


def test_max_rate_says_when_the_slo_never_binds_or_always_fails():
    assert max_rate(TINY, 0.05, evaluate=linear_latency(0.001)).value == math.inf
    assert max_rate(TINY, 0.05, evaluate=linear_latency(0.001)).bound == "limit"
    none = max_rate(TINY, 0.009, evaluate=linear_latency(0.001))
    assert (none.value, none.bound) == (None, "none")


def test_min_gpu_mem_lands_within_tolerance_above_the_closed_form_boundary():
    boundary, tolerance = 0.6, 0.01

    def evaluate(s: Scenario) -> dict:
        if s.gpu_mem_util < 0.4:
            raise CapacityError("no KV pool")  # a setting that cannot run counts as a miss
        return dict(normalized_latency_s=0.02 - 0.01 * s.gpu_mem_util, throughput_tok_s=1.0)

    answer = min_gpu_mem(TINY.replace(rate=5.0), 0.02 - 0.01 * boundary, tolerance, evaluate=evaluate)
    assert answer.bound == "found"
    assert boundary <= answer.value <= boundary / (1 - tolerance)
    low = answer.probes[0]
    assert low.value == lowest_gpu_mem_util(TINY) and not low.meets and "no KV pool" in low.error


@pytest.mark.parametrize("bad", [dict(slo=0), dict(tolerance=0), dict(tolerance=1)])
def test_bad_search_settings_are_refused(bad):
    with pytest.raises(ValueError):
        max_rate(TINY, **({"slo": 0.02, "tolerance": 0.02} | bad), evaluate=linear_latency(0.001))


def test_bisection_matches_brute_force_on_a_tiny_simulated_scenario():
    """The brute-force answer: the highest passing rate on a 2%-step scan around the offline throughput
    (the SLO lies between the latency at a light load and with every request at once)."""
    slo, tolerance = 0.018, 0.02
    answer = max_rate(TINY, slo, tolerance)
    offline = summarize(TINY.replace(rate=math.inf))["throughput_req_s"]
    rates = offline * np.exp(np.arange(np.log(0.5), np.log(2.5), 0.02))
    passing = [r for r in rates if summarize(TINY.replace(rate=float(r)))["normalized_latency_s"] <= slo]
    assert answer.bound == "found" and passing and max(passing) < rates[-1]
    assert abs(answer.value - max(passing)) <= tolerance * max(passing) + 0.02 * answer.value


def test_capacity_command_writes_its_tables(tmp_path, capsys):
    assert main(["capacity", "--hw", "gh200-96g", "--model", "opt-13b", "--num-requests", "80",
                 "--gpu-mem-util", "0.35", "--policy", "vllm,pie", "--slo-normalized-latency", "0.012",
                 "--tolerance", "0.1", "--workers", "1", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "capacity.csv").read_text().splitlines()
    assert rows[0].startswith("hw,policy,max_rate_req_s") and len(rows) == 3
    assert (tmp_path / "probes.csv").read_text().count("\n") > 4
    assert "vs vllm" in capsys.readouterr().out


def test_min_hbm_needs_a_rate(capsys):
    assert main(["capacity", "--min-hbm", "--out", "/nonexistent"]) == 2
    assert "--min-hbm needs --rate" in capsys.readouterr().out
