"""Inter-token latency folded as tokens are emitted, against every token's own time."""
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodels import CostModel, load_hardware, load_model
from pie_policy import request as request_module
from pie_policy.sizing import SINGLE_GPU_POLICIES, build_policy
from pie_serving.token_gaps import mean_std, percentile
from pie_sim.pipeline_sim import simulate_pipeline
from pie_sim.simulate import simulate
from traces import load_workload

CM = CostModel(load_hardware("gh200-96g"), load_model("opt-30b"))


@pytest.fixture
def token_times(monkeypatch):
    """Every token's time, per request, as the requests record them one by one (the reference)."""
    times = defaultdict(list)
    advance = request_module.Request.advance

    def recording(self, new_tokens, now):
        before = self.generated
        done = advance(self, new_tokens, now)
        if self.generated > before:
            times[self.request_id].append(now)
        return done

    monkeypatch.setattr(request_module.Request, "advance", recording)
    return times


def _policy(name, cm, workload, **options):
    return build_policy(name, cm, cpu_mem_bytes=64 * 1024**3, mean_prompt=int(workload.prompt_tokens.mean()),
                        mean_output=int(workload.output_tokens.mean()), **options)


def _same_gaps(gaps, times):
    reference = np.concatenate([np.diff(t) for t in times.values()])
    values, counts = gaps.arrays()
    assert counts.sum() == reference.size
    assert np.allclose(np.sort(np.repeat(values, counts)), np.sort(reference), rtol=1e-9, atol=1e-12)
    for q in (1, 50, 90, 99, 100):
        assert percentile(values, counts, q) == pytest.approx(np.percentile(reference, q), rel=1e-12)
    mean, std = mean_std(values, counts)
    assert (mean, std) == pytest.approx((reference.mean(), reference.std()), rel=1e-9)
    return values.size, reference.size


@pytest.mark.parametrize("name, rate", [("vllm", 30.0), ("vllm-swap", 30.0), ("pie", 30.0), ("vllm", 3.0),
                                        *(pytest.param(n, 30.0, marks=pytest.mark.slow) for n in SINGLE_GPU_POLICIES
                                          if n not in ("vllm", "vllm-swap", "pie"))])
def test_gaps_are_every_tokens_gap_whether_decodes_run_one_by_one_or_together(name, rate, token_times):
    """The reference records each token's time one iteration at a time; the folded gaps of the same run
    with decode runs (tokens committed many iterations at once) are the same multiset, in far fewer
    entries than tokens, under pressure (a queue, preemptions) and light load."""
    workload = load_workload("sharegpt", 60, rate=rate, seed=3)
    one_by_one = simulate(_policy(name, CM, workload, gpu_mem_util=0.75), CM, workload, decode_runs=False, token_gaps=True)
    reference = {request: list(times) for request, times in token_times.items()}
    together = simulate(_policy(name, CM, workload, gpu_mem_util=0.75), CM, workload, token_gaps=True)
    for result in (one_by_one, together):
        entries, tokens = _same_gaps(result.recorder.gaps, reference)
        assert entries < tokens / 5, "the gaps were meant to be folded, not kept one per token"
    if rate > 10 and name == "vllm":
        assert sum(r.preemptions for r in one_by_one.requests) > 0, "pressure was meant to preempt"


@pytest.mark.slow
def test_gaps_of_the_pipeline_simulator(token_times):
    cm = CostModel(load_hardware("pcie-8x-l40s"), load_model("opt-66b"))
    workload = load_workload("sharegpt", 40, rate=4.0, seed=1)
    result = simulate_pipeline(_policy("pipemax", cm, workload), cm, workload, token_gaps=True)
    _same_gaps(result.recorder.gaps, token_times)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.integers(0, 5)), min_size=1, max_size=30),
       st.floats(0, 100))
def test_weighted_percentile_is_numpys_over_the_expanded_sample(pairs, q):
    values, counts = (np.array(column) for column in zip(*pairs))
    expanded = np.repeat(values, counts)
    got = percentile(values, counts.astype(np.int64), q)
    if expanded.size == 0:
        assert got is None
    else:
        assert got == pytest.approx(np.percentile(expanded, q), rel=1e-12, abs=1e-12)
