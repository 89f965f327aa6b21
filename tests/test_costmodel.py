"""The cost model against times and budgets worked out by hand on a tiny system (tests/data/tiny-*.toml)."""
import pytest

from hwmodels import BatchShape, CapacityError, CostModel, load_hardware, load_model

from .conftest import DATA


@pytest.fixture
def tiny():
    return CostModel(load_hardware(DATA / "tiny-hw.toml"), load_model(DATA / "tiny-opt.toml"))


def test_layer_time_is_the_roofline_of_each_part_plus_overhead(tiny):
    batch = BatchShape.of(decodes=[10])
    # GEMMs: 98,304 FLOP at 0.5 TFLOP/s = 0.197 µs < 102,016 B at 50 GB/s = 2.04032 µs (memory bound).
    # Attention: 2,816 FLOP = 5.6 ns < 3,328 B at 50 GB/s = 66.56 ns (memory bound). Overhead 10 µs.
    assert tiny.layer_time(batch) == pytest.approx(2.04032e-6 + 6.656e-8 + 10e-6, rel=1e-12)


def test_large_prefill_is_compute_bound(tiny):
    batch = BatchShape.of(prefills=[(128, 0)])
    flops = 2 * 49152 * 128 + 4 * 64 * (128 * 129 // 2)
    nbytes = 49984 * 2 + 128 * 1024 * 2 + 256 * (128 + 128) + 2 * 128 * 64 * 2
    linear = max(2 * 49152 * 128 / 0.5e12, (49984 * 2 + 128 * 1024 * 2) / 50e9)
    attention = max(4 * 64 * (128 * 129 // 2) / 0.5e12, (256 * 256 + 2 * 128 * 64 * 2) / 50e9)
    assert linear == 2 * 49152 * 128 / 0.5e12  # the GEMMs are compute bound here
    assert tiny.layer_time(batch) == pytest.approx(linear + attention + 10e-6, rel=1e-12)
    assert tiny.model.layer_flops(batch) == flops and tiny.model.layer_hbm_bytes(batch) == nbytes


def test_copies_take_hbm_bandwidth_from_compute(tiny):
    batch = BatchShape.of(decodes=[10])
    # 20 GB/s of copies at contention 0.5 leave 50 - 10 = 40 GB/s.
    assert tiny.layer_time(batch, copy_bandwidth=20e9) == pytest.approx(102016 / 40e9 + 3328 / 40e9 + 10e-6)
    with pytest.raises(ValueError, match="no HBM bandwidth"):
        tiny.layer_time(batch, copy_bandwidth=100e9)


def test_iteration_is_layers_plus_head(tiny):
    batch = BatchShape.of(decodes=[10, 20])
    head = max(2 * 1000 * 64 * 2 / 0.5e12, (1000 * 64 + 2 * (64 + 1000)) * 2 / 50e9)
    assert tiny.head_time(batch) == pytest.approx(head)
    assert tiny.iteration_time(batch) == pytest.approx(2 * tiny.layer_time(batch) + head)


def test_transfer_time_is_latency_per_call_plus_bytes_over_bandwidth(tiny):
    assert tiny.transfer_time(1_000_000, calls=3, direction="h2d") == pytest.approx(3 * 5e-6 + 1e6 / 10e9)
    assert tiny.transfer_time(1_000_000, calls=3, direction="d2h") == pytest.approx(3 * 5e-6 + 1e6 / 5e9)
    assert tiny.transfer_time(0, calls=0) == 0
    with pytest.raises(ValueError, match="unknown direction 'up'"):
        tiny.transfer_time(1, direction="up")
    with pytest.raises(ValueError, match="calls >= 1"):
        tiny.transfer_time(10, calls=0)


def test_memory_budget_by_hand(tiny):
    budget = tiny.memory_budget(gpu_mem_util=0.5)
    assert budget.usable_bytes == 2**30 // 2
    assert budget.weight_bytes == 344832
    # 2048 batched tokens x (3*64 + 256) x 2 B, plus 256 sequences x 1000 FP32 logits.
    assert budget.activation_bytes == 2048 * 448 * 2 + 256 * 1000 * 4
    assert budget.kv_pool_bytes == 2**29 - 344832 - 2859008
    assert budget.kv_blocks(16 * tiny.model.kv_bytes_per_token) == budget.kv_pool_bytes // (16 * 512)
    staged = tiny.memory_budget(gpu_mem_util=0.5, staging_bytes=1000)
    assert staged.kv_pool_bytes == budget.kv_pool_bytes - 1000


def test_memory_budget_refuses_what_does_not_fit():
    cm = CostModel(load_hardware("a100-80g-sxm-pcie4"), load_model("opt-66b"))
    with pytest.raises(CapacityError, match="opt-66b on a100-80g-sxm-pcie4 leaves no KV pool: weights 122.4 GiB"):
        cm.memory_budget()
    with pytest.raises(ValueError, match="gpu_mem_util must be in"):
        cm.memory_budget(gpu_mem_util=1.5)


def test_opt13b_decode_on_gh200_is_memory_bound_at_hbm_speed():
    """A sanity anchor: one OPT-13B decode step reads all weights once (25.7 GB at 0.814 x 4 TB/s ≈ 7.9 ms);
    the rest is the layers' and the iteration's fixed overheads and the small element-wise and attention work."""
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))
    gpu = cm.hw.gpu
    weights_time = cm.model.weight_bytes / (gpu.hbm_bandwidth * gpu.hbm_efficiency)
    overheads = cm.model.num_layers * gpu.layer_overhead + gpu.iteration_overhead + gpu.iteration_overhead_per_sequence
    assert weights_time < cm.iteration_time(BatchShape.of(decodes=[100])) - overheads < 1.1 * weights_time


def test_a_decode_batch_from_its_sums_is_the_batch_from_its_lengths():
    """BatchShape.decoding (what the simulator builds for every decode iteration) against BatchShape.of."""
    for cached in ([10], [10, 20], [1, 1, 1], list(range(1, 300, 7))):
        assert BatchShape.decoding(len(cached), sum(cached), max(cached)) == BatchShape.of(decodes=cached)
