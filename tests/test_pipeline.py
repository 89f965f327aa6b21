"""Pipeline parallelism (pp-vllm, pipemax): the layout, the simulated pipeline against closed forms and
against the single-GPU simulator, and PipeMax's budget, greedy choice and memory bounds over whole runs."""
import itertools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from hwmodels import BatchShape, CapacityError, CostModel, GiB, load_hardware, load_model
from hwmodels.hardware import HARDWARE_DIR
from pie_policy import Request, State
from pie_policy.blocks import CPU
from pie_policy.pipeline_layout import split_layers, stage_layout, stage_time, stage_weight_bytes
from pie_policy.pipemax import SLOTS, copy_bandwidth_share
from pie_policy.plan import D2H, H2D
from pie_policy.sizing import build_policy
from pie_sim.pipeline_sim import TOKEN_ID_BYTES, activation_bytes, simulate_pipeline
from pie_sim.simulate import simulate
from traces import load_workload

from .conftest import DATA


@pytest.mark.parametrize("layers, stages", [(10, 4), (64, 8), (80, 8), (6, 6), (7, 3)])
def test_layers_split_in_contiguous_slices_as_vllm_does(layers, stages):
    split = split_layers(layers, stages)
    assert sum(split) == layers and max(split) - min(split) <= 1
    assert split[-1] == layers // stages  # the remainder goes to the stages just before the last
    extra = [s for s, n in enumerate(split) if n > layers // stages]
    assert extra == list(range(stages - 1 - layers % stages, stages - 1))
    assert split_layers(10, 4) == (2, 3, 3, 2)


@pytest.mark.parametrize("name", ["opt-66b", "llama-2-70b", "opt-13b"])
def test_stage_weights_add_up_to_the_model_plus_a_second_head_when_tied(name):
    m = load_model(name)
    assert sum(stage_weight_bytes(m, (m.num_layers,))) == m.weight_bytes
    head = m.vocab_size * m.hidden_size * m.dtype_bytes if m.tied_embeddings else 0
    assert sum(stage_weight_bytes(m, split_layers(m.num_layers, 8))) == m.weight_bytes + head


def test_a_model_that_does_not_fit_one_gpu_is_refused_and_fits_eight():
    cm = CostModel(load_hardware("pcie-8x-l40s"), load_model("opt-66b"))
    with pytest.raises(CapacityError, match="stage 0 .*leaves no KV pool"):
        stage_layout(cm, 1, 0.9, 2048, 256, 16)
    layout = stage_layout(cm, 8, 0.9, 2048, 256, 16)
    usable = int(48 * GiB * 0.9) - cm.model.activation_bytes(2048, 256)
    assert layout.kv_pool_bytes == tuple(usable - w for w in layout.weight_bytes)


def _pipeline_hw(write, num_gpus: int):
    """tiny-hw as an N-GPU server where nothing contends: no HBM contention, both directions of a link at
    full speed, host memory far faster than the links."""
    text = (DATA / "tiny-hw.toml").read_text()
    for old, new in (("num_gpus = 1", f"num_gpus = {num_gpus}"), ("compute_contention = 0.5", "compute_contention = 0"),
                     ("bidirectional_gb_s = 12", "bidirectional_gb_s = 15"), ("bandwidth_gb_s = 20", "bandwidth_gb_s = 1000")):
        text = text.replace(old, new)
    return load_hardware(write("server.toml", text))


@pytest.mark.parametrize("stages, micro_batches", [(3, 3), (3, 5), (2, 4)])
def test_a_pipeline_of_equal_stages_takes_m_plus_n_minus_1_stage_times(write, stages, micro_batches):
    """M requests (one per micro-batch, a 32-token prompt, one output token) enter N stages of 2 layers at
    once. Stage s computes plan i from (i + s)(T + a)... : each stage takes T, each hop a = 5 µs + the
    activations at 5 GB/s, the last stage T + h (LM head), so plans queue there: plan i is back at
    (N - 1)(T + a) + (i + 1)(T + h) + r, r = the token ids' copy. Without hops, head and return:
    (M + N - 1) T for the last."""
    model_text = (DATA / "tiny-opt.toml").read_text().replace("num_layers = 2", f"num_layers = {2 * stages}")
    cm = CostModel(_pipeline_hw(write, stages), load_model(write("six.toml", model_text)))
    policy = build_policy("pp-vllm", cm, micro_batches=micro_batches)
    workload = pd.DataFrame({"request_id": range(micro_batches), "arrival_s": 0.0, "prompt_tokens": 32,
                             "output_tokens": 1})
    result = simulate_pipeline(policy, cm, workload)
    shape = BatchShape.of(prefills=[(32, 0)])
    T = stage_time(cm, policy.layout, 0, shape)
    h = stage_time(cm, policy.layout, stages - 1, shape) - T
    assert T == pytest.approx(2 * cm.layer_time(shape), rel=1e-12) and h == pytest.approx(cm.head_time(shape), rel=1e-12)
    a = 5e-6 + 32 * 64 * 2 / 5e9
    r = 5e-6 + TOKEN_ID_BYTES / 5e9
    assert a < T, "the closed form assumes hops shorter than a stage"
    finish = sorted(r_.finish_s for r_ in result.requests)
    expected = [(stages - 1) * (T + a) + (i + 1) * (T + h) + r for i in range(micro_batches)]
    assert finish == pytest.approx(expected, rel=1e-9)
    assert activation_bytes(cm, SimpleNamespace(shape=shape)) == 32 * 64 * 2  # tokens x hidden x 2 bytes


def test_one_stage_pp_vllm_is_the_single_gpu_vllm_run(write):
    """With one GPU and one micro-batch the pipeline is vLLM: the same engine, the same requests preempted
    and finished at the same times (the only extra is the token ids' 8-byte copy, ~0 at zero latency)."""
    text = (HARDWARE_DIR / "gh200-96g.toml").read_text()
    hw = load_hardware(write("gh200-nolatency.toml", text.replace("transfer_latency_us = 8", "transfer_latency_us = 0")))
    cm = CostModel(hw, load_model("opt-30b"))
    workload = load_workload("sharegpt", 80, rate=40.0, seed=1)
    options = dict(gpu_mem_util=0.75, mean_prompt=int(workload.prompt_tokens.mean()),
                   mean_output=int(workload.output_tokens.mean()))
    single = simulate(build_policy("vllm", cm, **options), cm, workload)
    piped = simulate_pipeline(build_policy("pp-vllm", cm, **options), cm, workload)
    assert sum(r.preemptions for r in single.requests) > 0, "the load was meant to preempt"
    by_id = {r.request_id: r for r in piped.requests}
    for a in single.requests:
        b = by_id[a.request_id]
        assert (a.preemptions, a.generated, a.state) == (b.preemptions, b.generated, b.state)
        assert (b.first_token_s, b.finish_s) == pytest.approx((a.first_token_s, a.finish_s), rel=1e-6)


def _streaming_setup(num_requests=100):
    """opt-6.7b over the 8 L40S with 4.5% of HBM: a KV pool of a few hundred blocks, so PipeMax streams."""
    cm = CostModel(load_hardware("pcie-8x-l40s"), load_model("opt-6.7b"))
    workload = load_workload("alpaca", num_requests, rate=float("inf"), seed=0)
    policy = build_policy("pipemax", cm, gpu_mem_util=0.045, cpu_mem_bytes=16 * GiB,
                          mean_prompt=int(workload.prompt_tokens.mean()), mean_output=int(workload.output_tokens.mean()))
    return cm, workload, policy


def _streaming_run(num_requests=100):
    cm, workload, policy = _streaming_setup(num_requests)
    plans, holdings = [], []
    next_iteration, observe = policy.next_iteration, policy.observe

    def recording_next(micro_batch):
        plan = next_iteration(micro_batch)
        if plan is not None:
            plans.append(plan)
            holdings.append(sum(s.tables.pools["gpu"].num_used for s in policy.schedulers))
        return plan

    def recording_observe(plan, stats):
        finished = observe(plan, stats)
        holdings.append(sum(s.tables.pools["gpu"].num_used for s in policy.schedulers))
        return finished

    policy.next_iteration, policy.observe = recording_next, recording_observe
    return cm, workload, policy, simulate_pipeline(policy, cm, workload), plans, holdings


@pytest.fixture(scope="module")
def streaming():
    return _streaming_run()


def test_every_request_finishes_once_with_its_tokens(streaming):
    """...or is rejected because its KV fits neither its engine's blocks nor a staging slot."""
    _, workload, policy, result, _, _ = streaming
    assert sorted(r.request_id for r in result.requests) == list(range(len(workload)))
    done = [r for r in result.requests if r.state is State.FINISHED]
    assert all(r.generated == r.output_tokens and r.arrival_s <= r.first_token_s <= r.finish_s for r in done)
    limit = max(policy.config.num_gpu_blocks, policy.streamer.slot_capacity)
    rejected = [r for r in result.requests if r.state is not State.FINISHED]
    assert all(r.state is State.REJECTED and -(-r.max_context // 16) > limit for r in rejected)
    assert len(rejected) < len(workload) / 10
    assert result.recorder.summary(result.requests, 0.0)["total_bytes_h2d"] > 0, "the load was meant to stream"


def test_each_window_moves_no_more_than_its_budget(streaming):
    """A group chosen with plan j is prefetched while each stage computes plan j and written back after the
    next: per stage, calls x latency + bytes at the GPU's share of the PCIe tree, both ways, within plan j's
    stage time (the cost model's, without copies in flight). The share is worked out here by hand."""
    cm, _, policy, _, plans, _ = streaming
    share = min(25e9, 25e9 / 2, 300e9 / 8)  # link, switch uplink shared by two GPUs, host memory over eight
    assert copy_bandwidth_share(cm.hw, 8) == {H2D: share, D2H: share}
    by_prefetch = {}
    for plan in plans:
        for stage, step in enumerate(plan.layers):
            for copy in step.issue:
                by_prefetch[copy.op_id] = (plan, stage)
    checked = 0
    for plan in plans:
        for stage, step in enumerate(plan.layers):
            if not step.wait:
                continue
            window_plan, window_stage = by_prefetch[step.wait[0]]
            assert window_stage == stage
            if window_plan is plan:
                continue  # chosen on an empty pipeline: no window, taken whatever it costs
            prefetch = next(c for c in window_plan.layers[stage].issue if c.op_id == step.wait[0])
            writeback, = step.evict
            seconds = (prefetch.calls + writeback.calls) * 10e-6 + (prefetch.nbytes + writeback.nbytes) / share
            assert seconds <= policy.layout.layers[stage] * cm.layer_time(window_plan.shape) * (1 + 1e-9)
            checked += 1
    assert checked > 100


def test_kv_never_exceeds_any_gpu_or_the_cpu_pool(streaming):
    """Resident blocks, the two staging slots and the extra activations of a slot's worth of streamed tokens
    fit every GPU's HBM next to its weights; every group fits its slot; the CPU pool is never exceeded."""
    cm, _, policy, result, plans, holdings = streaming
    m, layout, slot = cm.model, policy.layout, policy.streamer.slot_capacity
    resident = policy.config.num_gpu_blocks * policy.micro_batches
    assert max(holdings) <= resident
    for stage, layers in enumerate(layout.layers):
        block = 16 * m.kv_bytes_per_token_layer * layers
        activations = m.activation_bytes(2048 + 16 * slot, 256 + slot)
        assert (resident + SLOTS * slot) * block + activations + layout.weight_bytes[stage] <= 0.045 * 48 * GiB
    for plan in plans:
        streamed = [s for s in plan.seqs if s.blocks and s.blocks[0].tier == "cpu"]
        assert sum(-(-(s.cached_tokens + s.new_tokens) // 16) for s in streamed) <= slot
    cpu = result.recorder.iterations["cpu_kv_bytes"].max()
    assert cpu <= policy.streamer.tables.pools["cpu"].capacity * policy.config.block_bytes


def test_greedy_takes_the_smallest_first_and_as_many_as_any_choice_could():
    """Idle streamed requests of known contexts, one window: the chosen ones are the cheapest, and no larger
    set fits the window and the slot (brute force over every subset)."""
    cm, _, policy = _streaming_setup()
    streamer, block = policy.streamer, 16 * cm.model.kv_bytes_per_token_layer
    contexts = [40, 5, 130, 64, 17, 90, 33]
    for i, context in enumerate(contexts):
        request = Request(i, 0.0, context, 50)
        request.computed, request.state = context, State.RUNNING
        streamer.tables.append(i, CPU, -(-context // 16))  # an empty pool: each request's blocks in one run
        streamer.idle[i], streamer.origin[i] = request, policy.schedulers[0]

    def seconds(context):  # per layer: one call each way, the cached blocks in, the block written out
        return 2 * 10e-6 + -(-context // 16) * block / 12.5e9 + block / 12.5e9

    def blocks(context):
        return -(-(context + 1) // 16)

    window = seconds(5) + seconds(17) + seconds(33) + seconds(40) / 2
    group = streamer.select(window, lambda streamable: None)
    chosen = sorted(r.computed for r, _ in group.work)
    assert chosen == [5, 17, 33]
    best = max(len(c) for k in range(len(contexts) + 1) for c in itertools.combinations(contexts, k)
               if sum(map(seconds, c)) <= window and sum(map(blocks, c)) <= streamer.slot_capacity)
    assert len(chosen) == best


def test_same_seed_same_run():
    a, b = _streaming_run(num_requests=40)[3], _streaming_run(num_requests=40)[3]
    for name, column in a.recorder.iterations.items():
        assert np.array_equal(column, b.recorder.iterations[name]), name
    assert [(r.first_token_s, r.finish_s, r.preemptions) for r in a.requests] == \
           [(r.first_token_s, r.finish_s, r.preemptions) for r in b.requests]
