"""The map of where the paper's claims hold, computed from hand-made runs whose answers are worked out."""
import math

import pytest

from pie_sim.reproduce_map import MapGrid, MapPanel, claims, map_section, max_rate

GRID = MapGrid((0.5, 0.9), (0.5, 1.0, 1.5), slo_factor=2.0)


def run(latency: float, tok_s: float = 100.0, preemptions: int = 0) -> dict:
    return {"normalized_latency_s": latency, "throughput_tok_s": tok_s, "preemptions": preemptions}


def panel() -> MapPanel:
    """Reference rate 10 req/s. With 0.9 of HBM vLLM's latency is 0.1, 0.2, 0.5 at 5, 10, 15 req/s (SLO:
    2 x 0.1 = 0.2), pie's 0.1, 0.1, 0.3; with 0.5 vLLM's 0.3, 0.6, 0.9 (never within the SLO), pie's 0.1,
    0.25, 0.6. Offline, pie makes 110 tok/s against 100 with 0.9 of HBM and 100 against 100 with 0.5."""
    p = MapPanel("opt-30b", "sharegpt", 10.0)
    latencies = {(0.9, "vllm"): (0.1, 0.2, 0.5), (0.9, "pie"): (0.1, 0.1, 0.3),
                 (0.5, "vllm"): (0.3, 0.6, 0.9), (0.5, "pie"): (0.1, 0.25, 0.6)}
    for (util, policy), values in latencies.items():
        for factor, latency in zip(GRID.factors, values):
            p.runs[util, factor, policy] = run(latency, preemptions=7 if policy == "vllm" and factor > 1 else 0)
        p.runs[util, math.inf, policy] = run(1.0, 110.0 if (util, policy) == (0.9, "pie") else 100.0, 9)
        p.link_bound[util] = 0.25
    return p


def test_the_highest_rate_within_the_slo_is_interpolated_along_the_curve():
    p = panel()
    assert max_rate(p, GRID, 0.9, "vllm", 0.2) == (10.0, False)
    # pie with 0.9: 0.1 at 10 req/s, 0.3 at 15: the SLO 0.2 is crossed halfway, at 12.5
    assert max_rate(p, GRID, 0.9, "pie", 0.2) == (pytest.approx(12.5), False)
    assert max_rate(p, GRID, 0.5, "vllm", 0.2) == (None, False)
    assert max_rate(p, GRID, 0.9, "pie", 1.0) == (15.0, True)   # within the SLO at the highest rate


def test_each_claim_is_worked_out_point_by_point():
    found = claims(panel(), GRID)
    latency = {(q.util, q.factor): q.ratio for q in found["Normalized latency at equal rate, vLLM / pie"]}
    assert latency[0.9, 1.0] == pytest.approx(2.0) and latency[0.5, 0.5] == pytest.approx(3.0)
    throughput = {q.util: q.ratio for q in found["Throughput at equal latency (SLO 2x), pie / vLLM"]}
    assert throughput == {0.5: None, 0.9: pytest.approx(1.25)}
    # least util meeting the SLO: at 5 req/s vLLM needs 0.9, pie 0.5; at 10 both 0.9; at 15 neither
    memory = {q.factor: q.ratio for q in found["GPU memory at equal performance, vLLM / pie"]}
    assert memory == {0.5: pytest.approx(1.8), 1.0: pytest.approx(1.0), 1.5: None}
    offline = {q.util: q.ratio for q in found["Offline throughput, pie / vLLM"]}
    assert offline == {0.5: pytest.approx(1.0), 0.9: pytest.approx(1.1)}


def test_the_section_says_where_each_claim_holds_and_the_largest_factor():
    unfit = panel()
    unfit.model = "opt-66b"
    unfit.runs = {key: value for key, value in unfit.runs.items() if key[0] != 0.5}
    unfit.unfit[0.5] = "leaves no KV pool"
    text = "\n".join(map_section([panel(), unfit], GRID))
    assert "Largest factor: 3.00x, opt-30b / sharegpt util 0.5 0.5x load (vLLM never preempted)." in text
    assert "Largest factor: 1.80x, opt-30b / sharegpt 0.5x load (least util: vLLM 0.9, pie 0.5)." in text
    assert "| opt-66b / sharegpt | 0.5 | - | does not fit: leaves no KV pool | - | - |" in text
    offline = next(line for line in text.splitlines() if line.startswith("**Offline throughput"))
    assert "Holds at 2 of 3 points: opt-30b / sharegpt util 0.9 offline (1.10x); opt-66b" in offline
