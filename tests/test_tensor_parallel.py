"""Tensor parallelism: the one-engine view of tp GPUs by hand, the refusals, and tp = 1 being the run
without tensor parallelism, bit for bit."""
import math

import numpy as np
import pytest

from hwmodels import BatchShape, CostModel, load_hardware, load_model
from hwmodels.tensor_parallel import TensorParallelError, tp_view
from pie_policy.sizing import build_policy
from pie_sim.cli import main
from pie_sim.scenario import Scenario, simulate_scenario, workload_of
from pie_sim.simulate import simulate

from .conftest import DATA

# tests/data/tiny-hw.toml as a 2-GPU server with round all-reduce figures.
TWO = {"num_gpus = 1": "num_gpus = 2\nall_reduce_gb_s = 10\nall_reduce_latency_us = 5"}


@pytest.fixture
def pair(write):
    text = (DATA / "tiny-hw.toml").read_text()
    for old, new in TWO.items():
        text = text.replace(old, new)
    return load_hardware(write("pair.toml", text))


def test_each_gpu_computes_half_a_layer_and_two_all_reduces(pair):
    m = load_model(DATA / "tiny-opt.toml")
    one, two = CostModel(pair, m), CostModel(pair, m, tp=2)
    batch = BatchShape.of(decodes=[10] * 3)
    # one GPU's half: the GEMMs' weights and activations, attention's KV, all halved (memory bound here)
    gemm = (99968 + 3 * 2048) / 2 / 50e9
    attention = 3 * 3328 / 2 / 50e9
    all_reduce = 5e-6 + 2 * (2 - 1) / 2 * 3 * 64 * 2 / 10e9  # 3 tokens' hidden states, 2-GPU ring
    assert two.all_reduce_time(3) == pytest.approx(all_reduce, rel=1e-12)
    assert two.layer_time(batch) == pytest.approx(gemm + attention + 10e-6 + 2 * all_reduce, rel=1e-12)
    assert one.all_reduce_time(3) == 0.0
    head = max(2 * 1000 * 64 * 3 / 2 / 0.5e12, (1000 * 64 + 3 * (64 + 1000)) * 2 / 2 / 50e9)
    assert two.head_time(batch) == pytest.approx(head, rel=1e-12)


def test_the_engine_holds_the_gpus_memory_and_moves_kv_over_every_gpus_link(pair):
    m = load_model(DATA / "tiny-opt.toml")
    two = CostModel(pair, m, tp=2)
    assert two.hw.gpu.hbm_bytes == 2 * 2**30 and two.hw.server.num_gpus == 1 and two.hw.name == "pair-tp2"
    # each GPU copies its half of the bytes at the same time: latency once, bandwidth twice (host: 20 GB/s)
    assert two.transfer_time(1_000_000, calls=3) == pytest.approx(3 * 5e-6 + 1e6 / 20e9)
    assert two.transfer_time(1_000_000, calls=3, direction="d2h") == pytest.approx(3 * 5e-6 + 1e6 / 10e9)
    budget = two.memory_budget(gpu_mem_util=0.5)
    per_gpu = budget.per_gpu()
    assert budget.gpus == 2 and per_gpu.usable_bytes == 2**30 // 2
    assert per_gpu.weight_bytes == math.ceil(m.weight_bytes / 2)
    assert per_gpu.activation_bytes == m.activation_bytes(2048, 256)
    assert per_gpu.kv_pool_bytes == 2**29 - math.ceil(m.weight_bytes / 2) - m.activation_bytes(2048, 256)


def test_gpus_sharing_a_pcie_uplink_get_their_share_of_it():
    a100 = load_hardware("a100-80g-sxm-8x-nvlink")  # two GPUs per switch, 25 GB/s uplinks, 400 GB/s host
    assert tp_view(a100, 1) is a100
    assert tp_view(a100, 2).link.h2d_bandwidth == pytest.approx(25e9)        # one switch: 2 x 25/2
    assert tp_view(a100, 8).link.h2d_bandwidth == pytest.approx(100e9)       # four switches
    h100 = load_hardware("h100-sxm-8x-nvlink")  # a link of its own per GPU
    assert tp_view(h100, 8).link.h2d_bandwidth == pytest.approx(8 * 53e9)
    assert tp_view(h100, 8).link.transfer_latency == h100.link.transfer_latency


