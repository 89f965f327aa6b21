"""Pie's placement by role: a hand-worked op list (copy calls and bytes per layer), and the sizes the
simulator derives from the link (the prefetch's gap span, pie's largest share)."""
import pytest

from hwmodels import BatchShape, CostModel, load_hardware, load_model
from pie_policy import EngineConfig, ExpansionController, Policy
from pie_policy.blocks import CPU, GPU, BlockRef
from pie_policy.plan import D2H, H2D, IterationStats
from pie_policy.sizing import coalesce_gap, link_bound_share

PRICES = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))  # what pie's controller prices batches on


def run(policy, plan):
    stats = IterationStats(plan.iteration, 0.0, 1.0, 1.0, 0.0, 0, 0, 0.0, 0.0)
    return policy.observe(plan, stats)


def test_an_admission_the_gpu_cannot_take_keeps_its_full_blocks_on_the_cpu_and_its_tail_on_the_gpu():
    """2 layers, 100-byte layer blocks, 16-token blocks, 6 GPU blocks, share 0.4 (4 CPU blocks allowed).
    A (64 tokens) takes 4 GPU blocks. B (40 tokens: 3 blocks, 2 of them full) does not fit the 2 left:
    its 2 full blocks go to CPU slots 0, 1 and its tail to the GPU. B's prefill writes them: per layer one
    200-byte call each way. Then A and B decode (A's 5th block on the GPU): per layer one 200-byte H2D
    call and no write-back, as B's CPU blocks are full and read-only. GPU first with the CPU after it
    would have put B's tail on the CPU instead: read and written back every layer of every decode."""
    config = EngineConfig(num_layers=2, block_bytes_layer=100, num_gpu_blocks=6, num_cpu_blocks=4)
    policy = Policy("pie", config, controller=ExpansionController(share=0.4, max_share=0.5), cost_model=PRICES)
    policy.add_request(0, 0.0, 64, 10)
    run(policy, policy.next_iteration())
    policy.add_request(1, 0.0, 40, 10)
    prefill = policy.next_iteration()
    assert [s.request_id for s in prefill.seqs] == [1]
    assert prefill.seqs[0].blocks[:2] == (BlockRef(CPU, 0), BlockRef(CPU, 1)) and prefill.seqs[0].blocks[2].tier == GPU
    assert [(c.direction, c.layer, c.pairs, c.nbytes, c.calls) for c in prefill.prologue] == [
        (H2D, 0, ((0, 0), (1, 1)), 200, 1)]
    for step in prefill.layers:
        assert [(c.direction, c.nbytes, c.calls) for c in step.issue + step.evict] == [(H2D, 200, 1), (D2H, 200, 1)]
    run(policy, prefill)

    decode = policy.next_iteration()
    assert sorted(s.request_id for s in decode.seqs) == [0, 1]
    assert [b.tier for b in decode.seqs[0].blocks] == [GPU] * 5
    assert decode.prologue == ()  # layer 0 was prefetched at the prefill's last layer
    for step in decode.layers:
        assert [(c.direction, c.pairs, c.nbytes, c.calls) for c in step.issue] == [(H2D, ((0, 0), (1, 1)), 200, 1)]
        assert step.evict == ()


def test_after_a_cut_below_what_the_cpu_holds_admissions_go_on_without_new_cpu_blocks():
    """A cut below what the CPU holds stops new CPU blocks, not admissions that fit the GPU: they add
    compute that hides the CPU KV's copies (stopping them would shrink the batch around the CPU KV and
    let the link stall), and the CPU KV drains as its sequences finish."""
    config = EngineConfig(num_layers=2, block_bytes_layer=100, num_gpu_blocks=6, num_cpu_blocks=4)
    controller = ExpansionController(share=0.4, max_share=0.5)
    policy = Policy("pie", config, controller=controller, cost_model=PRICES)
    policy.add_request(0, 0.0, 64, 10)
    run(policy, policy.next_iteration())
    policy.add_request(1, 0.0, 40, 10)
    run(policy, policy.next_iteration())  # B: 2 CPU blocks
    controller.share = 0.1                 # allows int(0.1 / 0.9 * 6) = 0 CPU blocks
    policy.add_request(2, 0.0, 3, 10)      # one block, and the GPU has one free
    policy.add_request(3, 0.0, 40, 10)     # 2 full blocks: the GPU has no room, the share no CPU room
    plan = policy.next_iteration()
    assert [s.request_id for s in plan.seqs] == [2] and plan.seqs[0].blocks[0].tier == GPU
    assert [r.request_id for r in policy.scheduler.waiting] == [3]


def test_coalesce_gap_is_the_block_layers_one_call_latency_moves():
    """GH200: 8 µs per call, a 16-token OPT-13B block-layer is 16 · 2 · 5120 · 2 = 327,680 B at 345 GB/s =
    0.950 µs: a gap of 8 costs less than a call. PCIe Gen5: 10 µs against 6.18 µs at 53 GB/s: 1."""
    model = load_model("opt-13b")
    assert coalesce_gap(CostModel(load_hardware("gh200-96g"), model), 16) == 8
    assert coalesce_gap(CostModel(load_hardware("h100-sxm-pcie5"), model), 16) == 1


@pytest.mark.parametrize("hw", ["gh200-96g", "h100-sxm-pcie5"])
def test_link_bound_share_is_the_largest_share_whose_layer_streams_under_compute(hw):
    cm, context = CostModel(load_hardware(hw), load_model("opt-13b")), 500
    pool = cm.memory_budget(0.5, 2048, 256).kv_pool_bytes
    share = link_bound_share(cm, pool, context)
    kv = cm.model.kv_bytes_per_token

    def slack(s):
        batch = int(pool / (1 - s) // (context * kv))
        return cm.layer_time(BatchShape.of(decodes=[context] * batch)) - cm.transfer_time(
            int(s * batch * context * cm.model.kv_bytes_per_token_layer))
    assert slack(share) >= 0 > slack(round(share + 0.01, 2))
    # bandwidth over HBM bandwidth, lifted by the weights: ~0.19 on GH200, several times less on PCIe
    assert (0.15 <= share <= 0.25) if hw == "gh200-96g" else (0.01 <= share <= 0.06)
