"""FlexGen in the simulator: a disk-bound block against the cost model's closed form worked by hand, the
recurrence against the SimPy per-layer model with a disk in the plans, and the disk taken when memory
runs out."""
import random
import re

import pandas as pd
import pytest

from hwmodels import BatchShape, CostModel, load_hardware, load_model
from pie_policy import Plan, State
from pie_policy.flexgen import FlexGenPolicy
from pie_policy.flexgen_lp import evaluate
from pie_policy.plan import DISK_READ, WEIGHTS, Copy
from pie_policy.sizing import build_policy
from pie_sim.layer_events import LayerEvents
from pie_sim.simulate import simulate
from pie_sim.timeline import Timeline

from .conftest import DATA

CM = CostModel(load_hardware(DATA / "tiny-disk-hw.toml"), load_model(DATA / "tiny4-opt.toml"))
W = 99968                        # one layer's weights, bytes (tests/test_flexgen_lp.py)
DISK_READ_RATE, H2D_RATE = 0.5e9, 1e9  # tests/data/tiny-disk-hw.toml


def run_offline(cm, placement, requests, backend):
    """Every iteration of `requests` ((prompt, output) pairs, all arriving at 0): (plan, stats) each."""
    policy = FlexGenPolicy(cm, placement)
    for i, (prompt, output) in enumerate(requests):
        policy.add_request(i, 0.0, prompt, output)
    now, steps = 0.0, []
    while policy.has_work:
        plan = policy.next_iteration()
        stats = backend.run(plan, now)
        policy.observe(plan, stats)
        steps.append((plan, stats))
        now = stats.end_s
    return steps


def test_a_disk_bound_block_runs_at_the_cost_models_layer_time(write):
    """Weights all on disk, KV cache and activations in HBM; a block of 2 GPU batches of 2 sequences of
    32 + 8 tokens, with 60 µs of overhead per layer and batch. Per layer the disk reads W = 99,968 B at
    0.5 GB/s in 199.936 µs, the link copies them on at 1 GB/s in 99.968 µs and compute takes 125-148 µs:
    the disk bounds every layer, but only with its reads two layers ahead (one ahead, a layer would wait
    for the link and compute one after the other: 225 µs and more)."""
    slow_gpu = (DATA / "tiny-disk-hw.toml").read_text().replace("layer_overhead_us = 10", "layer_overhead_us = 60")
    cm = CostModel(load_hardware(write("tiny-disk-slow-gpu.toml", slow_gpu)), CM.model)
    dr, h = W / DISK_READ_RATE, W / H2D_RATE
    placement = evaluate(cm, 32, 8, 2, 2, wg=0, cg=1, hg=1, wd=1, gpu_mem_util=1)
    assert (placement.decode_bound, placement.decode_layer_time) == ("disk-read", pytest.approx(199.936e-6, rel=1e-12))
    assert placement.prefill_layer_time == pytest.approx(199.936e-6, rel=1e-12)
    steps = run_offline(cm, placement, [(32, 8)] * 4, Timeline(cm))
    assert [(len(plan.seqs), len(plan.gpu_batches)) for plan, _ in steps] == [(4, 2)] * 8
    for plan, stats in steps:
        computes = [cm.layer_time(batch) for batch in plan.gpu_batches]
        assert sum(computes) < dr < h + sum(computes)
        # Once the first layer's read and copy are in (the fill), the layers start one disk read apart:
        # the LP's layer time.
        assert stats.layer_stall_s[0] == pytest.approx(dr + h, rel=1e-9)
        for before, stall in zip(stats.layer_compute_s, stats.layer_stall_s[1:]):
            assert before + stall == pytest.approx(placement.decode_layer_time, rel=1e-9)
        # A step: 4 disk reads, the last layer's copy to the GPU, its compute (the drain) and the LM head,
        # each GPU batch in turn. The simulated time per token is this over the block's 4 sequences.
        drain = sum(computes) + sum(cm.head_time(batch) for batch in plan.gpu_batches)
        assert stats.end_s - stats.start_s == pytest.approx(4 * placement.decode_layer_time + h + drain, rel=1e-9)


def layer_starts(stats):
    """When each layer of an iteration started computing."""
    starts, t = [], stats.start_s
    for stall, compute in zip(stats.layer_stall_s, stats.layer_compute_s):
        starts.append(t + stall)
        t += stall + compute
    return starts