def test_llama70b_on_8_h100s_memory_per_gpu():
    cm = CostModel(load_hardware("h100-sxm-8x-nvlink"), load_model("llama-2-70b"), tp=8)
    per_gpu = cm.memory_budget().per_gpu()
    assert per_gpu.usable_bytes == int(80 * 2**30 * 0.9)
    assert per_gpu.weight_bytes == math.ceil(load_model("llama-2-70b").weight_bytes / 8)   # 16.1 GiB
    assert per_gpu.kv_pool_bytes > 50 * 2**30


@pytest.mark.parametrize("hw, model, tp, message", [
    ("h100-sxm-8x-nvlink", "llama-2-70b", 3, "64 attention heads and 8 KV heads must both split evenly"),
    ("h100-sxm-8x-nvlink", "llama-2-7b", 16, "h100-sxm-8x-nvlink has 8 GPUs"),
    ("gh200-96g", "opt-13b", 2, "gh200-96g has 1 GPU"),
    ("h100-sxm-8x-nvlink", "opt-13b", 0, "the degree must be at least 1"),
])
def test_degrees_the_model_or_server_cannot_take_are_refused(hw, model, tp, message):
    with pytest.raises(TensorParallelError, match=message):
        CostModel(load_hardware(hw), load_model(model), tp)


def test_a_server_without_all_reduce_figures_or_a_calibrated_fit_refuses(write):
    text = (DATA / "tiny-hw.toml").read_text().replace("num_gpus = 1", "num_gpus = 2")
    with pytest.raises(TensorParallelError, match="no all-reduce figures"):
        CostModel(load_hardware(write("nolink.toml", text)), load_model(DATA / "tiny-opt.toml"), 2)
    fit = (DATA / "tiny-fit.toml").read_text().replace('model = "tiny-opt"', 'model = "tiny-opt"')
    hw = load_hardware(write("fit.toml", text.replace("num_gpus = 2", "num_gpus = 2\nall_reduce_gb_s = 1") + fit))
    with pytest.raises(TensorParallelError, match=r"\[fit\] was calibrated on one device"):
        CostModel(hw, load_model(DATA / "tiny-opt.toml"), 2)


def test_the_command_line_refuses_bad_degrees(tmp_path, capsys):
    base = ["run", "--hw", "h100-sxm-8x-nvlink", "--model", "llama-2-70b", "--num-requests", "5", "--out", str(tmp_path)]
    assert main(base + ["--tp", "3"]) == 2
    assert "tensor parallelism over 3 GPUs" in capsys.readouterr().out
    assert main(base + ["--tp", "2", "--policy", "pp-vllm"]) == 2
    assert "tensor parallelism within its stages is not modelled" in capsys.readouterr().out


@pytest.mark.parametrize("policy", ["pie", pytest.param("flexgen", marks=pytest.mark.slow)])
def test_tp_1_is_the_run_without_tensor_parallelism_bit_for_bit(policy):
    """A scenario at tp = 1 against the same run built as before tensor parallelism existed (CostModel
    without a degree, the policy sized on it): the same iterations and requests, on a load that copies KV."""
    scenario = Scenario(hw="h100-sxm-pcie5", model="opt-13b", num_requests=30, rate=15.0, gpu_mem_util=0.322,
                        policy=policy, tp=1)
    _, with_tp = simulate_scenario(scenario)
    cm = CostModel(load_hardware("h100-sxm-pcie5"), load_model("opt-13b"))
    workload = workload_of(scenario)
    built = build_policy(policy, cm, gpu_mem_util=0.322, cpu_mem_bytes=240 * 2**30,
                         mean_prompt=int(workload.prompt_tokens.mean()), mean_output=int(workload.output_tokens.mean()))
    without = simulate(built, cm, workload)
    assert with_tp.recorder.iterations["bytes_h2d"].sum() > 0
    for name, column in without.recorder.iterations.items():
        assert np.array_equal(column, with_tp.recorder.iterations[name]), name
    assert [(r.first_token_s, r.finish_s) for r in without.requests] == \
        [(r.first_token_s, r.finish_s) for r in with_tp.requests]
