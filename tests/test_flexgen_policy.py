"""FlexGen as a policy: whole blocks, no continuous batching, copies of the offloaded shares."""
import pytest

from hwmodels import BatchShape, CostModel, load_hardware, load_model
from pie_policy import State
from pie_policy.flexgen import FlexGenPolicy
from pie_policy.flexgen_lp import FlexGenPlacement
from pie_policy.plan import ACTIVATIONS, D2H, DISK_READ, DISK_WRITE, H2D, LAYER_KV, WEIGHTS, IterationStats


def placement(block: int, wg: float, cg: float, hg: float) -> FlexGenPlacement:
    return FlexGenPlacement(block, 1, wg, cg, hg, 0.0, 0.0, "compute", 0.0, 0.0, 0, 0)


def run(policy, workload):
    requests = [policy.add_request(i, arrival, p, o) for i, (arrival, p, o) in enumerate(workload)]
    plans, now = [], 0.0
    while policy.has_work:
        plan = policy.next_iteration()
        plans.append(plan)
        now += 1.0
        policy.observe(plan, IterationStats(plan.iteration, now - 1, now, 1.0, 0.0, 0, 0, 0, 0))
    return requests, plans


def test_blocks_run_to_their_longest_request_then_the_next_block_starts():
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-125m"))
    policy = FlexGenPolicy(cm, placement(block=2, wg=1, cg=1, hg=1))
    requests, plans = run(policy, [(0, 10, 3), (0, 20, 5), (0, 7, 2)])
    assert all(r.state is State.FINISHED and r.generated == r.output_tokens for r in requests)
    # Block 1 = requests 0 and 1: prefill, then 4 decodes (request 1's 5 tokens); request 0 finishes at 3.
    assert [r.finish_s for r in requests] == [3.0, 5.0, 7.0]
    assert plans[1].shape.decode_tokens == 2 and plans[4].shape.decode_tokens == 2  # the finished row pads
    assert [s.request_id for s in plans[4].seqs] == [1]
    assert plans[5].shape.prefill_tokens == 7  # block 2 starts only after block 1 is done
    assert all(p.layers == () for p in plans)  # everything in HBM: no copies


def test_copies_carry_the_offloaded_shares_one_layer_ahead():
    m = load_model("opt-125m")
    cm = CostModel(load_hardware("gh200-96g"), m)
    policy = FlexGenPolicy(cm, placement(block=2, wg=0.25, cg=0.5, hg=1.0))
    _, plans = run(policy, [(0, 10, 3), (0, 20, 3)])
    decode = plans[1]  # contexts 10 and 20 cached, one new token each
    by_kind = {(c.direction, c.kind): c.nbytes for c in decode.step(3).issue}
    assert by_kind == {(H2D, WEIGHTS): round(0.75 * m.layer_weight_bytes),
                       (H2D, LAYER_KV): round(0.5 * 30 * m.kv_bytes_per_token_layer)}
    assert {(c.direction, c.kind): c.nbytes for c in decode.step(3).evict} == {
        (D2H, LAYER_KV): round(0.5 * 2 * m.kv_bytes_per_token_layer)}
    assert all(c.layer == 4 for c in decode.step(3).issue)
    assert set(decode.step(4).wait) == {c.op_id for c in decode.step(3).issue}
    assert {c.layer for c in decode.prologue} == {0} and ACTIVATIONS not in {c.kind for c in decode.copies()}


def test_requests_longer_than_the_context_are_rejected():
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-125m"))
    policy = FlexGenPolicy(cm, placement(1, 1, 1, 1))
    request = policy.add_request(0, 0.0, 2000, 100)
    assert request.state is State.REJECTED and "2048" in request.reason and not policy.has_work


def test_disk_data_is_read_two_layers_ahead_then_copied_and_written_after_its_copy_out():
    m = load_model("opt-125m")
    cm = CostModel(load_hardware("gh200-96g"), m)
    on_disk = FlexGenPlacement(1, 2, 0.25, 0.25, 1.0, 0.0, 0.0, "compute", 0.0, 0.0, 0, 0, wd=0.5, cd=0.5)
    _, plans = run(FlexGenPolicy(cm, on_disk), [(0, 10, 3), (0, 20, 3)])
    decode = plans[1]  # contexts 10 and 20 cached, one new token each
    W, kv = m.layer_weight_bytes, m.kv_bytes_per_token_layer
    issued = {(c.direction, c.kind): c for c in decode.step(3).issue}
    assert {(d, k): (c.layer, c.nbytes) for (d, k), c in issued.items()} == {
        (DISK_READ, WEIGHTS): (5, round(0.5 * W)), (DISK_READ, LAYER_KV): (5, round(0.5 * 30 * kv)),
        (H2D, WEIGHTS): (4, round(0.75 * W)), (H2D, LAYER_KV): (4, round(0.75 * 30 * kv))}
    reads = {(c.layer, c.kind): c.op_id for c in decode.copies() if c.direction == DISK_READ}
    # To the GPU once read from disk; the cache only once the prefill has written it back (to CPU, to disk).
    prefill_wrote = {(c.direction, c.layer): c.op_id for c in plans[0].copies() if c.kind == LAYER_KV}
    assert issued[H2D, WEIGHTS].after == (reads[4, WEIGHTS],)
    assert issued[H2D, LAYER_KV].after == (reads[4, LAYER_KV], prefill_wrote[D2H, 4])
    assert issued[DISK_READ, LAYER_KV].after == (prefill_wrote[DISK_WRITE, 5],)
    assert {(c.direction, c.layer) for c in decode.prologue} == {(DISK_READ, 0), (DISK_READ, 1), (H2D, 0)}
    stored = {(c.direction, c.kind): c for c in decode.step(3).evict}
    assert {key: c.nbytes for key, c in stored.items()} == {(D2H, LAYER_KV): round(0.75 * 2 * kv),
                                                           (DISK_WRITE, LAYER_KV): round(0.5 * 2 * kv)}
    assert stored[DISK_WRITE, LAYER_KV].after == (stored[D2H, LAYER_KV].op_id,)
    # Two GPU batches of one row each; the disk stays off the link's byte counts.
    assert decode.gpu_batches == (BatchShape.of(decodes=[10]), BatchShape.of(decodes=[20]))
    assert decode.bytes_moved()[0] == sum(c.nbytes for c in decode.copies() if c.direction == H2D)


def test_flexgen_refuses_in_words_a_mean_prompt_that_leaves_no_room():
    from hwmodels import CostModel, load_hardware, load_model
    from pie_policy import ConfigError
    from pie_policy.sizing import build_policy

    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))
    with pytest.raises(ConfigError, match="flexgen: the mean prompt of 2501 tokens does not fit opt-13b's context"):
        build_policy("flexgen", cm, mean_prompt=2501, mean_output=30)
