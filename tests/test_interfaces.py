"""The declared contract (pie_policy/interfaces.py): every registered policy and every backend satisfies
it, and a policy added in one file plus its registration runs in both backends."""
import pandas as pd
import pytest
import torch

from hwmodels import CostModel, GiB, load_hardware, load_model
from pie_exec.engine import Executor
from pie_exec.run import TokenServer
from pie_policy import EngineConfig, Policy, State
from pie_policy.blocks import CPU, GPU
from pie_policy.interfaces import Backend, DecodeRunPolicy, ServingPolicy
from pie_policy.registry import ENGINE, EXEC, PIPELINE, REGISTRY, SIM, entry, names
from pie_policy.sizing import build_policy
from pie_sim.layer_events import LayerEvents
from pie_sim.simulate import simulate
from pie_sim.timeline import Timeline

from .conftest import DATA


def built(name: str):
    hw = "pcie-8x-l40s" if REGISTRY[name].family == PIPELINE else "gh200-96g"
    model = "opt-66b" if REGISTRY[name].family == PIPELINE else "opt-13b"
    return build_policy(name, CostModel(load_hardware(hw), load_model(model)), cpu_mem_bytes=64 * GiB)


@pytest.mark.parametrize("name", names(backend=SIM))
def test_every_simulated_policy_is_a_serving_policy(name):
    policy = built(name)
    assert isinstance(policy, ServingPolicy) and policy.name == name
    assert isinstance(policy, DecodeRunPolicy) == (REGISTRY[name].family == ENGINE)
    assert policy.micro_batches >= 1


def test_the_executor_runs_exactly_the_single_engine_policies():
    assert names(backend=EXEC) == names(family=ENGINE)
    with pytest.raises(ValueError, match="policy 'flexgen' runs in the simulator only"):
        entry("flexgen", EXEC)


def test_both_backends_are_backends():
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))
    assert isinstance(Timeline(cm), Backend) and isinstance(LayerEvents(cm), Backend)
    assert isinstance(TokenServer(None, [], 0.0), Backend)


def test_prompt_offload_keeps_full_prompt_blocks_on_the_cpu_and_written_blocks_on_the_gpu():
    config = EngineConfig(num_layers=2, block_bytes_layer=64, num_gpu_blocks=40, num_cpu_blocks=40, block_size=4,
                          max_model_len=64, max_num_batched_tokens=64, watermark=0.0)
    policy = Policy("prompt-offload", config)
    policy.add_request(0, 0.0, 10, 6)   # 2 full prompt blocks and a tail
    plan = policy.next_iteration()
    assert [b.tier for b in plan.seqs[0].blocks] == [CPU, CPU, GPU]
    assert plan.layers and all(step.wait for step in plan.layers)  # every layer awaits its prefetch
    policy.observe(plan, _done(plan))
    while (plan := policy.next_iteration()) is not None:
        assert all(b.tier == GPU for b in plan.seqs[0].blocks[2:]), "a decode block went to the CPU"
        policy.observe(plan, _done(plan))


def _done(plan):
    from pie_policy.plan import IterationStats
    return IterationStats.of(plan, 0.0, 1.0, 1.0, 0.0)


def test_prompt_offload_runs_in_the_simulator():
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))
    workload = pd.DataFrame({"request_id": range(30), "arrival_s": [0.05 * i for i in range(30)],
                             "prompt_tokens": [300] * 30, "output_tokens": [40] * 30})
    result = simulate(built("prompt-offload"), cm, workload)
    its = result.recorder.iterations
    assert all(r.state is State.FINISHED for r in result.requests)
    assert its["cpu_kv_bytes"].max() > 0 and its["bytes_h2d"].sum() > 0
    # a prompt block is written back once, by its prefill; a decode writes only GPU blocks
    assert its["bytes_d2h"].sum() > 0 and not its["bytes_d2h"][its["prefill_tokens"] == 0].any()


def test_prompt_offload_runs_in_the_executor():
    """Tokens equal to transformers' are checked in test_exec_engine; here the executor serves it as
    `pie-exec` builds it (pools sized by sizing.engine_config)."""
    from pie_exec.run import Prompt, run
    from pie_exec.weights import random_transformer
    from pie_policy.sizing import engine_config, make_policy

    spec = load_model(DATA / "tiny-opt.toml")
    config = engine_config(spec, "prompt-offload", 64 * 1024, cpu_mem_bytes=64 * 1024, block_size=4)
    policy = make_policy("prompt-offload", config)
    model = random_transformer(spec, seed=0).eval()
    prompts = [Prompt(i, 0.0, tuple(range(1, 20 + i)), 5) for i in range(4)]
    executor = Executor(model, config, torch.device("cpu"), policy.staging_slots)
    try:
        requests, generated, recorder, _ = run(executor, policy, prompts, progress=False)
    finally:
        executor.close()
    assert all(len(generated[i]) == 5 for i in range(4))
    assert recorder.iterations["cpu_kv_bytes"].max() > 0
