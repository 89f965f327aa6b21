"""A long simulated run keeps memory in proportion to what it reports (its iterations' and requests' rows),
not to every copy it ever issued: a KV-limited 200,000-request pie run once took 11 GB (vLLM: 0.9 GB)."""
import gc
import tracemalloc

import pytest

from pie_sim.scenario import Scenario, simulate_scenario

ROW_BYTES = 2048  # retained per added iteration: its row in iterations.csv and its share of the requests' rows


def _retained(num_requests: int) -> tuple[int, int]:
    """(bytes still allocated while the run's result is held, iterations) of a KV-limited pie run."""
    gc.collect()
    tracemalloc.start()
    try:
        summary, result = simulate_scenario(Scenario(num_requests=num_requests, rate=40.0, gpu_mem_util=0.4,
                                                     policy="pie"))
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert summary["preemptions"] > 0, "the load must be KV-limited"
    return kept, summary["iterations"]


@pytest.mark.slow
def test_a_kv_limited_runs_memory_grows_only_with_its_rows():
    small, large = _retained(200), _retained(600)
    per_iteration = (large[0] - small[0]) / (large[1] - small[1])
    assert per_iteration < ROW_BYTES, f"{per_iteration:.0f} bytes kept per iteration"
