"""A whole simulated run: conservation and determinism for every policy."""
import numpy as np
import pytest

from hwmodels import CostModel, load_hardware, load_model
from pie_policy import State
from pie_policy.sizing import SINGLE_GPU_POLICIES, build_policy
from pie_sim.simulate import simulate
from traces import load_workload

CM = CostModel(load_hardware("gh200-96g"), load_model("opt-30b"))


def run(name, workload, **options):
    policy = build_policy(name, CM, cpu_mem_bytes=64 * 1024**3, gpu_mem_util=0.75,
                          mean_prompt=int(workload.prompt_tokens.mean()), mean_output=int(workload.output_tokens.mean()))
    return policy, simulate(policy, CM, workload, **options)


@pytest.mark.parametrize("name", SINGLE_GPU_POLICIES)
def test_every_request_finishes_once_with_its_tokens_and_memory_stays_within_the_pools(name):
    workload = load_workload("sharegpt", 80, rate=40.0, seed=1)
    policy, result = run(name, workload)
    assert sorted(r.request_id for r in result.requests) == list(range(80))
    assert all(r.state is State.FINISHED and r.generated == r.output_tokens for r in result.requests)
    assert all(r.arrival_s <= r.first_token_s <= r.finish_s for r in result.requests)
    its = result.recorder.iterations
    assert np.all(its["end_s"][:-1] <= its["start_s"][1:]) and np.all(its["start_s"] < its["end_s"])
    if name != "flexgen":
        config = policy.config
        assert its["gpu_kv_bytes"].max() <= config.num_gpu_blocks * config.block_bytes
        assert its["cpu_kv_bytes"].max() <= config.num_cpu_blocks * config.block_bytes
        if name in ("static", "vllm-swap"):
            assert its["cpu_kv_bytes"].max() > 0, "the load was meant to use the CPU"


def test_same_seed_same_run():
    workload = load_workload("sharegpt", 80, rate=40.0, seed=2)
    (_, a), (_, b) = run("pie", workload), run("pie", workload)
    for name, column in a.recorder.iterations.items():
        assert np.array_equal(column, b.recorder.iterations[name]), name
    assert [(r.first_token_s, r.finish_s, r.preemptions) for r in a.requests] == \
           [(r.first_token_s, r.finish_s, r.preemptions) for r in b.requests]


@pytest.mark.parametrize("name, rate", [("vllm", 30.0), ("vllm-swap", 30.0), ("pie", 30.0), ("vllm", 2.0), ("pie", 2.0)])
def test_decode_runs_are_the_same_iterations_as_one_by_one(name, rate):
    """Planning plain decode stretches at once changes the Python steps, not the simulated run: the same
    iterations with the same batches, blocks and (to rounding) times; under pressure (a queue, preemption)
    and under a light load (runs go past finishes)."""
    workload = load_workload("sharegpt", 120, rate=rate, seed=3)
    (_, fast), (_, slow) = run(name, workload), run(name, workload, decode_runs=False)
    assert fast.events < slow.events / (2 if rate < 10 else 1), "decode runs were meant to replace iteration events"
    assert (sum(r.preemptions for r in slow.requests) > 0) == (rate > 10), "pressure was meant to preempt, light not"
    assert [(r.request_id, r.preemptions, r.generated) for r in fast.requests] == \
           [(r.request_id, r.preemptions, r.generated) for r in slow.requests]
    for a, b in zip(fast.requests, slow.requests):
        assert (a.first_token_s, a.finish_s) == pytest.approx((b.first_token_s, b.finish_s), rel=1e-9)
    fast_its, slow_its = fast.recorder.iterations, slow.recorder.iterations
    for column in ("batch_sequences", "prefill_tokens", "decode_tokens", "bytes_h2d", "gpu_kv_bytes", "cpu_kv_bytes"):
        assert np.array_equal(fast_its[column], slow_its[column]), column
    for column in ("start_s", "end_s", "compute_s", "stall_s"):
        assert fast_its[column] == pytest.approx(slow_its[column], rel=1e-9, abs=1e-12), column
