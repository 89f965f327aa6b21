"""The simulator's iteration timeline against closed forms worked by hand, and against the independent
SimPy per-layer model on plans from the real policies."""
import random

import pytest

from hwmodels import BatchShape, CostModel, load_hardware, load_model
from pie_policy import LayerStep, Plan
from pie_policy.plan import D2H, H2D, LAYER_KV, Copy
from pie_policy.sizing import build_policy
from pie_sim.layer_events import LayerEvents
from pie_sim.timeline import Timeline

from .conftest import DATA

TINY = CostModel(load_hardware(DATA / "tiny-hw.toml"), load_model(DATA / "tiny-opt.toml"))
SHAPE = BatchShape.of(decodes=[10])
C = TINY.layer_time(SHAPE)             # 12.10688 µs per layer (tests/test_costmodel.py)
HEAD = TINY.head_time(SHAPE)
LATENCY, H2D_RATE, D2H_RATE, CAP = 5e-6, 10e9, 5e9, 12e9  # tests/data/tiny-hw.toml


def h2d(op, layer, nbytes, after=()):
    return Copy(op, H2D, LAYER_KV, layer, (), nbytes, 1, after)


@pytest.fixture(params=[Timeline, LayerEvents], ids=["recurrence", "simpy"])
def sim(request):
    return request.param(TINY)


def test_one_request_alone_is_the_sum_of_its_layer_times(sim):
    stats = sim.run(Plan(0, (), SHAPE), start=2.0)
    assert stats.end_s - stats.start_s == pytest.approx(2 * C + HEAD, rel=1e-12)
    assert stats.stall_s == 0 and stats.bytes_h2d == stats.bytes_d2h == 0


@pytest.mark.parametrize("nbytes", [50_000, 200_000])
def test_prefetch_hidden_under_compute_adds_no_stall_and_an_exposed_one_adds_the_deficit(sim, nbytes):
    """Layer 1's prefetch is issued when layer 0 is reached and awaited before layer 1: it takes
    5 µs + nbytes / 10 GB/s. Under compute (50 kB: 10 µs < 12.1 µs) no stall; over it (200 kB: 25 µs) the
    GPU waits exactly the deficit. Contention: layer 0 computes against 50 GB/s of HBM less 0.5 times the
    bytes/s the copy moves during its 12.1 µs alone (all 50 kB; 200 kB moves through the last 7.1 µs)."""
    plan = Plan(0, (), SHAPE, layers=(LayerStep(issue=(h2d(0, 1, nbytes),)), LayerStep(wait=(0,))))
    stats = sim.run(plan, start=0.0)
    transfer = LATENCY + nbytes / H2D_RATE
    layer0 = TINY.layer_time(SHAPE, copy_bandwidth=min(nbytes, H2D_RATE * (C - LATENCY)) / C)
    assert layer0 > C
    assert stats.layer_compute_s[0] == pytest.approx(layer0, rel=1e-12)
    assert stats.layer_stall_s == pytest.approx((0.0, max(0.0, transfer - layer0)), abs=1e-15)
    assert stats.bytes_h2d == nbytes and stats.bytes_d2h == 0


def test_both_directions_share_the_bidirectional_cap(sim):
    """A 120 kB prefetch and a 120 kB write-back at once: each runs at its bandwidth · 12 / 15 (8 and 4 GB/s)
    until the prefetch ends at 5 µs + 15 µs; the write-back has then moved 60 kB and finishes the other
    60 kB alone at 5 GB/s: 12 µs more."""
    out = Copy(1, D2H, LAYER_KV, 0, (), 120_000, 1)
    plan = Plan(0, (), SHAPE, prologue=(h2d(0, 0, 120_000), out),
                layers=(LayerStep(wait=(0, 1)), LayerStep()))
    stats = sim.run(plan, start=0.0)
    assert stats.layer_stall_s[0] == pytest.approx(LATENCY + 15e-6 + 12e-6, rel=1e-9)