def test_a_prefill_writing_its_cache_to_disk_runs_at_the_disk_write_bound(write):
    """Weights and activations in HBM (of 2 MiB), the KV cache all on disk; 8 layers, 4 sequences of 32
    tokens. Each
    layer writes 4 x 32 x 256 = 32,768 B of KV at 0.25 GB/s in 131.072 µs (via CPU memory: 65.536 µs at
    0.5 GB/s) and computes in ~47 µs. The writes wait in CPU memory's double buffer, so a layer starts once
    the writes of the layer two before are done: from then on the layers start one disk write apart."""
    model = (DATA / "tiny4-opt.toml").read_text().replace("num_layers = 4", "num_layers = 8")
    hw = (DATA / "tiny-disk-hw.toml").read_text().replace("hbm_gib = 0.0009765625", "hbm_gib = 0.001953125")
    cm = CostModel(load_hardware(write("tiny-disk-2mib.toml", hw)), load_model(write("tiny8-opt.toml", model)))
    placement = evaluate(cm, 32, 8, 2, 2, wg=1, cg=0, hg=1, cd=1, gpu_mem_util=1)
    assert placement.prefill_layer_time == pytest.approx(32768 / 0.25e9, rel=1e-12)  # the disk-write bound
    (prefill, stats), *_ = run_offline(cm, placement, [(32, 8)] * 4, Timeline(cm))
    assert prefill.shape.prefill_tokens == 128
    starts = layer_starts(stats)
    assert starts[2] - starts[1] > placement.prefill_layer_time > stats.layer_compute_s[0]
    for before, start in zip(starts[2:], starts[3:]):
        assert start - before == pytest.approx(placement.prefill_layer_time, rel=1e-9)


@pytest.mark.parametrize("hw, links", [("tiny", "FluidLinks"), ("gh200-96g", "FixedRateLinks")])
def test_recurrence_and_simpy_agree_on_flexgen_plans_with_a_disk(write, hw, links):
    """Every kind partly in HBM, CPU memory and on disk: reads, copies both ways and writes all overlap. (With
    a latency per copy: at zero latency a copy that starts as a layer starts is a tie the two break apart.)"""
    if hw == "tiny":
        cm = CostModel(load_hardware(write("tiny-disk-1us.toml", (DATA / "tiny-disk-hw.toml").read_text().replace(
            "transfer_latency_us = 0", "transfer_latency_us = 1"))), CM.model)
    else:
        cm = CostModel(load_hardware(hw), load_model("opt-125m"))
    assert type(Timeline(cm).links).__name__ == links
    placement = evaluate(cm, 24, 6, 2, 2, wg=0.5, cg=0.25, hg=0.5, wd=0.25, cd=0.5, hd=0.25, gpu_mem_util=1)
    rng = random.Random(5)
    requests = [(rng.randint(5, 40), rng.randint(2, 10)) for _ in range(9)]
    a, b = (run_offline(cm, placement, requests, backend) for backend in (Timeline(cm), LayerEvents(cm)))
    assert len(a) == len(b) and any(c.direction == DISK_READ for plan, _ in a for c in plan.copies())
    for (_, x), (_, y) in zip(a, b):
        assert (x.bytes_h2d, x.bytes_d2h) == (y.bytes_h2d, y.bytes_d2h)
        assert x.end_s == pytest.approx(y.end_s, rel=1e-9, abs=1e-12)
        assert x.stall_s == pytest.approx(y.stall_s, rel=1e-6, abs=1e-12)


def test_a_disk_copy_on_hardware_without_a_disk_is_refused():
    cm = CostModel(load_hardware(DATA / "tiny-hw.toml"), load_model(DATA / "tiny-opt.toml"))
    plan = Plan(0, (), BatchShape.of(decodes=[10]), prologue=(Copy(0, DISK_READ, WEIGHTS, 0, (), 100, 1),))
    for backend in (Timeline(cm), LayerEvents(cm)):
        with pytest.raises(ValueError, match=r"copy 0 moves weights by disk-read, but tiny-hw has no \[disk\] section"):
            backend.run(plan, 0.0)


def test_flexgen_takes_the_disk_when_gpu_and_cpu_memory_run_out(write):
    """0.45 of the 1 MiB GPU and 200,000 B of CPU memory cannot hold tiny4-opt's 544,768 B of weights with a
    block's KV; the disk can, and the whole workload is served."""
    sizes = dict(gpu_mem_util=0.45, cpu_mem_bytes=200_000, mean_prompt=32, mean_output=8)
    policy = build_policy("flexgen", CM, **sizes)
    assert policy.placement.wd > 0 and policy.placement.disk_bytes > 0
    workload = pd.DataFrame(dict(request_id=range(6), arrival_s=0.0, prompt_tokens=32, output_tokens=8))
    result = simulate(policy, CM, workload)
    assert all(r.state is State.FINISHED and r.generated == 8 for r in result.requests)
    no_disk = re.sub(r"\[disk\].*?\n\n", "", (DATA / "tiny-disk-hw.toml").read_text(), flags=re.S)
    cm = CostModel(load_hardware(write("no-disk.toml", no_disk)), CM.model)
    with pytest.raises(ValueError, match="GPU \\+ CPU memory is the binding constraint"):
        build_policy("flexgen", cm, **sizes)
