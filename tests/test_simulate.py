"""A whole simulated run: conservation and determinism for every policy."""
import pytest

from hwmodels import CostModel, load_hardware, load_model
from pie_policy import State
from pie_policy.sizing import ALL_POLICIES, build_policy
from pie_sim.simulate import simulate
from traces import load_workload

CM = CostModel(load_hardware("gh200-96g"), load_model("opt-30b"))


def run(name, workload):
    policy = build_policy(name, CM, cpu_mem_bytes=64 * 1024**3, gpu_mem_util=0.75,
                          mean_prompt=int(workload.prompt_tokens.mean()), mean_output=int(workload.output_tokens.mean()))
    return policy, simulate(policy, CM, workload)


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_every_request_finishes_once_with_its_tokens_and_memory_stays_within_the_pools(name):
    workload = load_workload("sharegpt", 80, rate=40.0, seed=1)
    policy, result = run(name, workload)
    assert sorted(r.request_id for r in result.requests) == list(range(80))
    assert all(r.state is State.FINISHED and r.generated == r.output_tokens for r in result.requests)
    assert all(r.arrival_s <= r.first_token_s <= r.finish_s for r in result.requests)
    its = result.recorder.iterations
    assert all(a.end_s <= b.start_s for a, b in zip(its, its[1:])) and all(i.start_s < i.end_s for i in its)
    if name != "flexgen":
        config = policy.config
        assert max(i.gpu_kv_bytes for i in its) <= config.num_gpu_blocks * config.block_bytes
        assert max(i.cpu_kv_bytes for i in its) <= config.num_cpu_blocks * config.block_bytes
        if name in ("static", "vllm-swap"):
            assert max(i.cpu_kv_bytes for i in its) > 0, "the load was meant to use the CPU"


def test_same_seed_same_run():
    workload = load_workload("sharegpt", 80, rate=40.0, seed=2)
    (_, a), (_, b) = run("pie", workload), run("pie", workload)
    assert a.recorder.iterations == b.recorder.iterations
    assert [(r.first_token_s, r.finish_s, r.preemptions) for r in a.requests] == \
           [(r.first_token_s, r.finish_s, r.preemptions) for r in b.requests]