def test_copies_of_one_direction_queue_in_issue_order(sim):
    first, second = h2d(0, 0, 100_000), h2d(1, 1, 100_000)
    plan = Plan(0, (), SHAPE, prologue=(first, second), layers=(LayerStep(wait=(1,)), LayerStep()))
    stats = sim.run(plan, start=0.0)
    assert stats.layer_stall_s[0] == pytest.approx(2 * (LATENCY + 10e-6), rel=1e-9)


@pytest.mark.parametrize("backend", [Timeline, LayerEvents], ids=["recurrence", "simpy"])
def test_issuing_a_copy_takes_the_profiles_host_time_before_the_copy_starts(backend, write):
    """tiny-fit.toml: issuing costs 30 µs + 2 µs a call. The prologue's 3-call prefetch leaves the host at
    36 µs, then takes 3 · 5 µs + 100 kB / 10 GB/s while layer 0 waits for it; layer 0's write-back costs
    32 µs to issue before layer 1, and moves its 1 kB while layer 1 computes (0.1 slower per GB/s)."""
    cm = CostModel(load_hardware(write("hw.toml", (DATA / "tiny-hw.toml").read_text()
                                       + (DATA / "tiny-fit.toml").read_text())), load_model(DATA / "tiny-opt.toml"))
    prefetch = Copy(0, H2D, LAYER_KV, 0, (), 100_000, 3)
    plan = Plan(0, (), SHAPE, prologue=(prefetch,),
                layers=(LayerStep(wait=(0,), evict=(Copy(1, D2H, LAYER_KV, 0, (), 1000, 1),)), LayerStep()))
    stats = backend(cm).run(plan, start=1.0)
    stall, layer = 3 * LATENCY + 100_000 / H2D_RATE, cm.layer_time(SHAPE)
    layer1 = layer * (1 + 0.1 * 1000 / layer / 1e9)
    assert stats.layer_stall_s == pytest.approx((stall, 0.0), abs=1e-15)
    assert stats.layer_compute_s == pytest.approx((layer, layer1), rel=1e-12)
    assert stats.end_s - 1.0 == pytest.approx(36e-6 + stall + layer + 32e-6 + layer1 + cm.head_time(SHAPE), rel=1e-12)
    assert stats.compute_s == pytest.approx(stats.end_s - 1.0 - stall, rel=1e-12)


@pytest.mark.parametrize("hw, links", [("h100-sxm-pcie5", "FluidLinks"), ("gh200-96g", "FixedRateLinks")])
def test_recurrence_and_simpy_agree_on_real_plans(hw, links):
    """pie, static and vllm-swap under pressure, on a PCIe host (the bidirectional cap binds: fluid links)
    and on GH200 (it does not: closed-form links): every iteration's times, stalls and bytes agree with
    the SimPy per-layer model."""
    cm = CostModel(load_hardware(hw), load_model("opt-1.3b"))
    assert type(Timeline(cm).links).__name__ == links
    rng = random.Random(3)
    for name in ("pie", "vllm-swap", "static"):
        policies = [build_policy(name, cm, cpu_mem_bytes=8 * 1024**3, gpu_mem_util=0.05, share=0.5,
                                 max_num_batched_tokens=2048, max_num_seqs=64) for _ in range(2)]
        sims = [Timeline(cm), LayerEvents(cm)]
        requests = [(rng.randint(20, 600), rng.randint(10, 300)) for _ in range(60)]
        results = []
        for policy, sim in zip(policies, sims):
            for i, (prompt, output) in enumerate(requests):
                policy.add_request(i, 0.0, prompt, output)
            now, stats_seen, ops = 0.0, [], 0
            while policy.has_work:
                plan = policy.next_iteration()
                stats = sim.run(plan, now)
                policy.observe(plan, stats)
                stats_seen.append(stats)
                ops += sum(1 for _ in plan.copies())
                now = stats.end_s
            results.append((stats_seen, ops))
        (a, ops_a), (b, ops_b) = results
        assert ops_a == ops_b > 0, f"{name}: the plans must move data for this test to mean anything"
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert (x.bytes_h2d, x.bytes_d2h) == (y.bytes_h2d, y.bytes_d2h)
            assert x.end_s == pytest.approx(y.end_s, rel=1e-9, abs=1e-12), name
            assert x.stall_s == pytest.approx(y.stall_s, rel=1e-6, abs=1e-12), name
