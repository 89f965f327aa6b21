"""Property tests over random workloads, driven by a backend that executes every plan in 1 s."""
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hwmodels import CostModel, load_hardware, load_model
from pie_policy import POLICIES, EngineConfig, ExpansionController, Policy, State
from pie_policy.blocks import CPU
from pie_policy.plan import IterationStats
from pie_serving import Serving
from pie_serving import drive as run_loop

MAX_ITERATIONS = 20_000
PRICES = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))  # what pie's controller prices batches on


def check_accounting(policy: Policy, plan, copies: dict) -> None:
    """Block accounting after every step; for a plan, its limits and that its layers' CPU blocks are
    staged. `copies` collects every copy seen, by id (a layer may wait on the previous plan's prefetch)."""
    c, tables = policy.config, policy.tables
    owned = [block for table in tables.tables.values() for block in table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    for seq, table in tables.tables.items():
        on_cpu = sum(b.tier == CPU for b in table)
        assert tables.count(seq, CPU) == on_cpu and (seq in tables.cpu_holders) == (on_cpu > 0)
    for tier, pool in tables.pools.items():
        mine = {b.slot for b in owned if b.tier == tier}
        assert mine == pool._used, f"{tier}: tables and allocator disagree"
        assert pool.num_free + pool.num_used == pool.capacity
    if plan is not None:
        assert len(plan.seqs) <= c.max_num_seqs
        assert sum(s.new_tokens for s in plan.seqs) <= c.max_num_batched_tokens
        assert len({s.request_id for s in plan.seqs}) == len(plan.seqs)
        for s in plan.seqs:
            assert len(s.blocks) == c.blocks_for(s.cached_tokens + s.new_tokens)
        cpu_in_batch = {b.slot for s in plan.seqs for b in s.blocks if b.tier == CPU}
        if not policy.swapper:
            assert not cpu_in_batch, "a GPU-only policy computes on a CPU block"
        elif cpu_in_batch:  # every layer awaits prefetches (this plan's or the last one's) of all its CPU blocks
            copies.update((c.op_id, c) for c in plan.copies())
            for layer in range(c.num_layers):
                awaited = [copies[op] for op in plan.step(layer).wait]
                staged = {src for copy in awaited for src, _ in copy.pairs}
                assert cpu_in_batch <= staged and all(copy.layer == layer for copy in awaited)
                assert {copy.staging for copy in awaited} == {plan.staging_slots[layer]}
            assert max(cpu_in_batch) < policy.swapper.capacity


class OneSecond:
    """A backend that executes every plan in 1 s, checking the policy's accounting as each plan comes."""

    def __init__(self, policy: Policy):
        self.policy, self.now, self.iterations, self.copies = policy, 0.0, 0, {}

    def run(self, plan, start_s: float) -> IterationStats:
        check_accounting(self.policy, plan, self.copies)
        self.iterations += 1
        assert self.iterations < MAX_ITERATIONS, "no progress"
        self.now = start_s + 1.0
        return IterationStats.of(plan, start_s, self.now, 1.0, 0.0)

    def wait_until(self, t: float) -> None:
        self.now = t


class CheckedServing(Serving):
    """The serving loop's run, checking after every executed plan that blocks add up, that the requests
    it finished finished then, and that no request ever loses a generated token."""

    def __init__(self, policy: Policy, workload: list[tuple[float, int, int]], backend: OneSecond):
        super().__init__(policy, [(i, *request) for i, request in enumerate(workload)])
        self.backend, self.history, self.cpu_used = backend, {}, False

    def observe(self, plan, stats):
        finished = super().observe(plan, stats)
        check_accounting(self.policy, None, self.backend.copies)
        self.cpu_used = self.cpu_used or self.policy.tables.pools[CPU].num_used > 0
        for r in finished:
            assert r.state is State.FINISHED and r.finish_s == self.backend.now
        for r in self.requests:  # generated tokens are never lost, not even by a preemption
            assert r.generated >= self.history.get(r.request_id, 0)
            self.history[r.request_id] = r.generated
        return finished


def drive(policy: Policy, workload: list[tuple[float, int, int]]):
    """Serve the workload (arrival times in the order given); returns the requests and whether the CPU
    held blocks. The loop itself refuses work left with nothing able to run."""
    backend = OneSecond(policy)
    serving = CheckedServing(policy, workload, backend)
    requests = run_loop(serving, backend, lambda: backend.now, backend.wait_until)
    return requests, serving.cpu_used


workloads = st.lists(st.tuples(st.floats(0, 10), st.integers(1, 120), st.integers(1, 100)), min_size=1, max_size=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads, name=st.sampled_from(POLICIES),
       block_size=st.sampled_from([4, 8, 16]), gpu_blocks=st.integers(8, 60), cpu_blocks=st.integers(1, 80),
       chunked=st.booleans(), share=st.floats(0.0, 0.8), max_seqs=st.integers(1, 12))
def test_every_admitted_request_finishes_with_exactly_its_tokens(workload, name, block_size, gpu_blocks,
                                                                 cpu_blocks, chunked, share, max_seqs):
    workload = sorted(workload)
    config = EngineConfig(num_layers=3, block_bytes_layer=64, num_gpu_blocks=gpu_blocks, num_cpu_blocks=cpu_blocks,
                          block_size=block_size, max_num_seqs=max_seqs, max_model_len=256,
                          max_num_batched_tokens=64 if chunked else 256, chunked_prefill=chunked)
    policy = Policy(name, config, cpu_share=share if name in ("static", "pie-fixed") else 0.0,
                    controller=ExpansionController(share=min(share, 0.5)) if name == "pie" else None,
                    cost_model=PRICES)
    requests, cpu_used = drive(policy, workload)
    event(f"{name}: {'preempted' if any(r.preemptions for r in requests) else 'no preemption'}")
    event(f"{name}: CPU {'used' if cpu_used else 'unused'}")
    assert len(requests) == len(workload)
    for r in requests:
        if r.state is State.REJECTED:
            assert r.reason and r.generated == 0
        else:
            assert r.state is State.FINISHED and r.generated == r.output_tokens
            assert r.arrival_s <= r.first_token_s <= r.finish_s
    assert all(pool.num_used == 0 for pool in policy.tables.pools.values())


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("chunked", [False, True])
def test_under_memory_pressure_every_policy_preempts_and_still_finishes_everything(name, chunked):
    rng = random.Random(7)
    workload = sorted((rng.uniform(0, 20), rng.randint(1, 200), rng.randint(1, 120)) for _ in range(60))
    config = EngineConfig(num_layers=3, block_bytes_layer=64, num_gpu_blocks=48, num_cpu_blocks=64,
                          max_num_seqs=16, max_model_len=512, chunked_prefill=chunked,
                          max_num_batched_tokens=128 if chunked else 512)
    policy = Policy(name, config, cpu_share=0.3 if name in ("static", "pie-fixed") else 0.0, cost_model=PRICES,
                    controller=ExpansionController(share=0.3) if name == "pie" else None)
    requests, cpu_used = drive(policy, workload)
    assert all(r.state is State.FINISHED and r.generated == r.output_tokens for r in requests)
    assert any(r.preemptions for r in requests)
    assert cpu_used == (name != "vllm")


def test_preempted_requests_resume_with_their_generated_tokens():
    """Two long requests on a pool that holds one of them at its longest: one is preempted by recompute
    and re-prefills prompt + generated tokens, then finishes."""
    config = EngineConfig(num_layers=2, block_bytes_layer=64, num_gpu_blocks=10, block_size=4,
                          max_model_len=64, max_num_batched_tokens=64, watermark=0.0)
    policy = Policy("vllm", config)
    requests, _ = drive(policy, [(0.0, 8, 30), (0.0, 8, 30)])
    victim = max(requests, key=lambda r: r.preemptions)
    assert victim.preemptions >= 1 and all(r.generated == 30 for r in requests)
    # the largest prefill planned for the victim re-computed its prompt plus what it had generated
    assert victim.finish_s > min(r.finish_s for r in requests)


def test_swap_preemption_moves_blocks_and_stalls_the_next_iteration():
    config = EngineConfig(num_layers=2, block_bytes_layer=64, num_gpu_blocks=10, num_cpu_blocks=20, block_size=4,
                          max_model_len=64, max_num_batched_tokens=64, watermark=0.0)
    policy = Policy("vllm-swap", config)
    swaps = []
    original_next = policy.next_iteration

    def recording_next():
        plan = original_next()
        if plan is not None and plan.prologue:
            swaps.append(plan)
        return plan
    policy.next_iteration = recording_next
    requests, _ = drive(policy, [(0.0, 8, 30), (0.0, 8, 30)])
    assert all(r.generated == 30 for r in requests)
    assert any(r.state is State.FINISHED and r.preemptions for r in requests)
    directions = {c.direction for plan in swaps for c in plan.prologue}
    assert directions == {"d2h", "h2d"}, "blocks went out and came back"
    for plan in swaps:  # layer 0 waits for the whole-block copies
        assert {c.op_id for c in plan.prologue} <= set(plan.step(0).wait)
        for c in plan.prologue:
            assert c.nbytes == len(c.pairs) * config.block_bytes and c.calls == len(c.pairs) * config.num_layers
